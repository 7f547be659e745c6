"""The consumer side of the Redis broker: one worker's :class:`~.base.ConsumerSession` on the
priority streams (what ``RedisBroker.consumer(name)`` returns to a :class:`~.worker.Worker`).

A worker is a consumer of one group on every priority stream. Fetching is one Lua script
(``fetch.lua``: at most the free capacity, in priority order) and a blocking XREADGROUP when
there is nothing; delayed tasks (a sorted set) are moved into the streams by ``promote.lua``;
the tasks of dead workers are taken over by XAUTOCLAIM; a live worker's heartbeat re-claims
(XCLAIM) what it holds. A batch of outcomes is one MULTI transaction: results, idempotency
keys, retries into the delayed set, dead letters, workflow step releases, then XACK + XDEL of
the entries whose commands all succeeded. The transaction also sets a per-consumer mark key to
the batch's token: when the connection drops during EXEC, the retry reads it back to learn
whether Redis applied the batch (applying it twice would write dead letters and retries twice).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from . import scripts
from .base import CommitJob, ConsumerSession, Entries, Outcome
from .ratelimit import RedisLimits
from .redis import GROUP, RedisBroker

log = logging.getLogger("catzilla_tasks.worker")

__all__ = ["RedisConsumer"]

# XREADGROUP's reply from a client without decode_responses: [(stream, [(id, fields), ...])],
# fields None for an entry deleted while pending
_Read = list[tuple[bytes, list[tuple[bytes, "dict[bytes, bytes] | None"]]]]

# Redis's smallest allowed proto-max-bulk-len: a record this small never exceeds the server's limit
_SMALLEST_BULK_LIMIT = 1024 * 1024


def _payload(fields: Any) -> bytes | str:
    """The message of a stream entry's fields, or why there is none."""
    if isinstance(fields, dict):
        payload = fields.get(b"m")
    else:
        payload = None
        for i in range(0, len(fields) - 1, 2):
            if fields[i] == b"m":
                payload = fields[i + 1]
                break
    if payload is None:
        return f"DecodeError: stream entry without an 'm' field: {fields!r:.200}"
    return cast(bytes, payload)


