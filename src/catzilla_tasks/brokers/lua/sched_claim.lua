-- The claim of one tick of a cluster-wide periodic task (brokers/schedules.py). Every process
-- that declares the schedule calls this at each due time (and every heartbeat); the one whose
-- call finds the due time reached moves it on and queues the run, so a tick fires once however
-- many processes declare it. The server's clock decides (producers' clocks do not matter).
-- KEYS[1] the schedule's hash (spec, next, last, last_id, runs, skipped, missed, ...),
-- KEYS[2] its declarers (sorted set: process id -> last call, ms), KEYS[3] the marker of the run
-- in progress (overlap=False), KEYS[4] the queue's index of schedules (name -> last call, ms),
-- KEYS[5] the stream of the run's priority, KEYS[6] the delayed set.
-- ARGV[1] declarer id, ARGV[2] schedule name, ARGV[3] spec, ARGV[4] every ms (0: cron),
-- ARGV[5] first_run_now 0/1, ARGV[6] overlap 0/1, ARGV[7] the run's task id, ARGV[8] the run's
-- stream payload, ARGV[9] the run's delay ms (0: none), ARGV[10] marker TTL ms, ARGV[11] TTL ms
-- of the schedule's keys (refreshed by every call), ARGV[12] ms after which a declarer counts as
-- gone, ARGV[13] the priority digit, ARGV[14..]: for cron, the next due times (ms, ascending)
-- computed by the caller.
-- Returns {state, next due ms, now ms, missed}: state 0 not due, 1 fired, 2 skipped (the
-- previous run has not finished and overlap is off).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local every = tonumber(ARGV[4])
local keep = tonumber(ARGV[11])

local function after(x)  -- the first cron time given that is later than x
  for i = 14, #ARGV do
    local c = tonumber(ARGV[i])
    if c > x then return c end
  end
  return tonumber(ARGV[#ARGV])
end

redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[12]))
redis.call('ZADD', KEYS[4], now, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - keep)  -- schedules nobody declared for KEEP
redis.call('PEXPIRE', KEYS[2], keep)
redis.call('PEXPIRE', KEYS[4], keep)

local spec = redis.call('HGET', KEYS[1], 'spec')
local nxt = tonumber(redis.call('HGET', KEYS[1], 'next'))
if not nxt then  -- first declared: its first due time
  if ARGV[5] == '1' then
    nxt = now
  elseif every > 0 then
    nxt = now + every
  else
    nxt = after(now)
  end
  redis.call('HSET', KEYS[1], 'spec', ARGV[3], 'next', nxt, 'name', ARGV[2])
elseif spec ~= ARGV[3] then
  -- its spec changed (a deploy): the new spec's first due time if that is sooner, never a later
  -- one (while the old and the new version both declare it, each call would push it back)
  local first = every > 0 and now + every or after(now)
  if first < nxt then nxt = first end
  redis.call('HSET', KEYS[1], 'spec', ARGV[3], 'next', nxt, 'name', ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], keep)
if now < nxt then return {0, nxt, now, 0} end

-- due: this call takes the tick. Missed due times are skipped, not piled up.
local missed = 0
local following
if every > 0 then
  missed = math.floor((now - nxt) / every)
  following = nxt + (missed + 1) * every
else
  following = after(now)
  if following <= now then following = now + 1000 end  -- (the caller's clock far behind ours)
end
redis.call('HSET', KEYS[1], 'next', following)
if missed > 0 then redis.call('HINCRBY', KEYS[1], 'missed', missed) end
if ARGV[6] == '0' and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'skipped', 1)
  return {2, following, now, missed}
end
local delay = tonumber(ARGV[9])
if delay > 0 then
  redis.call('ZADD', KEYS[6], now + delay, ARGV[13] .. ARGV[8])
else
  redis.call('XADD', KEYS[5], '*', 'm', ARGV[8])
end
redis.call('HSET', KEYS[1], 'last', now, 'last_id', ARGV[7], 'last_due', nxt)
redis.call('HINCRBY', KEYS[1], 'runs', 1)
if ARGV[6] == '0' then redis.call('SET', KEYS[3], ARGV[7], 'PX', ARGV[10]) end
return {1, following, now, missed}
