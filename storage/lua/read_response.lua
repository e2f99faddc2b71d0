-- A response's state and the events stored after its snapshot (the reader folds them in), in one step so the
-- two agree. Read-only.
-- With a tenant (ARGV[1] not ''), another tenant's response reads as missing, told by its tenant field alone before
-- anything large is read: how long the answer takes says nothing of what another tenant stores.
-- KEYS: state hash, events stream
-- ARGV: tenant, or ''
-- Returns {} when it does not exist (or is another tenant's), else {flat state fields, entries after the snapshot}.
if ARGV[1] ~= '' and (redis.call('HGET', KEYS[1], 'tenant') or 'default') ~= ARGV[1] then
  return {}
end
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then
  return {}
end
local snap_id = redis.call('HGET', KEYS[1], 'snap_id') or '0-0'
return {fields, redis.call('XRANGE', KEYS[2], '(' .. snap_id, '+')}
