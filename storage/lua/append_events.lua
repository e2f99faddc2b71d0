-- Append events that continue the log and replace the snapshot in one step; refresh the retention TTL. This is
-- the append that carries a snapshot (status changes, and now and then between them); the
-- hot path appends deltas with plain XADDs instead, fenced by their entry ids (see storage/keys.py).
-- Only the current owner, with the current epoch and an unexpired lease, may append (fencing): a writer that
-- was paused past its lease and taken over can never write again.
-- KEYS: state hash, events stream, input string
-- ARGV: ttl_ms, snapshot, status, first_seq, owner, epoch, then (entry_id, type, data) per event
-- Returns 'OK', or 'CANCEL' (appended, and a cancel was requested), 'MISSING', 'CLOSED', 'CONFLICT', 'FENCED'.
local state = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'lease_until', 'status', 'cancel_requested')
if not state[4] then
  return 'MISSING'
end
-- Fencing first: a writer that lost the response must hear exactly that, whatever else has been written since.
if state[1] ~= ARGV[5] or state[2] ~= ARGV[6] or tonumber(state[3]) < now_ms() then
  return 'FENCED'
end
local count = (#ARGV - 6) / 3
local first = tonumber(ARGV[4])
local final_id = ARGV[7 + 3 * (count - 1)]
local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local last = -1
if #top == 1 then
  last = tonumber(string.match(top[1][1], '-(%d+)$'))
end
if last + 1 ~= first then
  -- A client retry of an append whose reply was lost: the same events are already there, so report success
  -- instead of a conflict (the batch's last entry is compared byte for byte).
  if last >= first + count - 1 then
    local stored = redis.call('XRANGE', KEYS[2], final_id, final_id)
    if #stored == 1 and stored[1][2][4] == ARGV[7 + 3 * (count - 1) + 2] then
      return 'OK'
    end
  end
  return 'CONFLICT'
end
if TERMINAL[state[4]] then
  return 'CLOSED'
end
local ttl = ARGV[1]
for i = 0, count - 1 do
  local base = 7 + 3 * i
  redis.call('XADD', KEYS[2], ARGV[base], 't', ARGV[base + 1], 'd', ARGV[base + 2])
end
redis.call('HSET', KEYS[1], 'snapshot', ARGV[2], 'status', ARGV[3], 'snap_seq', first + count - 1,
  'snap_id', final_id)
if TERMINAL[ARGV[3]] then
  -- Nothing may follow the terminal event: move the stream's last id past every id of this epoch, so even a
  -- plain XADD of this writer is refused from here on.
  redis.call('XSETID', KEYS[2], (tonumber(ARGV[6]) + 1) .. '-0')
end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PEXPIRE', KEYS[3], ttl)
if state[5] == '1' then
  return 'CANCEL'
end
return 'OK'
