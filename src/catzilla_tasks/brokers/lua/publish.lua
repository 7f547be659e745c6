-- One flush of a producer's group commit (brokers/group_commit.py), all of it or nothing.
-- KEYS: five per queue the flush publishes to: its four priority streams (CRITICAL .. LOW),
-- then its delayed sorted set.
-- ARGV[1..#KEYS]: how many messages go to each key; then, key by key in the same order, the
-- payloads of each stream, and for each delayed set its pairs (delay in ms, member: one priority
-- digit + payload). Every key written is checked first: a key of another type fails the whole
-- flush before anything is written (a script's writes are not rolled back).
-- Returns the number of messages written.
local n = #KEYS
local counts = {}
local total = 0
for k = 1, n do
  counts[k] = tonumber(ARGV[k])
  if counts[k] > 0 then
    local t = redis.call('TYPE', KEYS[k])['ok']
    local want = (k % 5 == 0) and 'zset' or 'stream'
    if t ~= 'none' and t ~= want then
      return redis.error_reply('WRONGTYPE ' .. KEYS[k] .. ' holds a ' .. t .. ', not a ' .. want ..
        ': nothing of this flush was published')
    end
  end
  total = total + counts[k]
end
local i = n + 1
local now = nil
for k = 1, n do
  local key = KEYS[k]
  if k % 5 == 0 then
    if counts[k] > 0 and now == nil then
      local t = redis.call('TIME')
      now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    end
    for _ = 1, counts[k] do
      redis.call('ZADD', key, now + tonumber(ARGV[i]), ARGV[i + 1])
      i = i + 2
    end
  else
    for _ = 1, counts[k] do
      redis.call('XADD', key, '*', 'm', ARGV[i])
      i = i + 1
    end
  end
end
return total
