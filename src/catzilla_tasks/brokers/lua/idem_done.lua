-- KEYS[1]: done key, KEYS[2]: claim key. ARGV: the task id, done TTL ms, the claim token.
-- A copy succeeded: the key is done (the first success stays, if a copy whose lease had expired
-- also succeeded), and its claim is dropped if it still holds it.
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX')
return 1
