-- KEYS: the priority streams. ARGV: group, this worker's consumer, least idle time in ms. Removes
-- the other consumers with nothing pending that have not been seen for that long: those of
-- workers killed (kill -9, a lost machine), which never leave themselves, once their entries were
-- reclaimed. Safe for a live worker too: its next read creates its consumer again. Returns how
-- many it removed.
local n = 0
local idle = tonumber(ARGV[3])
for _, key in ipairs(KEYS) do
  local cs = redis.pcall('XINFO', 'CONSUMERS', key, ARGV[1])
  if type(cs) == 'table' and cs.err == nil then
    for _, c in ipairs(cs) do
      local f = {}
      for i = 1, #c - 1, 2 do f[c[i]] = c[i + 1] end
      if f.name ~= ARGV[2] and f.pending == 0 and f.idle and f.idle > idle then
        redis.call('XGROUP', 'DELCONSUMER', key, ARGV[1], f.name)
        n = n + 1
      end
    end
  end
end
return n
