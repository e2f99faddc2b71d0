-- Delete a response's keys and its place in the index and queue, refusing while it is still running (the check
-- and the delete are one step).
-- KEYS: state hash, events stream, input string, run index, queue, steers list
-- ARGV: only_if_finished ('1' or '0'), response_id
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[6])
  return 'MISSING'
end
if ARGV[1] == '1' and not TERMINAL[status] then
  return 'ACTIVE'
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[6])
redis.call('ZREM', KEYS[4], ARGV[2])
redis.call('ZREM', KEYS[5], ARGV[2])
return 'DELETED'
