-- KEYS: the four priority streams, CRITICAL first. ARGV: group, consumer, count.
-- Reads new entries in priority order until `count` are taken: a worker never takes more than
-- its free capacity, and a lower priority only when the higher ones are empty.
-- Returns a flat list: priority, entry id, field list, priority, entry id, ...
local want = tonumber(ARGV[3])
local out = {}
for i, key in ipairs(KEYS) do
  if want <= 0 then break end
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', want, 'STREAMS', key, '>')
  if r then
    local entries = r[1][2]
    for _, e in ipairs(entries) do
      out[#out + 1] = i - 1
      out[#out + 1] = e[1]
      out[#out + 1] = e[2]
    end
    want = want - #entries
  end
end
return out
