-- Concurrency limits: a sorted set of leases per task name (and key), P:cc:<name>[:<key>]
-- (member: a delivery's lease id, score: its expiry in server ms), and a sorted set of the
-- tasks parked until a lease is free, P:cp:<name>[:<key>] (member: one priority digit + the
-- message, score: arrival in server microseconds, so they go on in order).
-- ARGV[1] is the mode:
--   acquire  KEYS: lease set, park set per task (pairs). ARGV: mode, lease ms, then per task
--            limit, lease id, parked member. Returns per task 1 (leased) or 0 (parked).
--   release  KEYS: lease set, park set, the 4 priority streams of the task's queue.
--            ARGV: mode, limit, lease id. Drops the lease and wakes parked tasks into their
--            streams while fewer than the limit hold leases. Returns the number woken.
--   renew    KEYS: lease set, park set, 4 streams (one group per lease set). ARGV: mode,
--            lease ms, limit, group, consumer, lease ids...: extends the leases held, drops
--            expired ones (a dead worker's) and wakes parked tasks for the room they leave. A
--            lease of ours that is gone (it lapsed while the worker could not reach Redis) is
--            taken back while its entry is still pending for this consumer (its task still runs
--            here: without it one more task would start than the limit); one whose commit
--            already acknowledged it (the heartbeat read its list before) is not. Returns the
--            number woken.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mode = ARGV[1]

local function wake(lease, park, streams_at, limit)
  local free = limit - redis.call('ZCARD', lease)
  local woken = 0
  while free > 0 do
    local m = redis.call('ZPOPMIN', park)
    if not m[1] then break end
    local p = string.byte(m[1], 1) - 47
    if p < 1 or p > 4 then p = 3 end
    redis.call('XADD', KEYS[streams_at + p - 1], '*', 'm', string.sub(m[1], 2))
    free = free - 1
    woken = woken + 1
  end
  return woken
end

if mode == 'acquire' then
  local lease_ms = tonumber(ARGV[2])
  local out = {}
  local n = #KEYS / 2
  for i = 1, n do
    local lease, park = KEYS[2 * i - 1], KEYS[2 * i]
    local a = 3 + (i - 1) * 3
    local limit, id, member = tonumber(ARGV[a]), ARGV[a + 1], ARGV[a + 2]
    redis.call('ZREMRANGEBYSCORE', lease, '-inf', now_ms)
    if redis.call('ZSCORE', lease, id) or redis.call('ZCARD', lease) < limit then
      redis.call('ZADD', lease, now_ms + lease_ms, id)
      redis.call('PEXPIRE', lease, lease_ms * 2)
      out[i] = 1
    else
      redis.call('ZADD', park, 'NX', now_us, member)
      out[i] = 0
    end
  end
  return out
elseif mode == 'release' then
  redis.call('ZREM', KEYS[1], ARGV[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
  return wake(KEYS[1], KEYS[2], 3, tonumber(ARGV[2]))
elseif mode == 'renew' then
  local lease_ms = tonumber(ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
  for i = 6, #ARGV do
    local id = ARGV[i]
    if redis.call('ZADD', KEYS[1], 'XX', 'CH', now_ms + lease_ms, id) == 0 and not redis.call('ZSCORE', KEYS[1], id) then
      local eid = string.match(id, ':([^:]+)$')
      for s = 3, 6 do
        local p = eid and redis.pcall('XPENDING', KEYS[s], ARGV[4], eid, eid, 1, ARGV[5])
        if type(p) == 'table' and p.err == nil and #p == 1 then
          redis.call('ZADD', KEYS[1], now_ms + lease_ms, id)
          break
        end
      end
    end
  end
  if #ARGV >= 6 then redis.call('PEXPIRE', KEYS[1], lease_ms * 2) end
  return wake(KEYS[1], KEYS[2], 3, tonumber(ARGV[3]))
end
return redis.error_reply('concurrency.lua: unknown mode ' .. tostring(mode))
