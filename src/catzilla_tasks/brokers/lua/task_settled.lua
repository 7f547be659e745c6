-- A task ended for good (not a retry): what refers to it by its id lets it go.
-- KEYS[1]: its idempotency key's submit record (P:idem:<key>) or the empty string, KEYS[2]: the
-- marker of its schedule's run in progress (overlap=False) or the empty string.
-- ARGV[1]: the task id, ARGV[2]: ms the submit record is kept from now (the result's TTL; 0:
-- no result is kept, the record keeps its own TTL; -1: the task has no outcome at all (purged),
-- the record goes now).
if KEYS[1] ~= '' and redis.call('GET', KEYS[1]) == ARGV[1] then
  local ttl = tonumber(ARGV[2])
  local left = redis.call('PTTL', KEYS[1])
  if ttl < 0 then
    redis.call('DEL', KEYS[1])
  elseif ttl > 0 and (left < 0 or ttl < left) then
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
end
if KEYS[2] ~= '' and redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
