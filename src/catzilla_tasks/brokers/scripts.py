"""Lua scripts the Redis broker runs server-side (each is atomic in Redis)."""

# KEYS: the four priority streams, CRITICAL first. ARGV: group, consumer, count.
# Reads new entries in priority order until `count` are taken: a worker never takes more than
# its free capacity, and a lower priority only when the higher ones are empty.
# Returns a flat list: priority, entry id, field list, priority, entry id, ...
FETCH = """
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
"""

# KEYS[1]: the delayed sorted set; ARGV: delay in ms, member (one priority digit + payload).
# The due time is taken from the Redis server's clock, so producers' clocks do not matter.
ADD_DELAYED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
return now
"""

# KEYS[1]: the delayed sorted set, KEYS[2..5]: the priority streams. ARGV[1]: most to move.
# Moves every due member into its stream (XADD + ZREM in one atomic step: nothing is lost or
# doubled when several workers run it at once). Returns {moved, next due ms or false, now ms}.
PROMOTE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, m in ipairs(due) do
  local p = string.byte(m, 1) - 47
  if p < 1 or p > 4 then p = 3 end
  redis.call('XADD', KEYS[1 + p], '*', 'm', string.sub(m, 2))
  redis.call('ZREM', KEYS[1], m)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local n = false
if nxt[2] then n = nxt[2] end
return {#due, n, now}
"""

# -- idempotency keys ----------------------------------------------------------------------
# Per key K two strings: P:done:K, the id of the task that succeeded with it (TTL:
# idempotency_ttl), and P:run:K, the claim of the copy running now: "<consumer> <entry id>",
# a lease of visibility_timeout that its worker renews while the copy runs (IDEM_RENEW, with
# its heartbeat). A copy runs only after claiming the key; a copy that finds it claimed by
# another waits in the delayed set and looks again; one that finds it done adopts the result.

# KEYS: done key, claim key, for each keyed copy fetched. ARGV: lease ms, then each copy's
# claim token. Returns one reply per copy: 0 claimed (run it), a positive number the ms left on
# another copy's claim (wait), the id of the task that succeeded with the key (do not run), or
# {error} when a command on its keys failed (a key of another type): that copy alone fails,
# the batch's other copies are claimed as usual.
# Atomic: of copies fetched at once (by one worker or several), exactly one gets 0.
IDEM_CLAIM = """
local lease = ARGV[1]
local out = {}
local function claim(done_key, claim_key, token)
  local done = redis.call('GET', done_key)
  if done then return done end
  local holder = redis.call('GET', claim_key)
  if not holder or holder == token then
    redis.call('SET', claim_key, token, 'PX', lease)
    return 0
  end
  local left = redis.call('PTTL', claim_key)
  if left < 1 then left = 1 end
  return left
end
for i = 1, #KEYS, 2 do
  local ok, got = pcall(claim, KEYS[i], KEYS[i + 1], ARGV[(i + 1) / 2 + 1])
  if not ok then
    if type(got) == 'table' then got = got.err end
    got = {tostring(got)}
  end
  out[#out + 1] = got
end
return out
"""

# KEYS: for each copy running here, its claim key and the stream of its entry. ARGV: lease ms,
# group, consumer, then each copy's claim token and entry id. Extends each claim still held by
# that token. A claim that is gone (its lease ran out while the worker stalled: a task holding
# the GIL, a Redis outage) is taken back if the copy is still ours, i.e. its entry is still
# pending for this consumer: a copy whose commit already acknowledged it (the heartbeat read its
# list of claims before the commit) gets no claim again. A claim taken meanwhile by another copy
# is left alone (that copy runs too: the lapse the guarantee excepts). Returns how many it holds.
IDEM_RENEW = """
local n = 0
for i = 1, #KEYS, 2 do
  local token = ARGV[i + 3]
  local holder = redis.call('GET', KEYS[i])
  if holder == token then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
    n = n + 1
  elseif not holder then
    local eid = ARGV[i + 4]
    local p = redis.pcall('XPENDING', KEYS[i + 1], ARGV[2], eid, eid, 1, ARGV[3])
    if type(p) == 'table' and p.err == nil and #p == 1 then
      redis.call('SET', KEYS[i], token, 'PX', ARGV[1])
      n = n + 1
    end
  end
end
return n
"""

