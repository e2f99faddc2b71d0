-- Run index members whose lease has expired by Redis's clock (the one leases are measured by), oldest first, each
-- followed by its score (when its lease expired), so that several shards' answers can be merged in that order.
-- KEYS: run index (of one shard)
-- ARGV: limit
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'WITHSCORES', 'LIMIT', 0, ARGV[1])
