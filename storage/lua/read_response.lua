-- A response's state and the events stored after its snapshot (the reader folds them in), in one step so the
-- two agree. Read-only.
-- KEYS: state hash, events stream
-- Returns {} when it does not exist, else {flat state fields, entries after the snapshot}.
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then
  return {}
end
local snap_id = redis.call('HGET', KEYS[1], 'snap_id') or '0-0'
return {fields, redis.call('XRANGE', KEYS[2], '(' .. snap_id, '+')}
