-- KEYS: done key, claim key, for each keyed copy fetched. ARGV: lease ms, then each copy's
-- claim token. Returns one reply per copy: 0 claimed (run it), a positive number the ms left on
-- another copy's claim (wait), the id of the task that succeeded with the key (do not run), or
-- {error} when a command on its keys failed (a key of another type): that copy alone fails,
-- the batch's other copies are claimed as usual.
-- Atomic: of copies fetched at once (by one worker or several), exactly one gets 0.
local lease = ARGV[1]
local out = {}
local function claim(done_key, claim_key, token)
  local done = redis.call('GET', done_key)
  if done then return done end
  local holder = redis.call('GET', claim_key)
  if not holder or holder == token then
    redis.call('SET', claim_key, token, 'PX', lease)
    return 0
  end
  local left = redis.call('PTTL', claim_key)
  if left < 1 then left = 1 end
  return left
end
for i = 1, #KEYS, 2 do
  local ok, got = pcall(claim, KEYS[i], KEYS[i + 1], ARGV[(i + 1) / 2 + 1])
  if not ok then
    if type(got) == 'table' then got = got.err end
    got = {tostring(got)}
  end
  out[#out + 1] = got
end
return out