# KEYS[1]: done key, KEYS[2]: claim key. ARGV: the task id, done TTL ms, the claim token.
# A copy succeeded: the key is done (the first success stays, if a copy whose lease had expired
# also succeeded), and its claim is dropped if it still holds it.
IDEM_DONE = """
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX')
return 1
"""

# KEYS[1]: claim key. ARGV[1]: the claim token. A copy ended without success (it failed, will
# be retried, or never started): its claim goes, so a waiting copy may run.
IDEM_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS[1]: the result of the task that first finished with an idempotency key, KEYS[2]: the
# result key of a duplicate of it. ARGV: TTL in ms, a record to store if the first has expired.
# The duplicate's waiters get the first run's outcome.
COPY_RESULT = """
local v = redis.call('LINDEX', KEYS[1], 0)
if not v then v = ARGV[2] end
redis.call('RPUSH', KEYS[2], v)
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
"""

# KEYS[1]: the dead-letter stream, KEYS[2]: the priority stream to put the task back in,
# KEYS[3] (when the task id is known): the task's result key. ARGV: the dead letter's id, the
# payload to queue (with a fresh count of attempts). Queues it only if this call deleted the
# dead letter: of several re-drives at once, one moves it (1), the others find it gone (0), so
# no dead letter is queued twice. The failure recorded for the task goes with it: its waiters
# get the re-run's outcome (pushed behind the old record, it would never be read).
REDRIVE = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', 'm', ARGV[2])
if KEYS[3] then redis.call('DEL', KEYS[3]) end
return 1
"""

# KEYS: the priority streams. ARGV: group, consumer. A worker that stopped removes its consumer
# from each group where nothing is pending for it (else every worker process ever started would
# stay listed in the groups). XGROUP DELCONSUMER would drop pending entries, never to be
# redelivered, hence the check in the same atomic step; a group where some are pending keeps it
# (a live worker reclaims them after the visibility timeout). Returns how many groups it left.
LEAVE_GROUPS = """
local n = 0
for _, key in ipairs(KEYS) do
  local p = redis.pcall('XPENDING', key, ARGV[1], '-', '+', 1, ARGV[2])
  if type(p) == 'table' and p.err == nil and #p == 0 then
    redis.call('XGROUP', 'DELCONSUMER', key, ARGV[1], ARGV[2])
    n = n + 1
  end
end
return n
"""

# KEYS: the priority streams. ARGV: group, this worker's consumer, least idle time in ms. Removes
# the other consumers with nothing pending that have not been seen for that long: those of
# workers killed (kill -9, a lost machine), which never leave themselves, once their entries were
# reclaimed. Safe for a live worker too: its next read creates its consumer again. Returns how
# many it removed.
PRUNE_CONSUMERS = """
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
"""

# KEYS[1]: a priority stream; ARGV: payloads. One XADD each, in one call: a batch of producer
# tasks costs one command to build and send instead of one per task.
BULK_XADD = """
for _, m in ipairs(ARGV) do
  redis.call('XADD', KEYS[1], '*', 'm', m)
