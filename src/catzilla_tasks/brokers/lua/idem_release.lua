-- KEYS[1]: claim key. ARGV[1]: the claim token. A copy ended without success (it failed, will
-- be retried, or never started): its claim goes, so a waiting copy may run.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
