-- Create a response with its first events, its snapshot and its input items, all with the retention TTL.
-- KEYS: state hash, events stream, input string (one hash tag: one Cluster slot)
-- ARGV: ttl_ms, snapshot, status, background, stored, input_json, request_json, owner ('' when queued for any
--       instance), lease_ms, tenant, then (entry_id, type, data) per event, from seq 0
-- Returns {'OK', epoch, lease_until_ms} or 'EXISTS'.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 'EXISTS'
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl = ARGV[1]
local count = (#ARGV - 10) / 3
for i = 0, count - 1 do
  local base = 11 + 3 * i
  redis.call('XADD', KEYS[2], ARGV[base], 't', ARGV[base + 1], 'd', ARGV[base + 2])
end
local lease_until = 0
if ARGV[8] ~= '' then
  lease_until = now_ms + tonumber(ARGV[9])
end
redis.call('HSET', KEYS[1], 'snapshot', ARGV[2], 'status', ARGV[3], 'last_seq', count - 1,
  'background', ARGV[4], 'stored', ARGV[5], 'request', ARGV[7], 'owner', ARGV[8], 'epoch', 1,
  'lease_until', lease_until, 'recovery_count', 0, 'tenant', ARGV[10])
redis.call('PEXPIRE', KEYS[1], ttl)
if count > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl)
end
redis.call('SET', KEYS[3], ARGV[6], 'PX', ttl)
return {'OK', 1, lease_until}
