-- Append events that continue the log and replace the snapshot in one step; refresh the retention TTL.
-- KEYS: state hash, events stream, input string
-- ARGV: ttl_ms, snapshot, status, first_seq, then (entry_id, type, data) per event
local last = redis.call('HGET', KEYS[1], 'last_seq')
if not last then
  return 'MISSING'
end
local current = redis.call('HGET', KEYS[1], 'status')
if current == 'completed' or current == 'failed' or current == 'cancelled' or current == 'incomplete' then
  return 'CLOSED'
end
if tonumber(last) + 1 ~= tonumber(ARGV[4]) then
  return 'CONFLICT'
end
local ttl = ARGV[1]
local count = (#ARGV - 4) / 3
for i = 0, count - 1 do
  local base = 5 + 3 * i
  redis.call('XADD', KEYS[2], ARGV[base], 't', ARGV[base + 1], 'd', ARGV[base + 2])
end
redis.call('HSET', KEYS[1], 'snapshot', ARGV[2], 'status', ARGV[3], 'last_seq', tonumber(last) + count)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PEXPIRE', KEYS[3], ttl)
return 'OK'
