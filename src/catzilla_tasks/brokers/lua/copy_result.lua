-- KEYS[1]: the result of the task that first finished with an idempotency key, KEYS[2]: the
-- result key of a duplicate of it. ARGV: TTL in ms, a record to store if the first has expired.
-- The duplicate's waiters get the first run's outcome.
local v = redis.call('LINDEX', KEYS[1], 0)
if not v then v = ARGV[2] end
redis.call('RPUSH', KEYS[2], v)
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
