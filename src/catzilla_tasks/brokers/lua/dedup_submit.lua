-- Publish a task that has an idempotency key, unless a task with that key is queued, running or
-- finished within the key's TTL (brokers/dedup.py).
-- KEYS[1]: the key's submit record (P:idem:<key>: the id of the first task), KEYS[2]: the stream
-- of the task's priority, KEYS[3]: the delayed set.
-- ARGV[1]: the task id, ARGV[2]: TTL ms of the record, ARGV[3]: the payload, ARGV[4]: delay ms
-- (0: none), ARGV[5]: the priority digit.
-- Returns the id of the task that holds the key: ARGV[1] when this one was published.
local first = redis.call('GET', KEYS[1])
if first then return first end
local delay = tonumber(ARGV[4])
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]) + delay)
if delay > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[3], now + delay, ARGV[5] .. ARGV[3])
else
  redis.call('XADD', KEYS[2], '*', 'm', ARGV[3])
end
return ARGV[1]
