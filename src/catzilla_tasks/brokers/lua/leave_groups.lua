-- KEYS: the priority streams. ARGV: group, consumer. A worker that stopped removes its consumer
-- from each group where nothing is pending for it (else every worker process ever started would
-- stay listed in the groups). XGROUP DELCONSUMER would drop pending entries, never to be
-- redelivered, hence the check in the same atomic step; a group where some are pending keeps it
-- (a live worker reclaims them after the visibility timeout). Returns how many groups it left.
local n = 0
for _, key in ipairs(KEYS) do
  local p = redis.pcall('XPENDING', key, ARGV[1], '-', '+', 1, ARGV[2])
  if type(p) == 'table' and p.err == nil and #p == 0 then
    redis.call('XGROUP', 'DELCONSUMER', key, ARGV[1], ARGV[2])
    n = n + 1
  end
end
return n
