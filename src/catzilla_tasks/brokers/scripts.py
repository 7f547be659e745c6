"""Lua scripts the Redis broker runs server-side (each is atomic in Redis)."""

# KEYS: the four priority streams, CRITICAL first. ARGV: group, consumer, count.
# Reads new entries in priority order until `count` are taken: a worker never takes more than
# its free capacity, and a lower priority only when the higher ones are empty.
# Returns a flat list: priority, entry id, field list, priority, entry id, ...
FETCH = """
local want = tonumber(ARGV[3])
local out = {}
for i, key in ipairs(KEYS) do
  if want <= 0 then break end
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', want, 'STREAMS', key, '>')
  if r then
    local entries = r[1][2]
    for _, e in ipairs(entries) do
      out[#out + 1] = i - 1
      out[#out + 1] = e[1]
      out[#out + 1] = e[2]
    end
    want = want - #entries
  end
end
return out
"""

# KEYS[1]: the delayed sorted set; ARGV: delay in ms, member (one priority digit + payload).
# The due time is taken from the Redis server's clock, so producers' clocks do not matter.
ADD_DELAYED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
return now
"""

# KEYS[1]: the delayed sorted set, KEYS[2..5]: the priority streams. ARGV[1]: most to move.
# Moves every due member into its stream (XADD + ZREM in one atomic step: nothing is lost or
# doubled when several workers run it at once). Returns {moved, next due ms or false, now ms}.
PROMOTE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, m in ipairs(due) do
  local p = string.byte(m, 1) - 47
  if p < 1 or p > 4 then p = 3 end
  redis.call('XADD', KEYS[1 + p], '*', 'm', string.sub(m, 2))
  redis.call('ZREM', KEYS[1], m)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local n = false
if nxt[2] then n = nxt[2] end
return {#due, n, now}
"""

# KEYS[1]: the result of the task that first finished with an idempotency key, KEYS[2]: the
# result key of a duplicate of it. ARGV: TTL in ms, a record to store if the first has expired.
# The duplicate's waiters get the first run's outcome.
COPY_RESULT = """
local v = redis.call('LINDEX', KEYS[1], 0)
if not v then v = ARGV[2] end
redis.call('RPUSH', KEYS[2], v)
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
"""

# KEYS[1]: a priority stream; ARGV: payloads. One XADD each, in one call: a batch of producer
# tasks costs one command to build and send instead of one per task.
BULK_XADD = """
for _, m in ipairs(ARGV) do
  redis.call('XADD', KEYS[1], '*', 'm', m)
end
return #ARGV
"""
