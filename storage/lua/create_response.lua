-- Admit a response in one step: its first events, snapshot, input items and stored request, and its place in
-- the run index (owned, due when its lease expires) or at the tail of the queue (unowned, FIFO by Redis time).
-- A response is never stored without being indexed or queued, so no sweeper can miss it.
-- A steered response's successor commits its queued steering input in the same step (runs/steering.py).
-- KEYS: state hash, events stream, input string, run index, queue (all of the response's shard: one hash slot),
--       then, for a successor, the steered response's state hash and steers list (the same shard)
-- ARGV: ttl_ms, response_id, snapshot, status, background, stored, input_json, request_json, owner ('' to queue),
--       lease_ms, tenant, idempotency key name ('' for none), conversation id of its turn ('' for none),
--       number of steers it commits ('' for none), then (entry_id, type, data) per event, from seq 0
-- Returns {'OK', epoch, lease_until_ms}, 'EXISTS' or 'STEERS_TAKEN'.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 'EXISTS'
end
if ARGV[14] ~= '' then
  if redis.call('EXISTS', KEYS[6]) == 0 or redis.call('LLEN', KEYS[7]) ~= tonumber(ARGV[14])
      or redis.call('HEXISTS', KEYS[6], 'successor') == 1 then
    return 'STEERS_TAKEN'
  end
  redis.call('DEL', KEYS[7])
  redis.call('HSET', KEYS[6], 'successor', ARGV[2])
end
local ttl = ARGV[1]
local first_event = 15
local count = (#ARGV - first_event + 1) / 3
for i = 0, count - 1 do
  local base = first_event + 3 * i
  redis.call('XADD', KEYS[2], ARGV[base], 't', ARGV[base + 1], 'd', ARGV[base + 2])
end
local lease_until = 0
if ARGV[9] ~= '' then
  lease_until = now_ms() + tonumber(ARGV[10])
  redis.call('ZADD', KEYS[4], lease_until, ARGV[2])
  redis.call('PEXPIRE', KEYS[4], ttl)
else
  redis.call('ZADD', KEYS[5], now_us(), ARGV[2])
  redis.call('PEXPIRE', KEYS[5], ttl)
end
local snap_id = '0-0'
if count > 0 then
  snap_id = ARGV[first_event + 3 * (count - 1)]
end
redis.call('HSET', KEYS[1], 'snapshot', ARGV[3], 'status', ARGV[4], 'snap_seq', count - 1, 'snap_id', snap_id,
  'epochs', '1:0',
  'background', ARGV[5], 'stored', ARGV[6], 'request', ARGV[8], 'owner', ARGV[9], 'epoch', 1,
  'lease_until', lease_until, 'recovery_count', 0, 'tenant', ARGV[11], 'idem', ARGV[12], 'conv', ARGV[13],
  'cancel_requested', '0')
redis.call('PEXPIRE', KEYS[1], ttl)
if count > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl)
end
redis.call('SET', KEYS[3], ARGV[7], 'PX', ttl)
return {'OK', 1, lease_until}
