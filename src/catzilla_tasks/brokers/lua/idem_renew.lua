-- KEYS: for each copy running here, its claim key and the stream of its entry. ARGV: lease ms,
-- group, consumer, then each copy's claim token and entry id. Extends each claim still held by
-- that token. A claim that is gone (its lease ran out while the worker stalled: a task holding
-- the GIL, a Redis outage) is taken back if the copy is still ours, i.e. its entry is still
-- pending for this consumer: a copy whose commit already acknowledged it (the heartbeat read its
-- list of claims before the commit) gets no claim again. A claim taken meanwhile by another copy
-- is left alone (that copy runs too: the lapse the guarantee excepts). Returns how many it holds.
local n = 0
for i = 1, #KEYS, 2 do
  local token = ARGV[i + 3]
  local holder = redis.call('GET', KEYS[i])
  if holder == token then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
    n = n + 1
  elseif not holder then
    local eid = ARGV[i + 4]
    local p = redis.pcall('XPENDING', KEYS[i + 1], ARGV[2], eid, eid, 1, ARGV[3])
    if type(p) == 'table' and p.err == nil and #p == 1 then
      redis.call('SET', KEYS[i], token, 'PX', ARGV[1])
      n = n + 1
    end
  end
end
return n
