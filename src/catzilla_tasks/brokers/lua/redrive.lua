-- KEYS[1]: the dead-letter stream, KEYS[2]: the priority stream to put the task back in,
-- KEYS[3] (when the task id is known): the task's result key. ARGV: the dead letter's id, the
-- payload to queue (with a fresh count of attempts). Queues it only if this call deleted the
-- dead letter: of several re-drives at once, one moves it (1), the others find it gone (0), so
-- no dead letter is queued twice. The failure recorded for the task goes with it: its waiters
-- get the re-run's outcome (pushed behind the old record, it would never be read).
-- A key of another type under the stream's name fails the move before anything is changed (a
-- script's writes before an error stay: the dead letter would be deleted and queued nowhere).
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind ~= 'stream' and kind ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[2] .. ' is not a stream: the dead letter stays')
end
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', 'm', ARGV[2])
if KEYS[3] then redis.call('DEL', KEYS[3]) end
return 1
