-- KEYS[1]: the delayed sorted set, KEYS[2..5]: the priority streams. ARGV[1]: most to move.
-- Moves every due member into its stream (XADD + ZREM in one atomic step: nothing is lost or
-- doubled when several workers run it at once). Returns {moved, next due ms or false, now ms}.
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
