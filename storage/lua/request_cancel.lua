-- Record a cancel request on a running response and tell every instance; report the status it had.
-- KEYS: state hash
-- ARGV: channel, response id
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return false
end
if status == 'queued' or status == 'in_progress' then
  -- HSET on an existing hash keeps its TTL.
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  redis.call('PUBLISH', ARGV[1], ARGV[2])
end
return status
