-- Undo an admission refused after its response was created, in one step, so that nothing of it is left half
-- done: the response's keys, its place in the index or queue and its idempotency claim, all of its shard's slot.
-- (Its conversation turn is in the conversation's slot: the store releases it next, see RedisStore.)
-- KEYS: state hash, events stream, input string, run index, queue, then the idempotency key when ARGV[2] says
--       there is one
-- ARGV: response_id, has_idempotency ('1'/'0')
-- A queued response can be claimed by another instance the moment it is created: once claimed (epoch past 1) it
-- is not deleted under its new owner; it is marked cancelled instead, so the owner ends it without running it.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch and epoch ~= '1' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return 'CLAIMED'
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
if ARGV[2] == '1' then
  local claim = redis.call('GET', KEYS[6])
  if claim and cjson.decode(claim)['response_id'] == ARGV[1] then
    redis.call('DEL', KEYS[6])
  end
end
return 'OK'
