-- Create a response with its first events, its snapshot and its input items, all with the retention TTL.
-- KEYS: state hash, events stream, input string (one hash tag: one Cluster slot)
-- ARGV: ttl_ms, snapshot, status, background, stored, input_json, then (entry_id, type, data) per event, from seq 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 'EXISTS'
end
local ttl = ARGV[1]
local count = (#ARGV - 6) / 3
for i = 0, count - 1 do
  local base = 7 + 3 * i
  redis.call('XADD', KEYS[2], ARGV[base], 't', ARGV[base + 1], 'd', ARGV[base + 2])
end
redis.call('HSET', KEYS[1], 'snapshot', ARGV[2], 'status', ARGV[3], 'last_seq', count - 1,
  'background', ARGV[4], 'stored', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ttl)
if count > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl)
end
redis.call('SET', KEYS[3], ARGV[6], 'PX', ttl)
return 'OK'
