-- Rate limits (GCRA with reservation). KEYS: one rate key per task (P:rl:<name>[:<key>]).
-- ARGV: the emission interval of each key, in microseconds (period / N), in KEYS order.
-- Each task takes the next free slot of its key: the key holds the theoretical arrival time
-- (TAT, server microseconds); the slot is max(TAT, now), the TAT moves one interval past it.
-- Returns, per task, its slot (server ms, rounded up), then the server's time now (ms). The
-- slot is reserved: the task waits for it and then runs without asking again, so N tasks take N
-- slots, not N^2 asks.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[i])
  local tat = tonumber(redis.call('GET', key) or '0')
  local slot = tat
  if slot < now then slot = now end
  local nxt = slot + interval
  -- kept while it matters: until the TAT is in the past by an interval
  redis.call('SET', key, string.format('%.0f', nxt), 'PX', math.floor((nxt - now + interval) / 1000) + 1000)
  out[i] = math.ceil(slot / 1000)
end
out[#KEYS + 1] = math.floor(now / 1000)
return out
