-- Events after a sequence number: the entry id of that number depends on the epoch that wrote it, which the
-- state hash's claim record (`epochs`, `epoch:first sequence number` pairs) tells. Read-only.
-- KEYS: state hash, events stream
-- ARGV: after (sequence number, -1 for the start), count
local after = tonumber(ARGV[1])
local start = '-'
if after >= 0 then
  local epoch = 1
  local epochs = redis.call('HGET', KEYS[1], 'epochs') or ''
  for e, f in string.gmatch(epochs, '(%d+):(%d+)') do
    if tonumber(f) <= after and tonumber(e) > epoch then
      epoch = tonumber(e)
    end
  end
  start = '(' .. epoch .. '-' .. after
end
return redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', ARGV[2])
