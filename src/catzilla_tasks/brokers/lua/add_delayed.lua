-- KEYS[1]: the delayed sorted set; ARGV: delay in ms, member (one priority digit + payload).
-- The due time is taken from the Redis server's clock, so producers' clocks do not matter.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
return now
