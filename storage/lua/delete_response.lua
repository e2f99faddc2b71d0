-- Delete a response's keys, refusing while it is still running (the check and the delete are one step).
-- KEYS: state hash, events stream, input string
-- ARGV: only_if_finished ('1' or '0')
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  redis.call('DEL', KEYS[2], KEYS[3])
  return 'MISSING'
end
if ARGV[1] == '1' and (status == 'queued' or status == 'in_progress') then
  return 'ACTIVE'
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 'DELETED'
