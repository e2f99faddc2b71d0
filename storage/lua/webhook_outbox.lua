-- The webhook outbox of one shard (a sorted set scored by when each delivery is due, Redis ms).
-- 'claim': up to ARGV[2] members due now, each pushed ARGV[3] ms ahead so no other sender takes it meanwhile (a
--   sender that dies with it leaves it due again then); returns the members.
-- 'retry': push member ARGV[2] to ARGV[3] ms from now, if it is still there (XX: a delivered one stays gone).
-- 'done': remove member ARGV[2].
-- KEYS: the outbox
-- ARGV: action, then as above
local now = now_ms()
if ARGV[1] == 'claim' then
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
  local until_ms = now + tonumber(ARGV[3])
  for _, member in ipairs(due) do
    redis.call('ZADD', KEYS[1], 'XX', until_ms, member)
  end
  return due
elseif ARGV[1] == 'retry' then
  return redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[3]), ARGV[2])
end
return redis.call('ZREM', KEYS[1], ARGV[2])
