-- Record a cancel request on an active response and tell every instance; report the status it had. The flag is
-- what counts (the owner also reads it on every append and lease renewal); the message only makes it quick.
-- KEYS: state hash
-- ARGV: channel, response id, the publishing command ('PUBLISH', or 'SPUBLISH' on a cluster, where the channel is
--       the response's shard's, in its slot). The message is the bare id: a cancel notice (storage/redis_runs.py).
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return false
end
if not TERMINAL[status] then
  -- HSET on an existing hash keeps its TTL.
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  redis.call(ARGV[3], ARGV[1], ARGV[2])
end
return status
