-- Every change to an existing conversation, one step each: the turn lock, the items a turn adds, item
-- appends and deletes, metadata.
-- KEYS: conversation hash, items hash, order list
-- ARGV: ttl_ms, action, response_id, then for 'end': completed ('1'/'0') and (item_id, item_json) pairs;
--       for 'append': (item_id, item_json) pairs
-- action 'begin': take the turn unless another response holds it (returns the holder's id).
-- action 'end': release the turn if this response holds it and append the items given (its input and output,
--   for a turn that others build on); when completed, make it the latest completed response.
-- action 'clear': release the turn if `response_id` (a dead holder) still has it.
-- action 'append': append items (POST .../items) unless a turn is running.
-- action 'metadata': ARGV[3] is the new metadata JSON. action 'delete_item': ARGV[3] is the item id.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'MISSING'
end
local action = ARGV[2]
local active = redis.call('HGET', KEYS[1], 'active')
local function append(from)
  for i = from, #ARGV, 2 do
    -- An id the conversation already has is updated in place, not listed twice.
    if redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) == 1 then
      redis.call('RPUSH', KEYS[3], ARGV[i])
    end
  end
end
if action == 'begin' then
  if active == ARGV[3] then
    return 'OK'  -- its own turn already (a resumed run taking it again)
  end
  if active ~= '' then
    return active
  end
  redis.call('HSET', KEYS[1], 'active', ARGV[3])
elseif action == 'end' then
  if active ~= ARGV[3] then
    return 'NOT_ACTIVE'
  end
  redis.call('HSET', KEYS[1], 'active', '')
  append(5)
  if ARGV[4] == '1' then
    redis.call('HSET', KEYS[1], 'latest', ARGV[3])
  end
elseif action == 'clear' then
  if active ~= ARGV[3] then
    return 'NOT_ACTIVE'
  end
  redis.call('HSET', KEYS[1], 'active', '')
elseif action == 'append' then
  if active ~= '' then
    return active
  end
  append(4)
elseif action == 'metadata' then
  redis.call('HSET', KEYS[1], 'metadata', ARGV[3])
elseif action == 'delete_item' then
  if redis.call('HDEL', KEYS[2], ARGV[3]) == 0 then
    return 'NO_ITEM'
  end
  redis.call('LREM', KEYS[3], 1, ARGV[3])
end
for _, key in ipairs(KEYS) do
  redis.call('PEXPIRE', key, ARGV[1])
end
return 'OK'
