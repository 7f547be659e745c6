-- One flush of a producer's group commit (brokers/group_commit.py), all of it or nothing.
-- KEYS[1..4]: the priority streams (CRITICAL .. LOW); KEYS[5]: the delayed sorted set.
-- ARGV[1..5]: how many messages follow for each stream, then how many delayed ones; then the
-- payloads of stream 1, of stream 2, ..., then the delayed ones as pairs (delay in ms, member:
-- one priority digit + payload). Every key written is checked first: a key of another type
-- fails the whole flush before anything is written (a script's writes are not rolled back).
-- Returns the number of messages written.
local counts = {}
local total = 0
for k = 1, 5 do
  counts[k] = tonumber(ARGV[k])
  if counts[k] > 0 then
    local t = redis.call('TYPE', KEYS[k])['ok']
    local want = (k == 5) and 'zset' or 'stream'
    if t ~= 'none' and t ~= want then
      return redis.error_reply('WRONGTYPE ' .. KEYS[k] .. ' holds a ' .. t .. ', not a ' .. want ..
        ': nothing of this flush was published')
    end
  end
  total = total + counts[k]
end
local i = 6
for k = 1, 4 do
  local key = KEYS[k]
  for _ = 1, counts[k] do
    redis.call('XADD', key, '*', 'm', ARGV[i])
    i = i + 1
  end
end
if counts[5] > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  for _ = 1, counts[5] do
    redis.call('ZADD', KEYS[5], now + tonumber(ARGV[i]), ARGV[i + 1])
    i = i + 2
  end
end
return total
