-- Append events that continue the log and replace the snapshot in one step; refresh the retention TTL.
-- Only the current owner, with the current epoch and an unexpired lease, may append (fencing): a writer that
-- was paused past its lease and taken over can never write again.
-- KEYS: state hash, events stream, input string
-- ARGV: ttl_ms, snapshot, status, first_seq, owner, epoch, then (entry_id, type, data) per event
-- Returns 'OK', or 'CANCEL' (appended, and a cancel was requested), 'MISSING', 'CLOSED', 'CONFLICT', 'FENCED'.
local last = redis.call('HGET', KEYS[1], 'last_seq')
if not last then
  return 'MISSING'
end
-- Fencing first: a writer that lost the response must hear exactly that, whatever else has been written since.
local state = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'lease_until')
if state[1] ~= ARGV[5] or state[2] ~= ARGV[6] or tonumber(state[3]) < now_ms() then
  return 'FENCED'
end
local count = (#ARGV - 6) / 3
local first = tonumber(ARGV[4])
last = tonumber(last)
if last + 1 ~= first then
  -- A client retry of an append whose reply was lost: the same events are already there, so report success
  -- instead of a conflict (the batch's last entry is compared byte for byte).
  local final_id = ARGV[7 + 3 * (count - 1)]
  if last >= first + count - 1 then
    local stored = redis.call('XRANGE', KEYS[2], final_id, final_id)
    if #stored == 1 and stored[1][2][4] == ARGV[7 + 3 * (count - 1) + 2] then
      return 'OK'
    end
  end
  return 'CONFLICT'
end
if TERMINAL[redis.call('HGET', KEYS[1], 'status')] then
  return 'CLOSED'
end
local ttl = ARGV[1]
for i = 0, count - 1 do
  local base = 7 + 3 * i
  redis.call('XADD', KEYS[2], ARGV[base], 't', ARGV[base + 1], 'd', ARGV[base + 2])
end
redis.call('HSET', KEYS[1], 'snapshot', ARGV[2], 'status', ARGV[3], 'last_seq', last + count)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PEXPIRE', KEYS[3], ttl)
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  return 'CANCEL'
end
return 'OK'
