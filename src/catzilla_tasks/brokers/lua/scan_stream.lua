-- KEYS[1]: a stream (a priority stream or the dead letters). ARGV[1]: where to start ('-', or
-- '(' and the last entry id read), ARGV[2]: most entries to read, ARGV[3]: 'count' or 'find',
-- ARGV[4] (find): a task id.
-- Read-only, for the cluster view (cluster.py); the caller reads a long stream in slices.
-- count: {last id read or false, n0, n1, n2, n3}: entries by their field 'p' (a dead letter's
--        priority; anything else counts as 2, NORMAL).
-- find:  {last id read or false, id, ...}: entries whose field 'i' is the task id or whose
--        field 'm' (the payload) holds it (the caller decodes those to be sure).
-- A key of another type under a queue's name is none of ours: read as empty (as queues() counts it).
if redis.call('TYPE', KEYS[1])['ok'] ~= 'stream' then
  if ARGV[3] == 'count' then return {false, 0, 0, 0, 0} end
  return {false}
end
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', tonumber(ARGV[2]))
local last = false
if #entries > 0 then last = entries[#entries][1] end
local out = {last}
if ARGV[3] == 'count' then
  local n = {0, 0, 0, 0}
  for _, e in ipairs(entries) do
    local f, p = e[2], 2
    for i = 1, #f, 2 do
      if f[i] == 'p' then
        local v = tonumber(f[i + 1])
        if v == 0 or v == 1 or v == 2 or v == 3 then p = v end
      end
    end
    n[p + 1] = n[p + 1] + 1
  end
  for i = 1, 4 do out[i + 1] = n[i] end
  return out
end
local id = ARGV[4]
for _, e in ipairs(entries) do
  local f = e[2]
  for i = 1, #f, 2 do
    if (f[i] == 'i' and f[i + 1] == id) or (f[i] == 'm' and string.find(f[i + 1], id, 1, true)) then
      out[#out + 1] = e[1]
      break
    end
  end
end
return out
