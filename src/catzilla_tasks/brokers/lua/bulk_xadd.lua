-- KEYS[1]: a priority stream; ARGV: payloads. One XADD each, in one call: a batch of producer
-- tasks costs one command to build and send instead of one per task.
for _, m in ipairs(ARGV) do
  redis.call('XADD', KEYS[1], '*', 'm', m)
end
return #ARGV
