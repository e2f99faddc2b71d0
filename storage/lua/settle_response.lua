-- The follow-ups of a response whose terminal event is stored: it leaves the run index and the queue, and the
-- idempotency key that names it restarts its TTL (the key must outlive the response). Refused while the stored
-- status is not terminal: follow-ups come only after a durable end.
-- Refused too while steering input is queued and unresolved (no successor has committed it, nothing else became of
-- it): the response stays indexed, so whoever sweeps it resolves it (runs/steering.py).
-- KEYS: state hash, run index, queue, steers list, then the idempotency key when the response has one
-- ARGV: response_id, idempotency ttl_ms
-- Returns 'OK', 'ACTIVE' or 'STEERS'.
local status = redis.call('HGET', KEYS[1], 'status')
if status and not TERMINAL[status] then
  return 'ACTIVE'
end
if redis.call('LLEN', KEYS[4]) > 0 and not redis.call('HGET', KEYS[1], 'steer_outcome') then
  return 'STEERS'
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if KEYS[5] then
  local claim = redis.call('GET', KEYS[5])
  if claim and cjson.decode(claim)['response_id'] == ARGV[1] then
    redis.call('PEXPIRE', KEYS[5], ARGV[2])
  end
end
return 'OK'
