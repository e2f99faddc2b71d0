-- Create a conversation with its first items.
-- KEYS: conversation hash, items hash, order list (one hash tag)
-- ARGV: ttl_ms, created_at, metadata_json, tenant, then (item_id, item_json) pairs
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 'EXISTS'
end
redis.call('HSET', KEYS[1], 'created_at', ARGV[2], 'metadata', ARGV[3], 'active', '', 'latest', '',
  'tenant', ARGV[4])
for i = 5, #ARGV, 2 do
  if redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('RPUSH', KEYS[3], ARGV[i])
  end
end
for _, key in ipairs(KEYS) do
  redis.call('PEXPIRE', key, ARGV[1])
end
return 'OK'
