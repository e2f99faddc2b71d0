-- Leases of running responses, and their place in the run index (scored by lease expiry, so an orphan is due the
-- moment its lease runs out). The owner renews or releases its lease; another instance claims a response whose
-- lease has expired, or that waits unowned in the queue, which bumps the epoch and so fences the old owner out.
-- KEYS: state hash, run index, queue, events stream
-- ARGV: action ('renew' | 'release' | 'claim'), response_id, owner, epoch (renew/release) or '' (claim), lease_ms,
--       ttl_ms, and for renew the last sequence number the owner has stored (-1: none to check)
-- renew   -> {'OK', lease_until, cancel_requested} | {'LOST'} | {'GONE'}
--            | {'REWOUND', last stored sequence number, lease_until} (renewed, but the log lost events its owner
--              had stored: a failover)
-- release -> {'OK', 0, cancel_requested} | {'LOST'} | {'GONE'}   (due now: someone else may claim it at once)
-- claim   -> {'OK', epoch, lease_until, recovery_count, cancel_requested} | {'BUSY'} | {'GONE'}
local state = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'lease_until', 'status', 'cancel_requested')
if not state[4] or TERMINAL[state[4]] then
  -- Nothing to run: it never waits in the queue (an expired or ended one would block its head), and one that is
  -- gone has no follow-ups left either. An ended one stays indexed until its follow-ups are settled.
  redis.call('ZREM', KEYS[3], ARGV[2])
  if not state[4] then
    redis.call('ZREM', KEYS[2], ARGV[2])
  end
  return {'GONE'}
end
local now = now_ms()
local action = ARGV[1]
local cancel = state[5] or '0'
if action == 'renew' or action == 'release' then
  if state[1] ~= ARGV[3] or state[2] ~= ARGV[4] or tonumber(state[3]) < now then
    return {'LOST'}
  end
  local lease_until = now + tonumber(ARGV[5])
  if action == 'release' then
    lease_until = 0
  end
  redis.call('HSET', KEYS[1], 'lease_until', lease_until)
  redis.call('ZADD', KEYS[2], lease_until, ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
  if action == 'renew' and tonumber(ARGV[7]) >= 0 then
    local last, whole = log_tail(KEYS[4])
    if last < tonumber(ARGV[7]) or not whole then
      -- Renewed all the same: the owner needs the time to end the response past the loss.
      return {'REWOUND', last, lease_until}
    end
  end
  return {'OK', lease_until, cancel}
end
-- claim
if state[1] ~= '' and tonumber(state[3]) >= now then
  return {'BUSY'}
end
-- Epochs grow with time as well as by one: a claim that a failover lost (with the events written under it) is
-- never made again under the same number, so an event a client saw and one written in its place never share an
-- entry id, and a client's cursor (`<sequence number>.<epoch>`) tells which of them it saw.
local epoch = math.max(tonumber(state[2]) + 1, now_ms())
local lease_until = now + tonumber(ARGV[5])
local recovery = 0
if state[1] ~= '' then
  recovery = redis.call('HINCRBY', KEYS[1], 'recovery_count', 1)
else
  recovery = tonumber(redis.call('HGET', KEYS[1], 'recovery_count') or '0')
end
redis.call('HSET', KEYS[1], 'owner', ARGV[3], 'epoch', string.format('%d', epoch), 'lease_until', lease_until)
-- Fence the old owner out of the event stream too: its appends' ids start with its own, older epoch, so once the
-- stream's last id is `<epoch>-<last>` Redis refuses them. Record where this epoch starts writing, for readers
-- that turn a sequence number into an entry id.
local last = log_tail(KEYS[4])
if last >= 0 then
  redis.call('XSETID', KEYS[4], string.format('%d-%d', epoch, last))
  local epochs = redis.call('HGET', KEYS[1], 'epochs') or '1:0'
  redis.call('HSET', KEYS[1], 'epochs', string.format('%s,%d:%d', epochs, epoch, last + 1))
end
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('ZADD', KEYS[2], lease_until, ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return {'OK', epoch, lease_until, recovery, cancel}
