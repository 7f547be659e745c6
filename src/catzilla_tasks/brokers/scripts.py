"""Lua scripts the Redis broker runs server-side (each is atomic in Redis).

Each script is a file of ``lua/`` (its KEYS, ARGV and reply are described at its top), read
once at import; the names below are what the broker and the worker register."""

from pathlib import Path

_DIR = Path(__file__).with_name("lua")


def _load(filename: str) -> str:
    return (_DIR / filename).read_text(encoding="utf-8")


FETCH = _load("fetch.lua")

ADD_DELAYED = _load("add_delayed.lua")

PROMOTE = _load("promote.lua")

# -- idempotency keys ----------------------------------------------------------------------
# Per key K two strings: P:done:K, the id of the task that succeeded with it (TTL:
# idempotency_ttl), and P:run:K, the claim of the copy running now: "<consumer> <entry id>",
# a lease of visibility_timeout that its worker renews while the copy runs (IDEM_RENEW, with
# its heartbeat). A copy runs only after claiming the key; a copy that finds it claimed by
# another waits in the delayed set and looks again; one that finds it done adopts the result.

IDEM_CLAIM = _load("idem_claim.lua")

IDEM_RENEW = _load("idem_renew.lua")

IDEM_DONE = _load("idem_done.lua")

IDEM_RELEASE = _load("idem_release.lua")

COPY_RESULT = _load("copy_result.lua")

REDRIVE = _load("redrive.lua")

LEAVE_GROUPS = _load("leave_groups.lua")

PRUNE_CONSUMERS = _load("prune_consumers.lua")

BULK_XADD = _load("bulk_xadd.lua")

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

WF_STEP_DONE = _load("wf_step_done.lua")

WF_STEP_FAILED = _load("wf_step_failed.lua")

WF_CANCEL = _load("wf_cancel.lua")

# -- schedules, submit-time deduplication, cancellation (issue 19) --------------------------
# P:Q:sched:<name> (hash), P:Q:sched:<name>:who (declarers), P:Q:sched:<name>:run (the run in
# progress), P:Q:schedules (index); P:idem:<key> (the first task of an idempotency key);
# P:Q:cancelled (ids cancelled, sorted by expiry) and the channel P:Q:cancel.

SCHED_CLAIM = _load("sched_claim.lua")

TASK_SETTLED = _load("task_settled.lua")

DEDUP_SUBMIT = _load("dedup_submit.lua")

CANCEL_TASK = _load("cancel_task.lua")

UNSCHEDULE = _load("unschedule.lua")

# -- rate and concurrency limits (brokers/ratelimit.py) -----------------------------------------
# P:rl:<name>[:<key>]  a rate limit's theoretical arrival time (server us), with a TTL
# P:cc:<name>[:<key>]  leases of the tasks of a concurrency limit running now (sorted set)
# P:Q:cp:<name>[:<key>]  tasks of queue Q parked until one of those leases is free (sorted set)

RATE_LIMIT = _load("rate_limit.lua")

CONCURRENCY = _load("concurrency.lua")

# one flush of a producer's group commit: every message of it, or none (brokers/group_commit.py)
PUBLISH = _load("publish.lua")

# -- the cluster view (cluster.py): read-only scans of a stream or a delayed set, in slices ----

SCAN_STREAM = _load("scan_stream.lua")

SCAN_DELAYED = _load("scan_delayed.lua")
