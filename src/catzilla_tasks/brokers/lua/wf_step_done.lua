-- KEYS[1]: the run's hash, KEYS[2]: the run's result key, KEYS[3..6]: the priority streams,
-- KEYS[7]: the delayed sorted set. ARGV: step index, its value (format byte + value), result
-- TTL in ms. Records the value once (a step re-run after its worker died is counted once),
-- counts down its dependents and queues each one that reaches zero (XADD, or ZADD into the
-- delayed set when the step has a delay_ms: field y:<index>); the last step writes the result.
local h = KEYS[1]
if redis.call('HGET', h, 'state') ~= 'run' then return -1 end
local j = ARGV[1]
if redis.call('HSETNX', h, 'v:' .. j, ARGV[2]) == 0 then return -2 end
local ttl = redis.call('HGET', h, 'ttl')
if ttl then redis.call('PEXPIRE', h, ttl) end
local released = 0
local deps = redis.call('HGET', h, 'd:' .. j)
if deps and deps ~= '' then
  for d in string.gmatch(deps, '[^,]+') do
    if redis.call('HINCRBY', h, 'p:' .. d, -1) == 0 then
      local m = redis.call('HGET', h, 'm:' .. d)
      local y = redis.call('HGET', h, 'y:' .. d)
      if y then
        -- a step with delay_ms waits in the delayed set (as a delayed task), due on the server's clock
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        redis.call('ZADD', KEYS[7], now + tonumber(y), m)
      else
        local p = string.byte(m, 1) - 47
        if p < 1 or p > 4 then p = 3 end
        redis.call('XADD', KEYS[2 + p], '*', 'm', string.sub(m, 2))
      end
      released = released + 1
    end
  end
end
if redis.call('HINCRBY', h, 'left', -1) == 0 then
  local f = redis.call('HMGET', h, 'n', 'head', 'sep', 'colon', 'tail')
  local n = tonumber(f[1])
  local out = {f[2]}
  for i = 0, n - 1 do
    if i > 0 then out[#out + 1] = f[3] end
    out[#out + 1] = redis.call('HGET', h, 'k:' .. i)
    out[#out + 1] = f[4]
    out[#out + 1] = string.sub(redis.call('HGET', h, 'v:' .. i), 2)
  end
  out[#out + 1] = f[5]
  redis.call('RPUSH', KEYS[2], table.concat(out))
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  redis.call('HSET', h, 'state', 'done')
  redis.call('PEXPIRE', h, ARGV[3])
end
return released
