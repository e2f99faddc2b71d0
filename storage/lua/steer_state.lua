-- A response's steering in one read: the queued input, the successor that committed it, or what became of it.
-- KEYS: state hash, steers list
-- ARGV: 'read', or 'resolve' with the outcome to record (only while input is queued and nothing resolved it) and
--       the ttl_ms the queued input is kept for from then (as long as the response it waits on)
-- Returns {queued list, successor or '', outcome or ''}.
local queued = redis.call('LRANGE', KEYS[2], 0, -1)
local successor = redis.call('HGET', KEYS[1], 'successor') or ''
local outcome = redis.call('HGET', KEYS[1], 'steer_outcome') or ''
if ARGV[1] == 'resolve' and #queued > 0 and successor == '' and outcome == '' then
  -- HSET on an existing hash keeps its TTL.
  redis.call('HSET', KEYS[1], 'steer_outcome', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  outcome = ARGV[2]
end
return {queued, successor, outcome}