end
return #ARGV
"""

# -- workflows across workers --------------------------------------------------------------
# A workflow run lives in one hash P:wf:<run id> (written by the producer in one MULTI with
# the XADD of the steps that have no dependencies):
#   state     "run", then "done" or "failed" (only the first outcome is written)
#   left      steps that have not succeeded yet
#   n         number of steps
#   p:<j>     dependencies of step j still to succeed
#   d:<j>     the steps that depend on step j, comma-separated indexes
#   m:<j>     step j's message, one priority digit + payload (XADDed when p:<j> reaches 0)
#   k:<j>     step j's id, encoded as a key of the final result (msgpack or JSON)
#   v:<j>     step j's value, as a result payload (format byte + value), once it succeeded
#   head, sep, colon, tail: the pieces that make {step id: value, ...} a result record in the
#             workflow's format (so the record is built by concatenation, byte-exact)
#   ttl       ms the hash lives while no step succeeds (its PEXPIRE, set by the producer and
#             restarted by each step that succeeds: a run that never ends does not stay forever)
# Run by a worker in the MULTI transaction that acknowledges the step.

# KEYS[1]: the run's hash, KEYS[2]: the run's result key, KEYS[3..6]: the priority streams,
# KEYS[7]: the delayed sorted set. ARGV: step index, its value (format byte + value), result
# TTL in ms. Records the value once (a step re-run after its worker died is counted once),
# counts down its dependents and queues each one that reaches zero (XADD, or ZADD into the
# delayed set when the step has a delay_ms: field y:<index>); the last step writes the result.
WF_STEP_DONE = """
local h = KEYS[1]
if redis.call('HGET', h, 'state') ~= 'run' then return -1 end
local j = ARGV[1]
if redis.call('HSETNX', h, 'v:' .. j, ARGV[2]) == 0 then return -2 end
local ttl = redis.call('HGET', h, 'ttl')
if ttl then redis.call('PEXPIRE', h, ttl) end
local released = 0
local deps = redis.call('HGET', h, 'd:' .. j)
if deps and deps ~= '' then
  for d in string.gmatch(deps, '[^,]+') do
    if redis.call('HINCRBY', h, 'p:' .. d, -1) == 0 then
      local m = redis.call('HGET', h, 'm:' .. d)
      local y = redis.call('HGET', h, 'y:' .. d)
      if y then
        -- a step with delay_ms waits in the delayed set (as a delayed task), due on the server's clock
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        redis.call('ZADD', KEYS[7], now + tonumber(y), m)
      else
        local p = string.byte(m, 1) - 47
        if p < 1 or p > 4 then p = 3 end
        redis.call('XADD', KEYS[2 + p], '*', 'm', string.sub(m, 2))
      end
      released = released + 1
    end
  end
end
if redis.call('HINCRBY', h, 'left', -1) == 0 then
  local f = redis.call('HMGET', h, 'n', 'head', 'sep', 'colon', 'tail')
  local n = tonumber(f[1])
  local out = {f[2]}
  for i = 0, n - 1 do
    if i > 0 then out[#out + 1] = f[3] end
    out[#out + 1] = redis.call('HGET', h, 'k:' .. i)
    out[#out + 1] = f[4]
    out[#out + 1] = string.sub(redis.call('HGET', h, 'v:' .. i), 2)
  end
  out[#out + 1] = f[5]
  redis.call('RPUSH', KEYS[2], table.concat(out))
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  redis.call('HSET', h, 'state', 'done')
  redis.call('PEXPIRE', h, ARGV[3])
end
return released
"""

# KEYS[1]: the run's hash, KEYS[2]: the run's result key. ARGV: the failure record, TTL in ms.
# The first failure ends the run: no step is released any more, queued ones are skipped.
WF_STEP_FAILED = """
if redis.call('HGET', KEYS[1], 'state') ~= 'run' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'failed')
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS[1]: a workflow run's hash, KEYS[2]: the run's result key. ARGV: the cancellation record,
# TTL in ms. Ends a running run as cancelled: no step is released any more and queued ones are
# skipped (as after a failure); steps running now finish. 1 cancelled, 0 the run had already
# ended, -1 no such run (a plain task, or a run whose hash has expired).
WF_CANCEL = """
local s = redis.call('HGET', KEYS[1], 'state')
if not s then return -1 end
if s ~= 'run' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'cancelled')
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
