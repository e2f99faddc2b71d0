-- Leases of running responses. The owner renews or releases its lease; another instance claims a response whose
-- lease has expired (or that was queued for anyone), which bumps the epoch and so fences the old owner out.
-- KEYS: state hash
-- ARGV: action ('renew' | 'release' | 'claim'), owner, epoch (renew/release) or '' (claim), lease_ms
-- renew   -> {'OK', lease_until} | {'LOST'}
-- release -> {'OK'} | {'LOST'}            (the lease expires now: someone else may claim it at once)
-- claim   -> {'OK', epoch, lease_until, recovery_count} | {'BUSY'} | {'GONE'}
local state = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'lease_until', 'status')
if not state[4] then
  return {'GONE'}
end
local status = state[4]
if status == 'completed' or status == 'failed' or status == 'cancelled' or status == 'incomplete' then
  return {'GONE'}
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local action = ARGV[1]
if action == 'renew' or action == 'release' then
  if state[1] ~= ARGV[2] or state[2] ~= ARGV[3] or tonumber(state[3]) < now_ms then
    return {'LOST'}
  end
  local lease_until = now_ms + tonumber(ARGV[4])
  if action == 'release' then
    lease_until = 0
  end
  redis.call('HSET', KEYS[1], 'lease_until', lease_until)
  return {'OK', lease_until}
end
-- claim
if state[1] ~= '' and tonumber(state[3]) >= now_ms then
  return {'BUSY'}
end
local epoch = tonumber(state[2]) + 1
local lease_until = now_ms + tonumber(ARGV[4])
local recovery = 0
if state[1] ~= '' then
  recovery = redis.call('HINCRBY', KEYS[1], 'recovery_count', 1)
else
  recovery = tonumber(redis.call('HGET', KEYS[1], 'recovery_count') or '0')
end
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'epoch', epoch, 'lease_until', lease_until)
return {'OK', epoch, lease_until, recovery}
