-- KEYS[1]: the delayed set. ARGV: members of it (a cancelled task's). Removes them; returns how
-- many were there (a member promoted meanwhile is in its stream: the workers drop it).
local n = 0
for i = 1, #ARGV do n = n + redis.call('ZREM', KEYS[1], ARGV[i]) end
return n
