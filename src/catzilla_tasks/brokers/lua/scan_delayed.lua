-- KEYS[1]: a queue's delayed sorted set (members: one priority digit + payload). ARGV[1]: first
-- index to read, ARGV[2]: most members to read, ARGV[3]: 'count' or 'find', ARGV[4] (find): a
-- task id. Read-only, for the cluster view (cluster.py); the caller reads a big set in slices.
-- count: {members read, n0, n1, n2, n3}: members by their priority digit (others count as 2).
-- find:  {members read, member, score, ...}: members whose payload holds the task id (the caller
--        decodes those to be sure).
-- A key of another type under the delayed set's name is none of ours: read as empty.
if redis.call('TYPE', KEYS[1])['ok'] ~= 'zset' then
  if ARGV[3] == 'count' then return {0, 0, 0, 0, 0} end
  return {0}
end
local start = tonumber(ARGV[1])
local ms = redis.call('ZRANGE', KEYS[1], start, start + tonumber(ARGV[2]) - 1, 'WITHSCORES')
local out = {#ms / 2}
if ARGV[3] == 'count' then
  local n = {0, 0, 0, 0}
  for i = 1, #ms, 2 do
    local p = string.byte(ms[i], 1) - 48
    if p ~= 0 and p ~= 1 and p ~= 2 and p ~= 3 then p = 2 end
    n[p + 1] = n[p + 1] + 1
  end
  for i = 1, 4 do out[i + 1] = n[i] end
  return out
end
for i = 1, #ms, 2 do
  if string.find(ms[i], ARGV[4], 2, true) then
    out[#out + 1] = ms[i]
    out[#out + 1] = ms[i + 1]
  end
end
return out
