-- KEYS[1]: a workflow run's hash, KEYS[2]: the run's result key. ARGV: the cancellation record,
-- TTL in ms. Ends a running run as cancelled: no step is released any more and queued ones are
-- skipped (as after a failure); steps running now finish. 1 cancelled, 0 the run had already
-- ended, -1 no such run (a plain task, or a run whose hash has expired).
local s = redis.call('HGET', KEYS[1], 'state')
if not s then return -1 end
if s ~= 'run' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'cancelled')
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
