-- Claim an idempotency key, or report who holds it. With ARGV[3] set, replace a claim only if it still names
-- that response (taking over a claim whose admission was abandoned).
-- KEYS: idempotency key
-- ARGV: claim_json, ttl_ms, expected_response_id ('' for a plain claim)
local current = redis.call('GET', KEYS[1])
if ARGV[3] == '' then
  if current then
    return current
  end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return false
end
if current and cjson.decode(current)['response_id'] == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 'REPLACED'
end
return false
