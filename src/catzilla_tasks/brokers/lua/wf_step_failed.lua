-- KEYS[1]: the run's hash, KEYS[2]: the run's result key. ARGV: the failure record, TTL in ms.
-- The first failure ends the run: no step is released any more, queued ones are skipped.
if redis.call('HGET', KEYS[1], 'state') ~= 'run' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'failed')
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
