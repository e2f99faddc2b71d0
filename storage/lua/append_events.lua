-- Append events that continue the log and, with a snapshot, replace the snapshot in one step; refresh the retention
-- TTL. This is the append that carries a snapshot (status changes, and now and then between them), and the
-- checked append a writer sends after its store failed (the hot path appends deltas with plain XADDs instead,
-- fenced by their entry ids: see storage/keys.py).
-- Only the current owner, with the current epoch and an unexpired lease, may append (fencing): a writer that
-- was paused past its lease and taken over can never write again.
-- An append that ends the response may carry the webhook deliveries it owes: they enter the shard's outbox, due
-- at once, in this same step (never an ended response whose notification is lost, nor a notification of an end
-- that was not stored).
-- KEYS: state hash, events stream, input string, the shard's webhook outbox
-- ARGV: ttl_ms, snapshot ('' to keep the stored one), status, first_seq, owner, epoch,
--       after_loss ('1': the writer knows the log lost its last events and ends it past them),
--       n (outbox entries), then n outbox members, then (entry_id, type, data) per event
-- Returns 'OK', or 'CANCEL' (appended, and a cancel was requested), 'MISSING', 'CLOSED', 'CONFLICT', 'FENCED',
-- or {'REWOUND', last stored sequence number}: the log ends before events this writer had stored (a failover
-- to a replica that had not received them), so appending would leave a hole or reuse numbers already seen.
local state = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'lease_until', 'status', 'cancel_requested')
if not state[4] then
  return 'MISSING'
end
-- Fencing first: a writer that lost the response must hear exactly that, whatever else has been written since.
if state[1] ~= ARGV[5] or state[2] ~= ARGV[6] or tonumber(state[3]) < now_ms() then
  return 'FENCED'
end
local outbox_count = tonumber(ARGV[8])
local first_event = 9 + outbox_count
local count = (#ARGV - first_event + 1) / 3
local first = tonumber(ARGV[4])
local last, whole = log_tail(KEYS[2])
if ARGV[7] ~= '1' and not whole then
  return {'REWOUND', last}
end
-- How many of this batch are stored already: a retry of an append whose reply was lost, or of plain XADDs cut
-- off part way. The last of them is compared byte for byte, and only the rest is written.
local skip = 0
if last + 1 ~= first then
  if last + 1 < first then
    if ARGV[7] ~= '1' then
      return {'REWOUND', last}
    end
  else
    skip = math.min(last - first + 1, count)
    local base = first_event + 3 * (skip - 1)
    local stored = redis.call('XRANGE', KEYS[2], ARGV[base], ARGV[base])
    if #stored ~= 1 or stored[1][2][4] ~= ARGV[base + 2] then
      return 'CONFLICT'
    end
    if skip == count then
      return 'OK'
    end
  end
end
if TERMINAL[state[4]] then
  return 'CLOSED'
end
local ttl = ARGV[1]
for i = skip, count - 1 do
  local base = first_event + 3 * i
  redis.call('XADD', KEYS[2], ARGV[base], 't', ARGV[base + 1], 'd', ARGV[base + 2])
end
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'snapshot', ARGV[2], 'snap_seq', first + count - 1,
    'snap_id', ARGV[first_event + 3 * (count - 1)])
end
redis.call('HSET', KEYS[1], 'status', ARGV[3])
if TERMINAL[ARGV[3]] then
  -- Nothing may follow the terminal event: move the stream's last id past every id of this epoch, so even a
  -- plain XADD of this writer is refused from here on.
  redis.call('XSETID', KEYS[2], string.format('%d-0', tonumber(ARGV[6]) + 1))
  if outbox_count > 0 then
    local due = now_ms()
    for i = 9, 8 + outbox_count do
      redis.call('ZADD', KEYS[4], due, ARGV[i])
    end
    redis.call('PEXPIRE', KEYS[4], ttl)
  end
end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PEXPIRE', KEYS[3], ttl)
if state[5] == '1' then
  return 'CANCEL'
end
return 'OK'
