-- KEYS: done key, claim key, for each keyed copy fetched. ARGV: lease ms, then each copy's
-- claim token. Returns one reply per copy: 0 claimed (run it), a positive number the ms left on
-- another copy's claim (wait), or the id of the task that succeeded with the key (do not run).
-- Atomic: of copies fetched at once (by one worker or several), exactly one gets 0.
local lease = ARGV[1]
local out = {}
for i = 1, #KEYS, 2 do
  local done = redis.call('GET', KEYS[i])
  if done then
    out[#out + 1] = done
  else
    local token = ARGV[(i + 1) / 2 + 1]
    local holder = redis.call('GET', KEYS[i + 1])
    if not holder or holder == token then
      redis.call('SET', KEYS[i + 1], token, 'PX', lease)
      out[#out + 1] = 0
    else
      local left = redis.call('PTTL', KEYS[i + 1])
      if left < 1 then left = 1 end
      out[#out + 1] = left
    end
  end
end
return out
