-- Cancel one task (brokers/cancel.py): unless it has ended, its CANCELLED outcome is recorded
-- (waiters get TaskCancelled), its id joins the queue's cancelled set (a worker that fetches it
-- drops it; one running it asks it to stop) and the workers are told on the cancel channel.
-- KEYS[1]: the task's result key, KEYS[2]: the queue's cancelled set (id -> expiry ms).
-- ARGV[1]: the task id, ARGV[2]: the CANCELLED record, ARGV[3]: result TTL ms (0: results are
-- not kept), ARGV[4]: ms the id stays in the cancelled set, ARGV[5]: the cancel channel.
-- Returns 1 cancelled, 0 it had already ended (or was cancelled before).
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[4]))
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('RPUSH', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ttl)
end
redis.call('PUBLISH', ARGV[5], ARGV[1])
return 1
