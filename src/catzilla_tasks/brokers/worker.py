"""A distributed worker: the local engine (BackgroundTasks) fed from Redis.

``catzilla-tasks worker module:tasks --concurrency N`` runs :class:`Worker`. Three parts:

* the fetch loop (the calling thread) takes at most the free capacity (``N`` minus the tasks it
  holds) from the priority streams in priority order (one Lua script), blocks in XREADGROUP
  when there is nothing, and hands each task to the local engine;
* the engine runs tasks as it runs local ones (threads, async, timeouts, process isolation);
* the committer thread writes outcomes in batches, each batch one MULTI transaction: results,
  idempotency keys, retries into the delayed set, dead letters, then XACK + XDEL. A task is
  acknowledged only in the same transaction that records its outcome, so a worker killed at
  any point loses nothing: what it held stays pending and is reclaimed (XAUTOCLAIM) by a live
  worker after the visibility timeout.

Housekeeping in the fetch loop: moving due delayed tasks into the streams (Lua, atomic),
reclaiming tasks of dead workers, and re-claiming its own long-running tasks so they are not
handed to someone else while it is alive.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import signal
import socket
import threading
import time
from collections import deque
from typing import Any, cast

from .. import _engine
from ..config import TaskConfig, TaskStatus
from ..errors import WorkflowError, encode_error, wire_name
from . import scripts
from .protocol import (
    CONFIG_ATTR,
    DEFAULT_CONFIG,
    MSG_ARGS,
    MSG_ATTEMPTS,
    MSG_ID,
    MSG_KWARGS,
    MSG_NAME,
    MSG_OPTIONS,
    OPT_FILLS,
    OPT_IDEMPOTENCY_KEY,
    OPT_RESERVED,
    OPT_SCHEDULE,
    OPT_WORKFLOW,
    STATUS_CODES,
)
from .redis import GROUP, RedisBroker
from .registry import Heartbeat, TaskFigures
from .serialization import DecodeError

__all__ = ["Worker"]

log = logging.getLogger("catzilla_tasks.worker")

_ERRORS = None
# keys of a message's options that are not TaskConfig fields (see protocol.py)
_NOT_CONFIG = (OPT_IDEMPOTENCY_KEY, OPT_WORKFLOW, OPT_FILLS, OPT_SCHEDULE, OPT_RESERVED)
# XREADGROUP's reply from a client without decode_responses: [(stream, [(id, fields), ...])],
# fields None for an entry deleted while pending
_Read = list[tuple[bytes, list[tuple[bytes, "dict[bytes, bytes] | None"]]]]


def _options(msg: list[Any]) -> Any:
    """A decoded message's options dict (empty when it has none)."""
    return (msg[MSG_OPTIONS] or {}) if len(msg) > MSG_OPTIONS else {}


def _redis_any() -> type[BaseException]:
    import redis

    return redis.RedisError


def _redis_errors() -> tuple[type[BaseException], ...]:
    global _ERRORS
    if _ERRORS is None:
        import redis

        _ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
    return _ERRORS


# the longest retry back-off a worker schedules (a year): a bigger or non-finite one (a bad
# option from an old producer) is capped, never an error that would spoil the commit
_MAX_BACKOFF_MS = 365 * 86400 * 1000.0


# Redis's smallest allowed proto-max-bulk-len: a record this small never exceeds the server's limit
_SMALLEST_BULK_LIMIT = 1024 * 1024


class _TooLarge(ValueError):
    """A value over the result size cap (the task fails with it)."""


def _describe(exc: BaseException) -> str:
    """``str(exc)``, or what can be said of it when its ``__str__`` raises."""
    try:
        return str(exc)
    except Exception:
        try:
            return f"<{type(exc).__name__}: str() failed> {exc!r}"
        except Exception:
            return f"<{type(exc).__name__}: str() and repr() failed>"


def _step_sources(opts: dict) -> list[int] | str:
    """The earlier steps whose values a step message takes, in order, or what is wrong with its
    options (a string): ``w`` is [run id, index, step id, name], ``f`` a list of
    [argument position or keyword, step index or list of step indexes]."""
    wf = opts.get(OPT_WORKFLOW)
    fills = opts.get(OPT_FILLS) or []
    if not (isinstance(wf, list) and len(wf) == 4):
        return "'w' is not [run, index, step, name]"
    if not isinstance(fills, list):
        return "'f' is not a list"
    srcs: list[int] = []
    for fill in fills:
        if not (isinstance(fill, list) and len(fill) == 2 and isinstance(fill[0], (int, str))):
            return "an item of 'f' is not [position, source]"
        src = fill[1]
        for x in src if isinstance(src, list) else [src]:
            if isinstance(x, bool) or not isinstance(x, int):
                return "a source in 'f' is not a step index"
            srcs.append(x)
    return list(dict.fromkeys(srcs))


def _redis_response_error() -> type[BaseException]:
    import redis

    return redis.ResponseError


def backoff_ms(cfg: TaskConfig, attempt: int) -> float:
    """The wait before retry ``attempt`` (1 = the first retry), as the local engine computes it."""
    base, cap, _ = cfg._retry_ms
    kind = cfg.retry_backoff
    if kind == "exponential":
        d = base * (2 ** min(attempt - 1, 60))
    elif kind == "linear":
        d = base * attempt
    else:
        d = base
    d = min(d, cap)
    jitter = cfg.retry_jitter if cfg.retry_jitter is not None else kind == "exponential"
    return random.uniform(0, d) if jitter else d  # noqa: S311 - retry jitter, not a secret


class _Job:
    """One fetched entry, from its decoding to its commit. Kept small: a worker holds up to
    ``concurrency`` of them. Once the task is in the engine, ``msg`` keeps only what the commit
    needs (id, name, attempt, options): the arguments are dropped (the engine holds its own
    references; a retry reads them again from ``payload``). The job is the engine's
    done-callback of its task (``__call__``), which saves a bound callback object per task."""

    __slots__ = (
        "worker",
        "prio",
        "eid",
        "msg",
        "payload",
        "func",
        "cfg",
        "handle",
        "error",
        "skip",
        "first",
        "wf",
        "call",
        "claim",
        "defer",
        "cancelled",
        "kinds",
        "lease",
        "parked",
        "limit_deferred",
        "local_delay",
    )
    kinds: tuple[str, ...]  # set by _commit: the counters its outcome moved, () if not stored (registry.py)

    def __init__(self, worker: Worker, prio: int, eid: bytes, msg: Any, payload: bytes) -> None:
        self.worker = worker
        self.prio = prio
        self.eid = eid
        self.msg = msg
        self.payload = payload
        self.func: Any = None
        self.cfg: TaskConfig | None = None
        self.handle: Any = None
        self.error: str | None = None  # set: dead-letter this entry with that error, unrun
        self.skip = False  # an idempotency key already done: acknowledge, do not run
        self.first = ""  # then: the id of the task that did it
        self.wf: list | None = None  # a workflow step: [run id, step index, step id, workflow name]
        self.call: tuple | None = None  # a step's (args, kwargs) with the values of earlier steps in
        self.claim: tuple[str, str] | None = None  # its idempotency key's claim: (claim key, token)
        self.defer = 0  # > 0: another copy holds its key: back to the delayed set, ms
        self.cancelled = False  # cancelled before it started (cancel.py): acknowledged, not run
        # limits (ratelimit.py): its concurrency lease (lease set, park set, limit, lease id), parked
        # (over its concurrency limit: acknowledged, it waits in the park set), deferred by its rate limit
        self.lease: tuple[str, str, int, str] | None = None
        self.parked = False
        self.limit_deferred = False
        self.local_delay = 0  # ms it waits in the engine's timer for its rate limit's slot

    def __call__(self, handle: Any) -> None:  # the engine's done-callback (any thread, GIL held)
        self.worker._finished(self, handle)


