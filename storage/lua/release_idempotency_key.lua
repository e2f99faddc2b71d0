-- Delete an idempotency claim only if it still names this response.
-- KEYS: idempotency key
-- ARGV: response_id
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current)['response_id'] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
