-- Queue steering input for a response that has not ended, and tell every instance (its owner stops the run at its
-- next safe boundary). The status check and the push are one step: input is never queued behind a terminal event.
-- KEYS: state hash, steers list
-- ARGV: steer JSON, max pending, ttl_ms, channel, notice message, publishing command ('PUBLISH' or 'SPUBLISH')
-- Returns 'QUEUED', 'MISSING', 'ENDED' or 'FULL'.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return 'MISSING'
end
if TERMINAL[status] then
  return 'ENDED'
end
if redis.call('LLEN', KEYS[2]) >= tonumber(ARGV[2]) then
  return 'FULL'
end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call(ARGV[6], ARGV[4], ARGV[5])
return 'QUEUED'
