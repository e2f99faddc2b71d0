-- One page of a conversation's items, in either order, after an item id.
-- KEYS: items hash, order list
-- ARGV: after_id ('' for the start), limit, order ('asc' or 'desc')
-- Returns {has_more, item_json...}, or {'NO_AFTER'} when after_id is not in the conversation.
local count = redis.call('LLEN', KEYS[2])
local limit = tonumber(ARGV[2])
local ids
if ARGV[3] == 'asc' then
  local first = 0
  if ARGV[1] ~= '' then
    local position = redis.call('LPOS', KEYS[2], ARGV[1])
    if not position then
      return {'NO_AFTER'}
    end
    first = position + 1
  end
  ids = redis.call('LRANGE', KEYS[2], first, first + limit)
else
  local last = count - 1
  if ARGV[1] ~= '' then
    local position = redis.call('LPOS', KEYS[2], ARGV[1])
    if not position then
      return {'NO_AFTER'}
    end
    last = position - 1
  end
  if last < 0 then
    ids = {}
  else
    local first = math.max(0, last - limit)
    ids = redis.call('LRANGE', KEYS[2], first, last)
    local reversed = {}
    for i = #ids, 1, -1 do
      table.insert(reversed, ids[i])
    end
    ids = reversed
  end
end
local has_more = #ids > limit and '1' or '0'
local reply = {has_more}
for i = 1, math.min(#ids, limit) do
  table.insert(reply, redis.call('HGET', KEYS[1], ids[i]))
end
return reply
