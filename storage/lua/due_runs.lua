-- Run index members whose lease has expired by Redis's clock (the one leases are measured by), oldest first.
-- KEYS: run index
-- ARGV: limit
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, ARGV[1])