class RedisConsumer(ConsumerSession):
    """One worker's consumer on a :class:`~.redis.RedisBroker`'s streams (see the module
    docstring)."""

    # Redis ends a blocked read at its `hz` tick (100 ms by default), not at its block: a delayed
    # task due sooner (a rate limit's next slot) would be promoted up to 100 ms late
    fetch_granularity_ms = 100

    def __init__(self, broker: RedisBroker, name: str) -> None:
        import redis

        self.broker = broker
        self.name = name
        self.unavailable = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
        self.refused = (redis.ResponseError,)
        self.errors = (redis.RedisError,)
        r = broker.redis
        self._r = r
        self._fetch = r.register_script(scripts.FETCH)
        self._promote = r.register_script(scripts.PROMOTE)
        self._add_delayed = r.register_script(scripts.ADD_DELAYED)
        self._copy_result = r.register_script(scripts.COPY_RESULT)
        self._wf_done = r.register_script(scripts.WF_STEP_DONE)
        self._wf_failed = r.register_script(scripts.WF_STEP_FAILED)
        self._idem_claim = r.register_script(scripts.IDEM_CLAIM)
        self._idem_renew = r.register_script(scripts.IDEM_RENEW)
        self._idem_done = r.register_script(scripts.IDEM_DONE)
        self._idem_release = r.register_script(scripts.IDEM_RELEASE)
        self._leave_groups = r.register_script(scripts.LEAVE_GROUPS)
        self._prune_consumers = r.register_script(scripts.PRUNE_CONSUMERS)
        self._task_settled = r.register_script(scripts.TASK_SETTLED)
        self._next_prune = 0.0  # monotonic time of the next look for dead workers' consumers
        self._streams = list(broker.streams)
        self._index = {s.encode(): p for p, s in enumerate(broker.streams)}
        self.max_record = broker.max_result_bytes  # (and under the server's limit: _read_server_limit)
        self._server_limit = 0
        self._largest = 0  # the largest record of the batch being committed
        self._resets_with_large = 0  # commits in a row holding a large record that lost the connection
        self._mark_key = broker.commit_mark_prefix + name
        self._batch_token = b""
        self._unsure = False  # the current batch's EXEC met a connection error
        self._limits = RedisLimits(broker, name)  # rate and concurrency limits (ratelimit.py)

    # -- set-up and leaving ------------------------------------------------------------------
    def check_block(self, block_ms: int) -> None:
        sock_timeout = self._r.connection_pool.connection_kwargs.get("socket_timeout")
        if sock_timeout is not None and block_ms / 1000 >= sock_timeout:
            raise ValueError(
                f"block_ms ({block_ms}) must be shorter than the broker's socket_timeout ({sock_timeout} s): "
                "a blocking read would time out"
            )

    def setup(self) -> float:
        import redis

        for s in self._streams:
            try:
                self._r.xgroup_create(s, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._read_server_limit()
        uptime = self._r.info("server").get("uptime_in_seconds")
        if isinstance(uptime, int) and uptime < self.broker.visibility_timeout:
            # the server restarted moments ago: the idle times it reports include its downtime
            return self.broker.visibility_timeout - uptime
        return 0.0

    def lost_state(self, exc: BaseException) -> bool:
        import redis

        return isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc)

    def _read_server_limit(self) -> None:
        """The server's own cap on one value (proto-max-bulk-len): a bigger one resets the
        connection, so results are kept under it too. Managed servers may refuse CONFIG: then
        ``max_result_bytes`` alone applies."""
        import redis

        cap = self.broker.max_result_bytes
        try:
            got = cast("dict[str, str]", self._r.config_get("proto-max-bulk-len"))
            server = int(got.get("proto-max-bulk-len", 0))
        except (redis.ResponseError, ValueError, TypeError):
            server = 0
        # room for the record's framing and the command's other arguments
        self._server_limit = server
        self.max_record = min(cap, server - 4096) if server > 8192 else cap

    def limit_note(self, limit: int) -> str:
        if self._server_limit:
            return f", the server's proto-max-bulk-len {self._server_limit:,}"
        if limit < self.broker.max_result_bytes:
            return ", the server reset the connection on a bigger one"
        return ""

    def leave(self, committer_done: bool) -> None:
        """Remove this consumer from the groups where nothing is pending for it (see
        ``leave_groups.lua``): a process's consumer name is never used again, and left there it
        would stay in Redis for good. Best effort: a consumer left behind costs a few bytes."""
        try:
            if committer_done:
                self._r.delete(self._mark_key)  # (no commit of ours is left to retry)
            self._leave_groups(keys=self._streams, args=[GROUP, self.name])
        except Exception as exc:  # Redis away, or a server without the command: the consumer stays
            log.warning("could not remove consumer %s from the groups: %s", self.name, exc)

    def interrupt(self) -> None:
        self._r.connection_pool.disconnect()

    def cluster_heartbeat(self, worker: Any, interval: float) -> Any:
        from .registry import Heartbeat  # (P:cluster:..., see registry.py)

        return Heartbeat(worker, interval)

    def cancel_watch(self) -> Any:
        from .cancel import CancelWatch  # (the cancelled set, and the channel that announces them)

        return CancelWatch(self.broker)

    # -- fetching ----------------------------------------------------------------------------
    def fetch(self, capacity: int, block_ms: int) -> Entries:
        flat = self._fetch(keys=self._streams, args=[GROUP, self.name, capacity])
        if flat:
            # the flat reply [prio, id, fields, ...] becomes [prio, id, payload, ...] in place:
            # a worker holding N tasks holds no copy of the raw reply besides them
            for i in range(0, len(flat), 3):
                flat[i] = int(flat[i])
                f = flat[i + 2]  # (as the script sends them: [b"m", payload])
                flat[i + 2] = f[1] if len(f) == 2 and f[0] == b"m" else _payload(f)
            return cast(Entries, flat)
        got = self._r.xreadgroup(GROUP, self.name, {s: ">" for s in self._streams}, count=1, block=block_ms)
        return self._flatten(got) if got else []

    def _flatten(self, got: Any) -> Entries:
        out: Entries = []
        for stream, entries in got:
            key = stream if isinstance(stream, bytes) else str(stream).encode()
            for eid, fields in entries:
                if fields is not None:
                    out += (self._index.get(key, 2), eid, _payload(fields))
        return out

    def promote(self) -> float:
        moved, nxt, now = self._promote(keys=[self.broker.delayed_key, *self._streams], args=[1000])
        if moved >= 1000:
            return 0.0  # more are due: again at once
        if nxt:
            return time.monotonic() + max(0.0, (float(nxt) - int(now)) / 1000)
        return -1.0

    def recover(self, capacity: int, held: set[Any]) -> tuple[Entries, bool]:
        found: Entries = []
        n = 0
        for prio, s in enumerate(self._streams):
            last: str | bytes = "0"
            while n < capacity:
                got = cast(_Read, self._r.xreadgroup(GROUP, self.name, {s: last}, count=max(100, capacity)))
                entries = got[0][1] if got else []
                if not entries:
                    break
                for eid, fields in entries:
                    if eid not in held and fields is not None and n < capacity:
                        found += (prio, eid, _payload(fields))
                        n += 1
                last = entries[-1][0]
        return found, n >= capacity

    def reclaim(self, capacity: int) -> tuple[Entries, dict[Any, int]]:
        idle_ms = int(self.broker.visibility_timeout * 1000)
        now = time.monotonic()
        if now >= self._next_prune:
            # the consumers they leave behind, once nothing is pending for them (rarely: each
            # look costs one XINFO CONSUMERS per stream)
            import redis

            self._next_prune = now + 10 * self.broker.visibility_timeout
            try:
                self._prune_consumers(keys=self._streams, args=[GROUP, self.name, 10 * idle_ms])
            except redis.ResponseError as exc:  # housekeeping: never a reason to stop
                log.warning("could not remove dead workers' consumers: %s", exc)
        out: Entries = []
        deliveries: dict[Any, int] = {}
        taken = 0
        for prio, s in enumerate(self._streams):
            if taken >= capacity:
                break
            res = self._r.xautoclaim(s, GROUP, self.name, idle_ms, "0-0", count=capacity - taken)
            ids = [eid for eid, fields in res[1] if fields is not None]
            if ids:
                for eid, fields in res[1]:
                    if fields is not None:
                        out += (prio, eid, _payload(fields))
                taken += len(ids)
                log.info("reclaimed %d tasks of a dead worker from %s", len(ids), s)
                deliveries.update(self._deliveries(s, ids))
        return out, deliveries

    def _deliveries(self, stream: str, ids: list[bytes]) -> dict[bytes, int]:
        """How many times each of ``ids`` (held by us) has been delivered."""
        if not self.broker.max_deliveries:
            return {}
        pipe = self._r.pipeline(transaction=False)
        for eid in ids:
            pipe.xpending_range(stream, GROUP, min=eid, max=eid, count=1, consumername=self.name)
        out = {}
        for eid, rows in zip(ids, pipe.execute(), strict=True):
            if rows:
                out[eid] = int(rows[0]["times_delivered"])
        return out

    def heartbeat(self, held: list[tuple[Any, int]], claims: list[tuple[Any, Any]] | None) -> None:
        by_prio: dict[int, list[bytes]] = {}
        for eid, prio in held:
            by_prio.setdefault(prio, []).append(eid)
        pipe = self._r.pipeline(transaction=False)
        for prio, ids in by_prio.items():
            for i in range(0, len(ids), 1000):
                chunk = cast("list[Any]", ids[i : i + 1000])  # (xclaim's list type is invariant)
                pipe.xclaim(self._streams[prio], GROUP, self.name, 0, chunk, justid=True)
        if claims:  # and the leases of the idempotency keys of the copies running here
            lease = int(self.broker.visibility_timeout * 1000)
            prios = dict(held)
            for i in range(0, len(claims), 500):
                keys: list[str] = []
                args: list[Any] = [lease, GROUP, self.name]
                for eid, (claim_key, token) in claims[i : i + 500]:
                    keys += (claim_key, self._streams[prios[eid]])
                    args += (token, eid)
                self._idem_renew(keys=keys, args=args, client=pipe)
        self._limits.renew(pipe)  # concurrency leases held here; lapsed ones wake parked tasks
        if pipe.command_stack:
            pipe.execute()

    # -- limits and progress -----------------------------------------------------------------
    def clock_offset_ms(self) -> float:
        return self._limits.offset_ms()

    def reserve_slots(self, items: list[tuple[str, int]]) -> tuple[list[int], int]:
        return self._limits.reserve(items)

    def acquire_leases(self, items: list[tuple[str, int, str, int, bytes]]) -> list[Any]:
        return self._limits.acquire(items)

    def write_progress(self, task_id: str, record: bytes) -> None:
        b = self.broker
        self._r.set(b.progress_key(task_id), record, px=int(b.result_ttl * 1000) or 3_600_000)

    # -- before running ----------------------------------------------------------------------
    def claim_keys(self, items: list[tuple[Any, str]]) -> list[tuple[str, Any]]:
        b = self.broker
        keys: list[str] = []
        tokens: list[str] = []
        for eid, k in items:
            keys += (b.done_key(k), b.claim_key(k))
            tokens.append(f"{self.name} {eid.decode()}")
        replies = self._idem_claim(keys=keys, args=[int(b.visibility_timeout * 1000), *tokens])
        out: list[tuple[str, Any]] = []
        for i, got in enumerate(replies):
            if isinstance(got, list):  # a command on this key failed (see idem_claim.lua)
                out.append(
                    ("error", got[0].decode(errors="replace") if got and isinstance(got[0], bytes) else repr(got))
                )
            elif isinstance(got, bytes):
                out.append(("done", got.decode(errors="replace")))
            elif got:
                out.append(("held", int(got)))
            else:
                out.append(("claimed", (keys[2 * i + 1], tokens[i])))
        return out

    def step_inputs(self, items: list[tuple[str, list[int]]]) -> list[Any]:
        import redis

        pipe = self._r.pipeline(transaction=False)
        for run_id, srcs in items:
            pipe.hmget(self.broker.workflow_key(run_id), ["state", *(f"v:{s}" for s in srcs)])
        out: list[Any] = []
        for reply in pipe.execute(raise_on_error=False):
            if isinstance(reply, redis.ResponseError):  # e.g. the run's key is not a hash
                out.append(reply)
            else:
                state, *vals = reply
                out.append((state == b"run", vals))
        return out

    # -- committing --------------------------------------------------------------------------
    def begin_batch(self, token: bytes) -> None:
        self._batch_token = token
        self._unsure = False

    def commit(
        self, jobs: Sequence[CommitJob], rescue: Callable[[CommitJob, BaseException], tuple[str, ...]]
    ) -> tuple[Any, list[bool]]:
        """Write the outcomes of ``jobs`` in one MULTI transaction. A job whose outcome is
        nothing to write (no result stored, no key, no retry) is acknowledged in it; the others
        are returned, by priority, to be acknowledged once every reply of their commands was
        checked (Redis applies the rest of a transaction when one command fails: a wrong-type
        key, an error in a script). A job with a failed command stays pending, for redelivery."""
        b = self.broker
        ttl_ms = int(b.result_ttl * 1000)
        pipe = self._r.pipeline(transaction=True)
        stack = pipe.command_stack  # (a list of redis-py's Pipeline: one entry per queued command)
        acks: list[list[bytes]] = [[], [], [], []]
        written: list[tuple[int, int, int]] = []
        stored = [True] * len(jobs)
        self._largest = 0
        claimed = False
        for n, j in enumerate(jobs):
            if not j.ops:  # nothing to write (results off, no key): acknowledged in this transaction
                acks[j.prio].append(j.eid)
                claimed = claimed or j.claim is not None
                continue
            start = len(stack)
            try:
                self._queue(pipe, j)
            except Exception as exc:
                del stack[start:]
                j.kinds = rescue(j, exc)
                self._queue(pipe, j)
            claimed = claimed or j.claim is not None
            if len(stack) == start:
                acks[j.prio].append(j.eid)
            else:
                written.append((n, start, len(stack)))
        for j in jobs:  # concurrency leases are given back with the outcome (ratelimit.py)
            if j.lease is not None:
                self._limits.release(pipe, j.lease)
        if claimed:  # copies that did not succeed give their key's claim back (best effort)
            for j in jobs:
                if j.claim is not None and "settled" not in j.kinds:
                    self._idem_release(keys=[j.claim[0]], args=[j.claim[1]], client=pipe)
        for j in jobs:  # tasks that ended for good let go of what refers to them (base.Outcome)
            if j.settle is not None:
                key, sched = j.settle
                self._task_settled(
                    keys=[
                        b.dedup_key(str(key)) if key is not None else "",
                        b.schedule_key(str(sched)) + ":run" if sched is not None else "",
                    ],
                    args=[j.task_id(), ttl_ms],
                    client=pipe,
                )
        self._queue_acks(pipe, acks)
        # (kept 3 visibility timeouts: a retry after a longer outage may apply it twice, as
        # another worker could by then run those tasks again anyway)
        pipe.set(self._mark_key, self._batch_token, px=max(1000, int(self.broker.visibility_timeout * 3000)))
        if self._unsure and self._r.get(self._mark_key) == self._batch_token:
            # applied, its replies lost: not again. Which commands failed is not known any
            # more; the outcomes are taken as stored (a failed command is a wrong-type key)
            pipe.reset()
            log.warning("a commit of %d task outcomes was applied and its reply lost; it is not sent again", len(jobs))
            replies: list[Any] = [None] * len(stack)
        else:
            try:
                replies = pipe.execute(raise_on_error=False)
            except self.unavailable:
                self._unsure = True
                self._suspect_server_limit()
                raise
        self._resets_with_large = 0
        later: list[list[bytes]] = [[], [], [], []]
        claims: list[tuple[str, str]] = []
        for n, start, end in written:
            j = jobs[n]
            bad = next((r for r in replies[start:end] if isinstance(r, Exception)), None)
            if bad is not None:
                stored[n] = False
                log.error(
                    "the outcome of task %s (%s) could not be stored: %s; it is not acknowledged and will be "
                    "redelivered",
                    j.task_id(),
                    j.task_name(),
                    bad,
                )
                continue
            later[j.prio].append(j.eid)
            if j.claim is not None:
                claims.append(cast("tuple[str, str]", j.claim))
        return ((later, claims) if any(later) else None), stored

    def ack(self, pending: Any) -> None:
        """Acknowledge what ``commit`` left, and let go of those copies' claims once more: the
        commit dropped them, but until this acknowledgement their entries are still pending
        for this consumer, and a heartbeat's renewal that reaches Redis in between (it read
        its list of claims before the commit) takes a claim back for a copy that has ended
        (idem_renew.lua), where it would hold the key's next copy for a whole lease. In one
        transaction with the XACK: a renewal after it finds the entry acknowledged."""
        later, claims = pending
        pipe = self._r.pipeline(transaction=True)
        self._queue_acks(pipe, later)
        for claim_key, token in claims:
            self._idem_release(keys=[claim_key], args=[token], client=pipe)
        pipe.execute()

    def _queue_acks(self, pipe: Any, acks: list[list[bytes]]) -> None:
        for prio, ids in enumerate(acks):
            if ids:
                pipe.xack(self._streams[prio], GROUP, *ids)
                pipe.xdel(self._streams[prio], *ids)

    def _queue(self, pipe: Any, j: CommitJob) -> None:
        """Queue the commands of one job's outcome (``j.ops``, see :class:`~.base.Outcome`)."""
        b = self.broker
        ttl_ms = int(b.result_ttl * 1000)
        for op in j.ops:
            kind = op[0]
            if kind == Outcome.RESULT:
                key = b.result_key(op[1])
                self._largest = max(self._largest, len(op[2]))
                pipe.rpush(key, op[2])
                pipe.pexpire(key, ttl_ms)
            elif kind == Outcome.DELAY:
                self._add_delayed(keys=[b.delayed_key], args=[int(op[1]), b"%d" % j.prio + op[2]], client=pipe)
            elif kind == Outcome.DEAD:
                pipe.xadd(
                    b.dead_key,
                    {
                        "m": j.payload,
                        "e": op[1][:8000],
                        "n": op[2],
                        "i": op[3],
                        "p": j.prio,
                        "t": int(time.time() * 1000),
                        "w": self.name,
                    },
                    maxlen=b.dead_letter_maxlen,
                    approximate=False,
                )  # bounded: the oldest go
            elif kind == Outcome.COPY_RESULT:
                self._copy_result(keys=[b.result_key(op[1]), b.result_key(op[2])], args=[ttl_ms, op[3]], client=pipe)
            elif kind == Outcome.KEY_DONE:
                claim = cast("tuple[str, str]", j.claim)
                self._idem_done(
                    keys=[b.done_key(op[1]), claim[0]],
                    args=[op[2], max(1, int(b.idempotency_ttl * 1000)), claim[1]],
                    client=pipe,
                )
            elif kind == Outcome.STEP_DONE:
                self._largest = max(self._largest, len(op[3]))
                self._wf_done(
                    keys=[b.workflow_key(op[1]), b.result_key(op[1]), *self._streams, b.delayed_key],
                    args=[op[2], op[3], ttl_ms or 3_600_000],
                    client=pipe,
                )
            elif kind == Outcome.RUN_FAILED:
                self._wf_failed(
                    keys=[b.workflow_key(op[1]), b.result_key(op[1])], args=[op[2], ttl_ms or 3_600_000], client=pipe
                )
            else:
                raise ValueError(f"unknown outcome operation {kind!r}")

    def _suspect_server_limit(self) -> None:
        """A commit holding a large record lost its connection. A server whose proto-max-bulk-len
        is below our cap (and that refused to tell us: CONFIG disabled) resets the connection on
        every such commit, and the batch would be re-sent forever. The second time in a row
        while the server answers a PING, records this large are taken as over its limit: the
        retry fails that task and the rest of the batch goes on. A server that told us its
        limit (CONFIG GET at start) is not second-guessed: there a reset is a network fault."""
        if self._server_limit or self._largest <= _SMALLEST_BULK_LIMIT:
            self._resets_with_large = 0
            return
        self._resets_with_large += 1
        if self._resets_with_large < 2:
            return
        try:
            self._r.ping()
        except self.errors:
            return  # Redis is away: an outage, not a limit
        self._resets_with_large = 0
        self.max_record = self._largest - 1
        log.warning(
            "redis reset the connection twice on a commit holding a %d-byte record while it answers otherwise; "
            "results of that size are now refused (its proto-max-bulk-len is lower)",
            self._largest,
        )