class Worker:
    """Runs the tasks of ``broker`` (default: ``tasks.broker``) on the local engine ``tasks``.

    ``concurrency``: most tasks held at once (fetched and not yet acknowledged); the worker
    fetches only its free capacity. ``run()`` returns after ``stop()`` (or SIGTERM/SIGINT with
    ``install_signals=True``): it stops fetching, lets in-flight tasks finish, acknowledges them.

    ``heartbeat_interval``: seconds between the worker's beats in the cluster registry (see
    :mod:`.registry`: who it is, what it holds, its figures per task name); None: not
    registered and no figures kept.
    """

    def __init__(
        self,
        tasks: Any,
        broker: RedisBroker | None = None,
        *,
        concurrency: int = 16,
        consumer: str | None = None,
        block_ms: int = 200,
        heartbeat_interval: float | None = 2.0,
    ) -> None:
        broker = broker if broker is not None else getattr(tasks, "broker", None)
        if not isinstance(broker, RedisBroker):
            raise TypeError(
                "Worker: the engine has no Redis broker; create it with BackgroundTasks(broker='redis://...') "
                "or pass broker=RedisBroker(...)"
            )
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency: must be an integer >= 1, got {concurrency!r}")
        qsize = tasks._stats().get("queue_size") if hasattr(tasks, "_stats") else None
        if isinstance(qsize, int) and concurrency > qsize:
            raise ValueError(f"concurrency ({concurrency}) exceeds the engine's queue_size ({qsize})")
        self.tasks = tasks
        self.broker = broker
        self.concurrency = concurrency
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self.block_ms = int(block_ms)
        sock_timeout = broker.redis.connection_pool.connection_kwargs.get("socket_timeout")
        if sock_timeout is not None and self.block_ms / 1000 >= sock_timeout:
            raise ValueError(
                f"block_ms ({block_ms}) must be shorter than the broker's socket_timeout ({sock_timeout} s): "
                "a blocking read would time out"
            )
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
        # issue 19: cancelled tasks (cancel.py); what a task's end lets go (task_settled.lua)
        from .cancel import CancelWatch

        self._cancels = CancelWatch(broker)
        self._task_settled = r.register_script(scripts.TASK_SETTLED)
        self._prune_consumers = r.register_script(scripts.PRUNE_CONSUMERS)
        self._next_prune = 0.0  # monotonic time of the next look for dead workers' consumers
        self._cv = threading.Condition()
        self._inflight = 0
        self._owned: dict[bytes, int] = {}  # entry id -> priority, for the heartbeat re-claim
        self._claims: dict[bytes, tuple[str, str]] = {}  # entry id -> its key's (claim key, token), renewed too
        # entries delivered to this consumer that it never saw (a reply lost when the connection
        # dropped; or an earlier process under the same consumer name): looked for at start and
        # after every dropped connection
        self._lost_replies = True
        self._done: deque[_Job] = deque()
        self._done_event = threading.Event()
        self._stop = threading.Event()
        self._deadline_set = threading.Event()  # stop(timeout) was called (see _enforce_deadline)
        self._returned = threading.Event()  # run() is over
        self._committer: threading.Thread | None = None
        self._committer_exit = False
        self._cfgs: dict[tuple[str, Any], TaskConfig] = {}
        self._registry = getattr(tasks, "_registered", {})
        self._names: dict[str, str] = {}
        self.counts = {
            "fetched": 0,
            "succeeded": 0,
            "failed": 0,
            "retried": 0,
            "dead_lettered": 0,
            "skipped_idempotent": 0,
            "deferred_idempotent": 0,
            "reclaimed": 0,
            "workflow_steps_skipped": 0,
            "recovered": 0,
            "not_stored": 0,
            "cancelled": 0,
            "deferred_rate_limit": 0,
            "parked_concurrency_limit": 0,
        }
        self._next_due_local: float = 0.0  # monotonic time of the next delayed task (0: check now)
        self._submit = functools.partial(_engine.Engine._submit, tasks)
        self.ready = threading.Event()  # set once the groups exist and fetching starts
        self._deadline: float | None = None  # when a stopping worker gives up (stop(timeout))
        self._commit_give_up: float | None = None  # (without one: see _shutdown_deadline)
        self._max_result = broker.max_result_bytes  # (and under the server's limit: _read_server_limit)
        self._server_limit = 0
        self._largest = 0  # the largest record of the batch being committed
        self._resets_with_large = 0  # commits in a row holding a large record that lost the connection
        # no reclaiming of other workers' tasks before this (monotonic): after an outage, live
        # workers need time to renew the leases that aged while nobody could reach Redis
        self._reclaim_after = 0.0
        self._outage = False
        # each commit transaction also sets this key to the batch's token: when the connection
        # drops during EXEC, a retry reads it to learn whether Redis applied the transaction
        # (applying it again would write dead letters, failure records and retries twice)
        self._mark_key = broker.commit_mark_prefix + self.consumer
        self._mark_base = os.urandom(4).hex()  # (a restarted worker may reuse a consumer name)
        self._batches = 0
        self._batch_token = b""
        self._unsure = False  # the current batch's EXEC met a connection error
        # -- the cluster registry (registry.py): figures recorded by the committer, published by
        # the heartbeat thread
        self.figures: TaskFigures | None = None
        self._heartbeat_thread: Heartbeat | None = None
        if heartbeat_interval is not None:
            if (
                isinstance(heartbeat_interval, bool)
                or not isinstance(heartbeat_interval, (int, float))
                or not 0.01 <= heartbeat_interval <= 3600
            ):
                raise ValueError(
                    "heartbeat_interval: must be a number of seconds from 0.01 to 3600 or None, "
                    f"got {heartbeat_interval!r}"
                )
            self.figures = TaskFigures()
            self._heartbeat_thread = Heartbeat(self, heartbeat_interval)

        # -- rate and concurrency limits, progress (ratelimit.py, progress.py) --
        from .ratelimit import RedisLimits

        self._limits = RedisLimits(self)
        self._by_key: dict[int, _Job] = {}  # engine task key -> its job, while it runs (progress reports)
        from .. import progress

        progress.add_resolver(self._progress_target)

    # -- life ----------------------------------------------------------------------------
    def stop(self, timeout: float | None = None) -> None:
        """Stop fetching; ``run()`` returns once the held tasks are finished and their outcomes
        committed. With ``timeout`` (seconds from now), ``run()`` returns by then in any case:
        what is not committed by then (a task still running, Redis unreachable) stays pending in
        Redis for redelivery, and is logged. Without it the tasks take as long as they need,
        and a commit that meets a Redis error is retried for up to ``visibility_timeout`` (past
        it another worker takes those tasks anyway). Safe from a signal handler."""
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
                raise ValueError(f"stop(timeout): must be a number of seconds >= 0 or None, got {timeout!r}")
            self._deadline = time.monotonic() + timeout
            self._deadline_set.set()
        self._stop.set()
        with self._cv:
            self._cv.notify_all()

    def _shutdown_deadline(self) -> float:
        """When a stopping worker gives up retrying a commit (monotonic time): the stop
        deadline, or a visibility timeout after the first failed commit of the shutdown."""
        if self._deadline is not None:
            return self._deadline
        if self._commit_give_up is None:
            self._commit_give_up = time.monotonic() + self.broker.visibility_timeout
        return self._commit_give_up

    def _ensure_groups(self) -> None:
        import redis

        for s in self.broker.streams:
            try:
                self._r.xgroup_create(s, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._read_server_limit()
        uptime = self._r.info("server").get("uptime_in_seconds")
        if isinstance(uptime, int) and uptime < self.broker.visibility_timeout:
            # the server restarted moments ago: the idle times it reports include its downtime
            self._reclaim_after = time.monotonic() + self.broker.visibility_timeout - uptime

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
        self._max_result = min(cap, server - 4096) if server > 8192 else cap

    def run(self, install_signals: bool = False) -> None:
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        if not self._set_up():
            return
        self._cancels.start()
        self._committer = threading.Thread(target=self._commit_loop, name="catzilla-committer", daemon=True)
        self._committer.start()
        threading.Thread(target=self._enforce_deadline, name="catzilla-stop-deadline", daemon=True).start()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.start()
        self.ready.set()
        try:
            self._fetch_loop()
        finally:
            try:
                self._finish_held()
                if self._heartbeat_thread is not None:
                    self._heartbeat_thread.stop(deregister=not self._past_deadline())
                if not self._past_deadline():
                    self._leave()
            finally:
                self._cancels.stop()
                self._returned.set()
                self._deadline_set.set()

    def _set_up(self) -> bool:
        """Create the groups, retried while Redis is unreachable; False if the worker was
        stopped meanwhile (a SIGTERM during an outage is a stop, not an error)."""
        try:
            self._retrying(self._ensure_groups)
        except _redis_errors() as exc:
            if not self._stop.is_set():
                raise
            log.warning("stopped before redis could be reached (%s)", exc)
            return False
        return True

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _enforce_deadline(self) -> None:
        """After ``stop(timeout)``: at the deadline, close the worker's connections (again every
        half second until ``run()`` returns). A Redis gone silent (a dropped route: no reset, no
        reply) would otherwise hold a blocked read, or a reconnection's handshake, for a whole
        socket timeout each, and ``run()`` would return long after the deadline."""
        self._deadline_set.wait()
        while self._deadline is not None and not self._returned.is_set():
            left = self._deadline - time.monotonic()
            if left > 0:
                self._returned.wait(left)
                continue
            self._r.connection_pool.disconnect()
            self._returned.wait(0.5)

    def _leave(self) -> None:
        """Remove this worker's consumer from the groups where nothing is pending for it (see
        scripts.LEAVE_GROUPS): a process's consumer name is never used again, and left there it
        would stay in Redis for good. Best effort: a consumer left behind costs a few bytes."""
        try:
            if self._committer is not None and not self._committer.is_alive():
                self._r.delete(self._mark_key)  # (no commit of ours is left to retry)
            self._leave_groups(keys=list(self.broker.streams), args=[GROUP, self.consumer])
        except Exception as exc:  # Redis away, or a server without the command: the consumer stays
            log.warning("could not remove consumer %s from the groups: %s", self.consumer, exc)

    def _finish_held(self) -> None:
        """After the fetch loop: let the held tasks finish and be committed (heartbeats go on so
        nobody takes them meanwhile), until the stop deadline if one was given."""
        hb_every = self.broker.visibility_timeout / 3
        with self._cv:
            while self._inflight > 0:
                left = None if self._deadline is None else self._deadline - time.monotonic()
                if left is not None and left <= 0:
                    log.warning(
                        "stopping with %d tasks not finished or not committed; they stay pending in Redis and will "
                        "be redelivered",
                        self._inflight,
                    )
                    break
                self._cv.wait(hb_every if left is None else min(hb_every, left))
                if self._inflight > 0:
                    self._cv.release()
                    try:
                        self._heartbeat()
                    except _redis_any() as exc:
                        log.warning("redis unavailable while stopping (%s)", exc)
                    finally:
                        self._cv.acquire()
        self._committer_exit = True
        self._done_event.set()
        left = None if self._deadline is None else max(0.0, self._deadline - time.monotonic()) + 1.0
        committer = cast(threading.Thread, self._committer)  # started by run(), which calls this
        committer.join(left)  # (it gives up by the deadline too: _retrying)

    def _retrying(self, fn: Any, *args: Any, committing: bool = False) -> Any:
        """``fn(*args)``, retried while Redis is unreachable. Once the worker stops, only
        commits are retried (outcomes computed before the stop are worth writing), up to the
        stop deadline; then the error is raised (those tasks stay pending)."""
        delay = 0.05
        while True:
            try:
                return fn(*args)
            except _redis_errors() as exc:
                if self._stop.is_set():
                    if not committing or time.monotonic() >= self._shutdown_deadline():
                        raise
                log.warning("redis unavailable (%s); retrying in %.1f s", exc, delay)
                if self._stop.is_set():
                    delay = min(delay, max(0.0, self._shutdown_deadline() - time.monotonic()))
                time.sleep(delay)  # back-off before reconnecting, not synchronisation
                delay = min(delay * 2, 2.0)

    # -- fetching --------------------------------------------------------------------------
    def _fetch_loop(self) -> None:
        hk_every = min(self.broker.visibility_timeout / 3, 5.0)
        next_hk = 0.0
        errors = _redis_errors()
        import redis

        while not self._stop.is_set():
            with self._cv:
                while self._inflight >= self.concurrency and not self._stop.is_set():
                    self._cv.wait(max(0.0, next_hk - time.monotonic()) or hk_every)
                    if time.monotonic() >= next_hk:
                        break
                free = self.concurrency - self._inflight
            if self._stop.is_set():
                break
            try:
                now = time.monotonic()
                if now >= next_hk:
                    self._heartbeat()
                    if self._outage:  # back: our leases are renewed; give others as long
                        self._outage = False
                        self._reclaim_after = time.monotonic() + self.broker.visibility_timeout
                    if free > 0:
                        free -= self._reclaim(free)
                    next_hk = now + hk_every
                if now >= self._next_due_local:
                    self._promote_due()
                if free <= 0:
                    continue
                if self._lost_replies:
                    taken = self._recover_own(free)
                    if taken:
                        continue
                flat = self._fetch(keys=list(self.broker.streams), args=[GROUP, self.consumer, free])
                if flat:
                    # decoded straight from the flat reply [prio, id, fields, ...], which is
                    # dropped before the tasks start: a worker holding N tasks holds no copy of
                    # the raw reply besides them
                    decode = self._decode
                    jobs = [decode(int(flat[i]), flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]
                    del flat
                    self._run_jobs(jobs)
                    del jobs
                    continue
                # no longer than the next heartbeat either: with a short visibility timeout, a
                # held task's entry and its key's claim must be renewed before they run out
                wait_ms = max(1, min(self.block_ms, int((next_hk - time.monotonic()) * 1000) + 1))
                if self._next_due_local:
                    due_ms = int((self._next_due_local - time.monotonic()) * 1000) + 1
                    if due_ms < 100:
                        # Redis ends a blocked read at its `hz` tick (100 ms by default), not at
                        # its block: a delayed task due sooner (a rate limit's next slot) would be
                        # promoted up to 100 ms late, and several late ones at once
                        self._stop.wait(max(0, due_ms) / 1000)
                        continue
                    wait_ms = max(1, min(wait_ms, due_ms))
                got = self._r.xreadgroup(
                    GROUP, self.consumer, {s: ">" for s in self.broker.streams}, count=1, block=wait_ms
                )
                if got:
                    self._dispatch(self._flatten(got))
            except errors as exc:
                # a fetch whose reply was lost still gave us its entries: look for them
                self._lost_replies = True
                self._outage = True
                next_hk = 0.0  # renew our leases first thing once Redis answers
                log.warning("redis unavailable (%s); retrying", exc)
                time.sleep(0.2)  # back-off before reconnecting, not synchronisation
            except redis.ResponseError as exc:
                self._lost_replies = True
                self._outage = True
                next_hk = 0.0
                if "NOGROUP" in str(exc):  # the server lost its data (no persistence): set up again
                    self._set_up()
                else:  # a server in a state that refuses us for now (read-only replica, OOM, ...)
                    log.error("redis refused a fetch (%s); retrying in 1 s", exc)
                    self._stop.wait(1.0)

    def _flatten(self, got: Any) -> list[tuple[int, bytes, Any]]:
        index = {s.encode(): p for p, s in enumerate(self.broker.streams)}
        out = []
        for stream, entries in got:
            key = stream if isinstance(stream, bytes) else str(stream).encode()
            for eid, fields in entries:
                if fields is not None:
                    out.append((index.get(key, 2), eid, fields))
        return out

    def _promote_due(self) -> None:
        moved, nxt, now = self._promote(keys=[self.broker.delayed_key, *self.broker.streams], args=[1000])
        if moved >= 1000:
            self._next_due_local = 0.0  # more are due: again at once
            return
        if nxt:
            self._next_due_local = time.monotonic() + max(0.0, (float(nxt) - int(now)) / 1000)
        else:
            self._next_due_local = time.monotonic() + self.block_ms / 1000

    def _recover_own(self, free: int) -> int:
        """After a dropped connection: entries Redis handed to this consumer whose reply never
        arrived (the server died between delivering and answering) sit in our pending list,
        where only the visibility timeout would free them. Read that list (XREADGROUP from id
        0) and run what we do not hold, at most ``free``. Entries held at the snapshot are
        skipped; one finished meanwhile was acknowledged before it left ``_owned``, so it is
        no longer pending. Returns how many were taken; the flag stays up until none are left."""
        with self._cv:
            held = set(self._owned)
        found: list[tuple[int, bytes, Any]] = []
        for prio, s in enumerate(self.broker.streams):
            last: str | bytes = "0"
            while len(found) < free:
                got = cast(_Read, self._r.xreadgroup(GROUP, self.consumer, {s: last}, count=max(100, free)))
                entries = got[0][1] if got else []
                if not entries:
                    break
                for eid, fields in entries:
                    if eid not in held and fields is not None and len(found) < free:
                        found.append((prio, eid, fields))
                last = entries[-1][0]
        if len(found) < free:
            self._lost_replies = False  # (more: the next round takes them)
        if found:
            self.counts["recovered"] += len(found)
            log.warning("%d tasks delivered to this worker while the connection dropped are run now", len(found))
            self._dispatch(found)
        return len(found)

    def _reclaim(self, free: int) -> int:
        """Take over tasks of workers that stopped acknowledging (idle past the visibility
        timeout), at most ``free``; returns how many."""
        idle_ms = int(self.broker.visibility_timeout * 1000)
        now = time.monotonic()
        if now >= self._next_prune:
            # the consumers they leave behind, once nothing is pending for them (rarely: each
            # look costs one XINFO CONSUMERS per stream)
            self._next_prune = now + 10 * self.broker.visibility_timeout
            try:
                self._prune_consumers(keys=list(self.broker.streams), args=[GROUP, self.consumer, 10 * idle_ms])
            except _redis_response_error() as exc:  # housekeeping: never a reason to stop
                log.warning("could not remove dead workers' consumers: %s", exc)
        if time.monotonic() < self._reclaim_after:
            return 0
        taken = 0
        for prio, s in enumerate(self.broker.streams):
            if taken >= free:
                break
            res = self._r.xautoclaim(s, GROUP, self.consumer, idle_ms, "0-0", count=free - taken)
            entries = [(prio, eid, fields) for eid, fields in res[1] if fields is not None]
            if entries:
                taken += len(entries)
                self.counts["reclaimed"] += len(entries)
                log.info("reclaimed %d tasks of a dead worker from %s", len(entries), s)
                self._dispatch(entries, self._deliveries(s, [e[1] for e in entries]))
        return taken

    def _deliveries(self, stream: str, ids: list[bytes]) -> dict[bytes, int]:
        """How many times each of ``ids`` (held by us) has been delivered."""
        if not self.broker.max_deliveries:
            return {}
        pipe = self._r.pipeline(transaction=False)
        for eid in ids:
            pipe.xpending_range(stream, GROUP, min=eid, max=eid, count=1, consumername=self.consumer)
        out = {}
        for eid, rows in zip(ids, pipe.execute(), strict=True):
            if rows:
                out[eid] = int(rows[0]["times_delivered"])
        return out

    def _heartbeat(self) -> None:
        """Reset the idle time of the tasks we hold, so no one reclaims them while we live."""
        with self._cv:
            owned = list(self._owned.items())
            claims = [(eid, *c) for eid, c in self._claims.items() if eid in self._owned] if self._claims else None
        if not owned:
            self._limits.renew(None)
            return
        by_prio: dict[int, list[bytes]] = {}
        for eid, prio in owned:
            by_prio.setdefault(prio, []).append(eid)
        pipe = self._r.pipeline(transaction=False)
        for prio, ids in by_prio.items():
            for i in range(0, len(ids), 1000):
                chunk = cast("list[Any]", ids[i : i + 1000])  # (xclaim's list type is invariant)
                pipe.xclaim(self.broker.streams[prio], GROUP, self.consumer, 0, chunk, justid=True)
        if claims:  # and the leases of the idempotency keys of the copies running here
            lease = int(self.broker.visibility_timeout * 1000)
            streams = self.broker.streams
            prios = dict(owned)
            for i in range(0, len(claims), 500):
                keys: list[str] = []
                args: list[Any] = [lease, GROUP, self.consumer]
                for eid, claim_key, token in claims[i : i + 500]:
                    keys += (claim_key, streams[prios[eid]])
                    args += (token, eid)
                self._idem_renew(keys=keys, args=args, client=pipe)
        self._limits.renew(pipe)
        pipe.execute()

    # -- dispatch --------------------------------------------------------------------------
    def _config(self, name: str, func: Any, opts: dict[str, Any] | None) -> TaskConfig:
        cfg_opts = [(k, v) for k, v in opts.items() if k not in _NOT_CONFIG] if opts else None
        key = (name, tuple(sorted(cfg_opts)) if cfg_opts else None)
        cfg = self._cfgs.get(key)
        if cfg is None:
            base = getattr(func, CONFIG_ATTR, None)
            if not isinstance(base, TaskConfig):
                base = DEFAULT_CONFIG
            fields = dict(cfg_opts or ())
            cfg = base.replace(**fields) if fields else base
            if len(self._cfgs) > 1024:
                self._cfgs.clear()
            self._cfgs[key] = cfg
        return cfg

    def _decode(self, prio: int, eid: bytes, fields: Any) -> _Job:
        try:
            return self._parse(prio, eid, fields)
        except Exception as exc:  # whatever a stream entry holds, it is one dead letter
            job = _Job(self, prio, eid, None, b"")
            job.error = f"DecodeError: {_describe(exc)}"
            return job

    def _parse(self, prio: int, eid: bytes, fields: Any) -> _Job:
        if isinstance(fields, dict):
            payload = fields.get(b"m")
        else:
            payload = None
            for i in range(0, len(fields) - 1, 2):
                if fields[i] == b"m":
                    payload = fields[i + 1]
                    break
        job = _Job(self, prio, eid, None, payload or b"")
        if payload is None:
            job.error = f"DecodeError: stream entry without an 'm' field: {fields!r:.200}"
            return job
        try:
            msg = self.broker.serializer.loads(payload)
        except DecodeError as exc:
            job.error = f"DecodeError: {exc}"
            return job
        if (
            not isinstance(msg, list)
            or len(msg) < 4
            or not isinstance(msg[MSG_ID], str)
            or not isinstance(msg[MSG_NAME], str)
            or not isinstance(msg[MSG_ARGS], list)
            or not isinstance(msg[MSG_KWARGS], dict)
            or (len(msg) > MSG_ATTEMPTS and not isinstance(msg[MSG_ATTEMPTS], int))
            or (len(msg) > MSG_OPTIONS and msg[MSG_OPTIONS] is not None and not isinstance(msg[MSG_OPTIONS], dict))
        ):
            job.error = f"DecodeError: not a task message: {msg!r:.200}"
            return job
        job.msg = msg
        func = self._registry.get(msg[MSG_NAME])
        if func is not None:  # one copy of each task name, not one per message held
            msg[MSG_NAME] = self._names.setdefault(msg[MSG_NAME], msg[MSG_NAME])
        if func is None:
            job.error = (
                f"LookupError: unknown task name {msg[MSG_NAME]!r}: this worker's engine has no task "
                "registered under it (register it with @tasks.task in the module the worker imports)"
            )
            return job
        job.func = func
        try:
            job.cfg = self._config(msg[MSG_NAME], func, msg[MSG_OPTIONS] if len(msg) > MSG_OPTIONS else None)
        except Exception as exc:
            job.error = f"{type(exc).__name__}: bad per-task options: {_describe(exc)}"
        return job

    def _dispatch(self, entries: list[tuple[int, bytes, Any]], deliveries: dict[bytes, int] | None = None) -> None:
        self._run_jobs([self._decode(p, e, f) for p, e, f in entries], deliveries)

    def _run_jobs(self, jobs: list[_Job], deliveries: dict[bytes, int] | None = None) -> None:
        """Count ``jobs`` as held, then hand each one to the engine, or to the committer with
        the reason it does not run. Every job counted here leaves by one of two doors: the
        committer (through ``_finished``: run, skipped or dead-lettered) or ``_release`` (a
        Redis error before the hand-off: un-held, still pending in Redis, run again later)."""
        limit = self.broker.max_deliveries
        if deliveries and limit:
            for j in jobs:
                n = deliveries.get(j.eid, 0)
                if n > limit and j.error is None:
                    j.error = (
                        f"catzilla_tasks.errors.WorkerLost: delivered {n} times (max_deliveries={limit}); "
                        "every worker that took "
                        "it stopped before finishing it: the task may be what kills them"
                    )
        with self._cv:
            self._inflight += len(jobs)
            for j in jobs:
                self._owned[j.eid] = j.prio
        self.counts["fetched"] += len(jobs)
        started = 0
        try:
            self._look_up(jobs)
            for j in jobs:
                self._start(j)
                started += 1
        except _redis_any():
            # Redis went away (or refused) before these were handed over: not ours any more (they stay in
            # our pending list; _recover_own takes them again once Redis answers)
            self._release(jobs[started:])
            raise
        except Exception as exc:  # a defect of ours that one of these messages brings out
            log.exception("dispatching %d fetched tasks failed; they are dead-lettered", len(jobs) - started)
            for j in jobs[started:]:
                if j.error is None:
                    j.skip = False
                    j.error = f"RuntimeError: the worker could not dispatch this task: {_describe(exc)}"
                self._finished(j, None)
        except BaseException:
            self._release(jobs[started:])
            raise

    def _release(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        with self._cv:
            for j in jobs:
                self._owned.pop(j.eid, None)
                self._claims.pop(j.eid, None)  # (its claim lapses; the same copy taken again re-claims it)
            self._inflight -= len(jobs)
            self._cv.notify_all()
        self.counts["fetched"] -= len(jobs)
        self._lost_replies = True  # they are in our pending list: look there once Redis is back

    def _look_up(self, jobs: list[_Job]) -> None:
        """What Redis knows before the jobs run: finished idempotency keys, workflow runs."""
        limited = [j for j in jobs if j.error is None and j.cfg is not None and j.cfg._routed]
        if limited:
            self._limits.admit(limited)
        keyed = [j for j in jobs if j.error is None and OPT_IDEMPOTENCY_KEY in _options(j.msg)]
        if keyed:
            self._claim(keyed)
        steps = [j for j in jobs if j.error is None and OPT_WORKFLOW in _options(j.msg)]
        if steps:
            self._prepare_steps(steps)

    def _start(self, j: _Job) -> None:
        """Hand one job to the engine (or, when it does not run, to the committer)."""
        if j.error is not None or j.skip or j.defer or j.parked:
            self._finished(j, None)
            return
        if j.msg[MSG_ID] in self._cancels.ids:  # cancelled (cancel.py): never runs
            j.cancelled = True
            self._finished(j, None)
            return
        try:
            msg = j.msg
            cfg = cast(TaskConfig, j.cfg)  # set for every job without an error
            if cfg._plain is not None:  # limits and queue were applied in Redis: not again locally
                cfg = cfg._plain
            run_cfg = cfg if not (cfg.max_retries or cfg._delay_ns) else self._run_config(cfg)
            if j.local_delay:
                run_cfg = self._limits.delayed(run_cfg, j.local_delay)
            args, kwargs = j.call if j.call is not None else (tuple(msg[MSG_ARGS]), msg[MSG_KWARGS])
            h = self._submit(j.func, args, kwargs, run_cfg, -1)
        except Exception as exc:  # e.g. bad arguments for isolation, engine shut down
            j.error = f"{type(exc).__name__}: could not start the task: {_describe(exc)}"
            self._finished(j, None)
            return
        del args, kwargs
        msg[MSG_ARGS] = msg[MSG_KWARGS] = j.call = None  # the engine holds its own references (see _Job)
        j.handle = h
        self._cancels.track(msg[MSG_ID], h)
        self._by_key[h._key] = j
        h._on_done(j)

    def _claim(self, keyed: list[_Job]) -> None:
        """Claim the idempotency keys of fetched copies (one script, atomic): a copy runs only
        if it got its key's claim; one whose key is done is acknowledged with the first run's
        result; one whose key another copy holds waits in the delayed set (``defer``)."""
        b = self.broker
        keys: list[str] = []
        tokens: list[str] = []
        for j in keyed:
            k = str(j.msg[MSG_OPTIONS][OPT_IDEMPOTENCY_KEY])
            keys += (b.done_key(k), b.claim_key(k))
            tokens.append(f"{self.consumer} {j.eid.decode()}")
        replies = self._idem_claim(keys=keys, args=[int(b.visibility_timeout * 1000), *tokens])
        claimed = {}
        for i, (j, got) in enumerate(zip(keyed, replies, strict=True)):
            if isinstance(got, list):  # a command on this key failed (see scripts.IDEM_CLAIM)
                err = got[0].decode(errors="replace") if got and isinstance(got[0], bytes) else repr(got)
                j.error = f"ResponseError: idempotency key {str(j.msg[5]['k'])!r} cannot be claimed: {err}"
            elif isinstance(got, bytes):
                j.skip = True
                j.first = got.decode(errors="replace")
            elif got:
                # looked at again after the holder's lease (if it died) or 1 s (it may finish)
                j.defer = min(max(int(got), 20), 1000)
            else:
                j.claim = claimed[j.eid] = (keys[2 * i + 1], tokens[i])
        if claimed:
            with self._cv:
                self._claims.update(claimed)

    def _prepare_steps(self, steps: list[_Job]) -> None:
        """Workflow steps: skip those whose run already ended (a step failed), and fill in the
        values of earlier steps that a step takes (read from the run's hash, one round trip).
        A step whose options or stored values are not what they should be is dead-lettered
        with the reason; a Redis connection error leaves every step to the caller."""
        import redis

        b = self.broker
        pipe = self._r.pipeline(transaction=False)
        wanted = []
        for j in steps:
            srcs = _step_sources(j.msg[MSG_OPTIONS])
            if isinstance(srcs, str):
                j.error = f"DecodeError: bad workflow step options ({srcs}): {j.msg[MSG_OPTIONS]!r:.200}"
                continue
            j.wf = wf = j.msg[MSG_OPTIONS][OPT_WORKFLOW]
            pipe.hmget(b.workflow_key(str(wf[0])), ["state", *(f"v:{s}" for s in srcs)])
            wanted.append((j, wf, srcs))
        if not wanted:
            return
        replies = pipe.execute(raise_on_error=False)
        for (j, wf, srcs), reply in zip(wanted, replies, strict=True):
            if isinstance(reply, redis.ResponseError):  # e.g. the run's key is not a hash
                j.error = f"LookupError: workflow step {wf[2]!r}: cannot read its run: {reply}"
                continue
            state, *vals = reply
            if state != b"run":
                j.skip = True  # the run failed (or is gone): acknowledged, not run
                j.first = ""
                continue
            try:
                self._fill_step(j, dict(zip(srcs, vals, strict=True)))
            except Exception as exc:  # anything else odd about this one step
                j.error = f"DecodeError: workflow step {wf[2]!r}: {_describe(exc)}"

    def _fill_step(self, j: _Job, raw: dict[int, bytes | None]) -> None:
        fills = j.msg[MSG_OPTIONS].get(OPT_FILLS) or []
        if not fills:
            return
        wf = cast("list[Any]", j.wf)  # a workflow step (see _fill_workflow)
        got = {}
        for s_, v in raw.items():
            if v is None:
                j.error = f"LookupError: workflow step {wf[2]!r}: the value of step {s_} is not in Redis"
                return
            try:
                got[s_] = self.broker.serializer.loads(v)
            except DecodeError as exc:
                j.error = f"DecodeError: workflow step {wf[2]!r}: the value of step {s_}: {exc}"
                return
        args = list(j.msg[MSG_ARGS])
        kwargs = dict(j.msg[MSG_KWARGS])
        for where, src in fills:
            value = [got[x] for x in src] if isinstance(src, list) else got[src]
            if isinstance(where, int) and 0 <= where < len(args):
                args[where] = value
            elif isinstance(where, str):
                kwargs[where] = value
            else:
                j.error = f"DecodeError: workflow step {wf[2]!r}: bad argument position {where!r}"
                return
        j.call = (tuple(args), kwargs)

    def _run_config(self, cfg: TaskConfig) -> TaskConfig:
        # retries go through Redis (another worker may run them; they survive a crash)
        key = ("run", id(cfg))
        hit = self._cfgs.get(key)
        if hit is None:
            hit = self._cfgs[key] = cfg.replace(max_retries=0, delay_ms=0)
        return hit

    def _progress_target(self, key: int) -> Any:
        """Where the progress reports of the engine task ``key`` go: its result's progress key
        in Redis (progress.py), if it is a task of this worker."""
        j = self._by_key.get(key)
        if j is None or j.msg is None:
            return None
        b = self.broker
        pkey = b.progress_key(str(j.msg[MSG_ID]))
        ttl_ms = int(b.result_ttl * 1000) or 3_600_000
        ser = b.serializer.same_format(j.payload)
        return lambda p: self._r.set(pkey, ser.dumps([p.fraction, p.message]), px=ttl_ms)

    def _finished(self, job: _Job, _handle: Any) -> None:
        if _handle is not None:
            self._by_key.pop(_handle._key, None)
        self._done.append(job)
        self._done_event.set()

    # -- committing ------------------------------------------------------------------------
    def _commit_loop(self) -> None:
        while True:
            self._done_event.wait()
            self._done_event.clear()
            jobs = []
            try:
                while True:
                    jobs.append(self._done.popleft())
            except IndexError:
                pass
            if jobs:
                self._batches += 1
                self._batch_token = b"%s-%d" % (self._mark_base.encode(), self._batches)
                self._unsure = False
                try:
                    acks, counts = self._retrying(self._commit, jobs, committing=True)
                    if acks:
                        self._retrying(self._ack, acks, committing=True)
                    # counted once acknowledged (tests and stats() see what Redis holds)
                    for k, v in counts.items():
                        if v:
                            self.counts[k] += v
                    if self.figures is not None:
                        self.figures.record(jobs, counts["succeeded"])
                except Exception:
                    log.exception(
                        "committing %d task outcomes failed; they stay pending in Redis and will be redelivered",
                        len(jobs),
                    )
                n = len(jobs)
                for j in jobs:
                    if j.handle is not None:
                        self._cancels.untrack(j.msg[MSG_ID])
                with self._cv:
                    for j in jobs:
                        self._owned.pop(j.eid, None)
                    if self._claims:
                        for j in jobs:
                            self._claims.pop(j.eid, None)
                # freed before the capacity is: kept while the fetch loop refills it, these
                # jobs (messages, payloads, handles) would double what a worker holds at its peak
                del jobs, j
                with self._cv:
                    self._inflight -= n
                    self._cv.notify_all()
            elif self._committer_exit:
                return

    def _commit(self, jobs: list[_Job]) -> tuple[list[list[bytes]] | None, dict[str, int]]:
        """Write the outcomes of ``jobs`` in one MULTI transaction. A job whose outcome is
        nothing to write (no result stored, no key, no retry) is acknowledged in it; the others
        are returned, by priority, to be acknowledged once every reply of their commands was
        checked (Redis applies the rest of a transaction when one command fails: a wrong-type
        key, an error in a script). A job with a failed command stays pending, for redelivery.
        Building one job's commands can fail (a value that cannot be encoded, a result over the
        size cap, a defect): that job alone is recorded as failed with the reason."""
        pipe = self._r.pipeline(transaction=True)
        stack = pipe.command_stack  # (a list of redis-py's Pipeline: one entry per queued command)
        acks: list[list[bytes]] = [[], [], [], []]
        written: list[tuple[_Job, int, int, tuple[str, ...]]] = []
        counts = dict.fromkeys(self.counts, 0)
        ctx = self._commit_context()
        self._largest = 0
        all_kinds: list[tuple[str, ...]] = []
        for j in jobs:
            start = len(stack)
            try:
                kinds = self._outcome(pipe, j, ctx)
            except Exception as exc:
                del stack[start:]
                kinds = self._outcome_lost(pipe, j, ctx, exc)
            all_kinds.append(kinds)
            j.kinds = kinds
            if len(stack) == start:
                acks[j.prio].append(j.eid)
                for k in kinds:
                    if k in counts:
                        counts[k] += 1
            else:
                written.append((j, start, len(stack), kinds))
        for j in jobs:  # concurrency leases are given back with the outcome (ratelimit.py)
            if j.lease is not None:
                self._limits.release(pipe, j)
        if self._claims:  # copies that did not succeed give their key's claim back (best effort)
            for j, kinds in zip(jobs, all_kinds, strict=True):
                if j.claim is not None and "settled" not in kinds:
                    self._idem_release(keys=[j.claim[0]], args=[j.claim[1]], client=pipe)
        self._settle(pipe, jobs, all_kinds, ctx[0])
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
            except _redis_errors():
                self._unsure = True
                self._suspect_server_limit()
                raise
        self._resets_with_large = 0
        later: list[list[bytes]] = [[], [], [], []]
        lost = 0
        for j, start, end, kinds in written:
            bad = next((r for r in replies[start:end] if isinstance(r, Exception)), None)
            if bad is not None:
                lost += 1
                j.kinds = ()  # not stored: redelivered, counted then
                log.error(
                    "the outcome of task %s (%s) could not be stored: %s; it is not acknowledged and will be "
                    "redelivered",
                    self._task_id(j),
                    self._task_name(j),
                    bad,
                )
                continue
            later[j.prio].append(j.eid)
            for k in kinds:
                if k in counts:
                    counts[k] += 1
        counts["not_stored"] += lost
        return (later if any(later) else None), counts

    def _settle(self, pipe: Any, jobs: list[_Job], all_kinds: list[tuple[str, ...]], ttl_ms: int) -> None:
        """Tasks that ended for good (not retried, not waiting for their key) let go of what
        refers to them: their idempotency key's submit record keeps no longer than their result
        (dedup.py), their schedule's run-in-progress marker goes (schedules.py)."""
        b = self.broker
        for j, kinds in zip(jobs, all_kinds, strict=True):
            opts = _options(j.msg) if j.msg else None
            if not opts or not isinstance(opts, dict) or "retried" in kinds or "deferred_idempotent" in kinds:
                continue
            key, sched = opts.get(OPT_IDEMPOTENCY_KEY), opts.get(OPT_SCHEDULE)
            if key is None and sched is None:
                continue
            self._task_settled(
                keys=[
                    b.dedup_key(str(key)) if key is not None else "",
                    b.schedule_key(str(sched)) + ":run" if sched is not None else "",
                ],
                args=[str(j.msg[MSG_ID]), ttl_ms],
                client=pipe,
            )

    def _ack(self, acks: list[list[bytes]]) -> None:
        pipe = self._r.pipeline(transaction=True)
        self._queue_acks(pipe, acks)
        pipe.execute()

    def _queue_acks(self, pipe: Any, acks: list[list[bytes]]) -> None:
        for prio, ids in enumerate(acks):
            if ids:
                pipe.xack(self.broker.streams[prio], GROUP, *ids)
                pipe.xdel(self.broker.streams[prio], *ids)

    def _commit_context(self) -> tuple[int, int, int, int]:
        b = self.broker
        ttl_ms = int(b.result_ttl * 1000)
        return ttl_ms, max(1, int(b.idempotency_ttl * 1000)), ttl_ms or 3_600_000, self._max_result

    @staticmethod
    def _task_id(j: _Job) -> str:
        return str(j.msg[MSG_ID]) if j.msg else j.eid.decode(errors="replace")

    @staticmethod
    def _task_name(j: _Job) -> str:
        return str(j.msg[MSG_NAME]) if j.msg else "?"

    def _sized(self, rec: bytes, limit: int, what: str) -> bytes:
        if len(rec) > limit:
            server = (
                f", the server's proto-max-bulk-len {self._server_limit:,}"
                if self._server_limit
                else ", the server reset the connection on a bigger one"
                if limit < self.broker.max_result_bytes
                else ""
            )
            raise _TooLarge(
                f"{what} is {len(rec):,} bytes, over the limit of {limit:,} (max_result_bytes="
                f"{self.broker.max_result_bytes:,}{server}); store large data elsewhere and return a "
                "reference to it"
            )
        self._largest = max(self._largest, len(rec))
        return rec

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
        except _redis_any():
            return  # Redis is away: an outage, not a limit
        self._resets_with_large = 0
        self._max_result = self._largest - 1
        log.warning(
            "redis reset the connection twice on a commit holding a %d-byte record while it answers otherwise; "
            "results of that size are now refused (its proto-max-bulk-len is lower)",
            self._largest,
        )

    def _outcome(self, pipe: Any, j: _Job, ctx: tuple[int, int, int, int]) -> tuple[str, ...]:
        """Queue the commands that record one job's outcome; return the counters it moves."""
        b = self.broker
        ttl_ms, idem_ms, wf_ttl, limit = ctx
        if j.parked:  # over its concurrency limit: the limit script parked it (ratelimit.py)
            return ("parked_concurrency_limit",)
        if j.defer:  # its key is claimed by another copy (or its rate limit's slot is later): it waits
            self._add_delayed(keys=[b.delayed_key], args=[j.defer, b"%d" % j.prio + j.payload], client=pipe)
            self._next_due_local = min(self._next_due_local, time.monotonic() + j.defer / 1000)
            return ("deferred_rate_limit",) if j.limit_deferred else ("deferred_idempotent",)
        if j.skip and j.wf is not None:
            return ("workflow_steps_skipped",)
        if j.cancelled or (j.wf is None and j.msg and j.msg[MSG_ID] in self._cancels.ids):
            return ("cancelled",)  # its CANCELLED outcome was recorded by the cancel (cancel.py)
        if j.skip:
            if ttl_ms and j.first != j.msg[MSG_ID]:
                ser = b.serializer.same_format(j.payload)
                idem = j.msg[MSG_OPTIONS][OPT_IDEMPOTENCY_KEY]
                gone = ser.dumps(
                    [
                        1,
                        [
                            "DuplicateTask",
                            f"idempotency key {idem!r} was already done by task {j.first}, whose result has expired",
                            "",
                        ],
                    ]
                )
                self._copy_result(
                    keys=[b.result_key(j.first), b.result_key(j.msg[MSG_ID])], args=[ttl_ms, gone], client=pipe
                )
            return ("skipped_idempotent",)
        if j.error is not None:
            return self._dead_job(pipe, j, j.error, ctx)
        h = j.handle
        status = h.status
        ser = b.serializer.same_format(j.payload)
        if status is TaskStatus.SUCCEEDED and j.wf is not None:
            try:
                rec = self._sized(ser.dumps(h.wait(0)), limit, "the step's return value")
            except (TypeError, _TooLarge) as exc:
                err = [
                    type(exc).__name__ if isinstance(exc, TypeError) else "ValueError",
                    f"the step's return value cannot be stored: {exc}",
                    "",
                ]
                return ("failed", *self._dead_job(pipe, j, f"{err[0]}: {err[1]}", ctx, err))
            wf_key = b.workflow_key(str(j.wf[0]))
            self._wf_done(
                keys=[wf_key, b.result_key(str(j.wf[0])), *b.streams, b.delayed_key],
                args=[j.wf[1], rec, wf_ttl],
                client=pipe,
            )
            return ("succeeded",)
        if status is TaskStatus.SUCCEEDED:
            if ttl_ms:
                try:
                    rec = self._sized(ser.dumps([0, h.wait(0), j.msg[MSG_NAME]]), limit, "the task's return value")
                except (TypeError, _TooLarge) as exc:
                    err = [
                        type(exc).__name__ if isinstance(exc, TypeError) else "ValueError",
                        f"the task's return value cannot be stored: {exc}",
                        "",
                    ]
                    if isinstance(exc, _TooLarge):  # a failure of the task: dead-lettered as one
                        return ("failed", *self._dead_job(pipe, j, f"{err[0]}: {err[1]}", ctx, err))
                    rec = ser.dumps([1, err, j.msg[MSG_NAME]])
                key = b.result_key(j.msg[MSG_ID])
                pipe.rpush(key, rec)
                pipe.pexpire(key, ttl_ms)
            if j.claim is not None:  # (last: once queued, this job's claim goes with the done key)
                self._idem_done(
                    keys=[b.done_key(str(j.msg[MSG_OPTIONS][OPT_IDEMPOTENCY_KEY])), j.claim[0]],
                    args=[j.msg[MSG_ID], idem_ms, j.claim[1]],
                    client=pipe,
                )
                return ("succeeded", "settled")
            return ("succeeded",)
        try:
            h.wait(0)
            failure: BaseException = RuntimeError(f"task ended {status.name}")
        except BaseException as e:  # the task's own exception
            failure = e
        cfg = cast(TaskConfig, j.cfg)  # set for every job that ran (j.error is None)
        attempt = j.msg[MSG_ATTEMPTS] if len(j.msg) > MSG_ATTEMPTS else 0
        retry = attempt < cfg.max_retries and (
            (status is TaskStatus.FAILED and isinstance(failure, cfg.retry_on))
            or (status is TaskStatus.TIMED_OUT and cfg._retry_ms[2])
        )
        if retry:
            msg = b.serializer.loads(j.payload)  # the arguments were dropped from j.msg (see _Job)
            if len(msg) < 6:
                msg += [0, None][len(msg) - 4 :]
            msg[MSG_ATTEMPTS] = attempt + 1
            member = b"%d" % j.prio + ser.dumps(msg)
            delay = min(backoff_ms(cfg, attempt + 1), _MAX_BACKOFF_MS)  # (inf and NaN: the cap)
            delay = delay if delay >= 0 else _MAX_BACKOFF_MS
            self._add_delayed(keys=[b.delayed_key], args=[int(delay), member], client=pipe)
            due = time.monotonic() + delay / 1000
            if due < self._next_due_local:
                self._next_due_local = due  # the fetch loop blocks no longer than that
            return ("retried",)
        err = encode_error(failure)
        if j.wf is None and ttl_ms:
            rec = self._fit(ser, [STATUS_CODES.get(status, 1), err, j.msg[MSG_NAME]], limit)
            key = b.result_key(j.msg[MSG_ID])
            pipe.rpush(key, rec)
            pipe.pexpire(key, ttl_ms)
            return ("failed", *self._dead_job(pipe, j, f"{err[0]}: {err[1]}\n{err[2]}", ctx, err, result=False))
        return ("failed", *self._dead_job(pipe, j, f"{err[0]}: {err[1]}\n{err[2]}", ctx, err))

    def _fit(self, ser: Any, rec: list, limit: int) -> bytes:
        """A failure record within ``limit``: the message and traceback shortened if need be."""
        out = ser.dumps(rec)
        if len(out) > limit:
            kind, message, tb = rec[1][:3]
            keep = max(100, limit // 4)
            rec = [rec[0], [kind, message[:keep] + " [...]", tb[-keep:]], *rec[2:]]
            out = ser.dumps(rec)
        return out

    def _dead_job(
        self,
        pipe: Any,
        j: _Job,
        error: str,
        ctx: tuple[int, int, int, int],
        cause: list | None = None,
        result: bool = True,
    ) -> tuple[str, ...]:
        """Dead-letter ``j`` with ``error``; its waiters (or its workflow run) learn why."""
        b = self.broker
        ttl_ms, _, wf_ttl, limit = ctx
        self._dead(pipe, j, error)
        kind, _, text = error.partition(": ")
        cause = cause if cause is not None else [kind, text, ""]
        wf = j.wf if j.wf is not None else self._step_of(j)
        if wf is not None:
            self._fail_workflow(pipe, j, wf, cause, wf_ttl)
        elif result and ttl_ms and j.msg:  # the task id is known: its waiters learn why
            key = b.result_key(j.msg[MSG_ID])
            ser = b.serializer.same_format(j.payload) if j.payload[:1] in (b"m", b"j", b"p") else b.serializer
            pipe.rpush(key, self._fit(ser, [1, cause, j.msg[MSG_NAME]], limit))
            pipe.pexpire(key, ttl_ms)
        return ("dead_lettered",)

    def _outcome_lost(self, pipe: Any, j: _Job, ctx: tuple[int, int, int, int], exc: BaseException) -> tuple[str, ...]:
        """Recording the outcome of ``j`` raised (only this job's commands were dropped): record
        that as its failure. Built from plain strings, so this cannot fail the same way."""
        log.error(
            "recording the outcome of task %s (%s) failed: %s",
            self._task_id(j),
            self._task_name(j),
            _describe(exc),
            exc_info=exc,
        )
        j.wf = j.wf if isinstance(j.wf, list) and len(j.wf) == 4 else None
        err = [type(exc).__name__, f"the outcome of the task could not be recorded: {_describe(exc)}", ""]
        return ("failed", *self._dead_job(pipe, j, f"{err[0]}: {err[1]}", ctx, err))

    @staticmethod
    def _step_of(j: _Job) -> list | None:
        opts = (
            j.msg[MSG_OPTIONS] if j.msg and len(j.msg) > MSG_OPTIONS and isinstance(j.msg[MSG_OPTIONS], dict) else None
        )
        wf = opts.get(OPT_WORKFLOW) if opts else None
        return wf if isinstance(wf, list) and len(wf) == 4 else None

    def _fail_workflow(self, pipe: Any, j: _Job, wf: list, cause: list, ttl_ms: int) -> None:
        """A step failed for good: the run fails with WorkflowError naming it (first failure
        only); steps not yet released never run."""
        b = self.broker
        run_id, _, step, name = (str(x) for x in wf)
        message = f"workflow {name!r}: step {step!r} failed: {cause[0]}: {cause[1]}"
        ser = b.serializer.same_format(j.payload) if j.payload[:1] in (b"m", b"j") else b.serializer
        rec = ser.dumps(
            [
                1,
                [
                    wire_name(WorkflowError),
                    message,
                    cause[2] if len(cause) > 2 else "",
                    {"workflow": name, "step": step, "cause": cause},
                ],
            ]
        )
        self._wf_failed(keys=[b.workflow_key(run_id), b.result_key(run_id)], args=[rec, ttl_ms], client=pipe)

    def _dead(self, pipe: Any, j: _Job, error: str) -> None:
        msg = j.msg
        pipe.xadd(
            self.broker.dead_key,
            {
                "m": j.payload,
                "e": error[:8000],
                "n": str(msg[MSG_NAME]) if msg else "",
                "i": str(msg[MSG_ID]) if msg else "",
                "p": j.prio,
                "t": int(time.time() * 1000),
                "w": self.consumer,
            },
            maxlen=self.broker.dead_letter_maxlen,
            approximate=False,
        )  # bounded: the oldest go

    def stats(self) -> dict[str, Any]:
        with self._cv:
            inflight = self._inflight
        return {"consumer": self.consumer, "concurrency": self.concurrency, "in_flight": inflight, **self.counts}
