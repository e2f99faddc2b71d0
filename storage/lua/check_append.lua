-- Why a plain (snapshotless) append was refused, or that it need not be repeated. Read-only.
-- KEYS: state hash, events stream
-- ARGV: owner, epoch, entry id of the batch's last event, its data
-- Returns 'OK' (the batch's last event is stored, byte for byte: a retry of an append whose reply was lost),
-- 'MISSING', 'FENCED' (another instance claimed it), 'CLOSED' (it has ended), or 'CONFLICT'.
local state = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'status')
if not state[3] then
  return 'MISSING'
end
local stored = redis.call('XRANGE', KEYS[2], ARGV[3], ARGV[3])
if #stored == 1 and stored[1][2][4] == ARGV[4] then
  return 'OK'
end
if state[1] ~= ARGV[1] or state[2] ~= ARGV[2] then
  return 'FENCED'
end
if TERMINAL[state[3]] then
  return 'CLOSED'
end
return 'CONFLICT'
