"""A distributed worker: the local engine (BackgroundTasks) fed from a broker.

``catzilla-tasks worker module:tasks --concurrency N`` runs :class:`Worker`, on any broker:
it talks to the broker only through its consumer session (:class:`~.base.ConsumerSession`,
``broker.consumer(name)``: Redis streams for RedisBroker, memory for MemoryBroker). Three parts:

* the fetch loop (the calling thread) takes at most the free capacity (``N`` minus the tasks it
  holds), highest priority first, waits in the session's fetch when there is nothing, and hands
  each task to the local engine;
* the engine runs tasks as it runs local ones (threads, async, timeouts, process isolation);
* the committer thread turns each finished task into its outcome (:class:`~.base.Outcome`
  operations: result, retry after its back-off, dead letter, idempotency key, workflow step)
  and commits them in batches. A task is acknowledged only in the same commit that records its
  outcome, so a worker killed at any point loses nothing: what it held is reclaimed by a live
  worker after the visibility timeout.

Before a fetched batch runs, the worker asks the session what the broker knows: rate and
concurrency limits (``_admit``: a task runs, waits for its reserved slot, or is parked by the
broker until a lease is free), idempotency keys, workflow runs. A running task's progress
reports go to the session too (``write_progress``).

Housekeeping in the fetch loop: making due delayed tasks fetchable, reclaiming tasks of dead
workers, and renewing (heartbeat) its own long-running tasks (and concurrency leases) so they
are not handed to someone else while it is alive.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import signal
import socket
import threading
import time
from collections import deque
from typing import Any, cast

from .. import _engine
from .. import tracing as _tracing
from ..config import TaskConfig, TaskStatus, parse_rate
from ..errors import encode_error
from ..limits import Limits, limit_key
from . import workflow_runs
from .base import Entries, FetchingBroker, Outcome, destination_name
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
    headers_of,
)
from .ratelimit import LEAD_MS
from .registry import TaskFigures, check_interval
from .serialization import DecodeError

__all__ = ["Worker", "backoff_ms"]

log = logging.getLogger("catzilla_tasks.worker")

# keys of a message's options that are not TaskConfig fields (see protocol.py)
_NOT_CONFIG = (OPT_IDEMPOTENCY_KEY, OPT_WORKFLOW, OPT_FILLS, OPT_SCHEDULE, OPT_RESERVED)
_NO_OPS: tuple = ()


def _options(msg: list[Any]) -> Any:
    """A decoded message's options dict (empty when it has none)."""
    return (msg[MSG_OPTIONS] or {}) if len(msg) > MSG_OPTIONS else {}


# the longest retry back-off a worker schedules (a year): a bigger or non-finite one (a bad
# option from an old producer) is capped, never an error that would spoil the commit
_MAX_BACKOFF_MS = 365 * 86400 * 1000.0


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


def backoff_ms(cfg: TaskConfig, attempt: int) -> float:
    """The wait before retry ``attempt`` (1 = the first retry), as the local engine computes it."""
    base, cap = cfg.retry_base_ms, cfg.retry_max_ms
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
        "ops",
        "kinds",
        "settle",
        "cancelled",
        "lease",
        "parked",
        "limit_deferred",
        "local_delay",
    )

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
        self.ops: tuple = _NO_OPS  # its outcome, for the session's commit (see base.Outcome)
        self.kinds: tuple[str, ...] = _NO_OPS  # the counters its outcome moves; () once not stored (registry.py)
        self.settle: tuple | None = None  # ended for good: (idempotency key, schedule) to let go of
        self.cancelled = False  # cancelled before it started (cancel.py): acknowledged, not run
        # limits (see _admit): its concurrency lease (the session's, released in its commit),
        # parked (over its concurrency limit: the session keeps it; acknowledged here), deferred
        # by its rate limit, ms it waits in the engine's timer for its rate limit's slot
        self.lease: Any = None
        self.parked = False
        self.limit_deferred = False
        self.local_delay = 0

    def __call__(self, handle: Any) -> None:  # the engine's done-callback (any thread, GIL held)
        self.worker._finished(self, handle)

    def task_id(self) -> str:
        return str(self.msg[MSG_ID]) if self.msg else repr(self.eid)

    def task_name(self) -> str:
        return str(self.msg[MSG_NAME]) if self.msg else "?"


class Worker:
    """Runs the tasks of ``broker`` (default: ``tasks.broker``) on the local engine ``tasks``.

    ``concurrency``: most tasks held at once (fetched and not yet acknowledged); the worker
    fetches only its free capacity. ``run()`` returns after ``stop()`` (or SIGTERM/SIGINT with
    ``install_signals=True``): it stops fetching, lets in-flight tasks finish, acknowledges them.

    ``heartbeat_interval``: seconds between the worker's beats in the broker's cluster registry
    (see :mod:`.registry`: who it is, what it holds, its figures per task name; the session's
    ``cluster_heartbeat``); None: not registered and no figures kept. A broker without a
    registry (MemoryBroker) keeps the figures (``worker.figures``) and publishes nothing.
    """

    def __init__(
        self,
        tasks: Any,
        broker: FetchingBroker | None = None,
        *,
        concurrency: int = 16,
        consumer: str | None = None,
        block_ms: int = 200,
        heartbeat_interval: float | None = 2.0,
    ) -> None:
        broker = broker if broker is not None else getattr(tasks, "broker", None)
        if not isinstance(broker, FetchingBroker):
            raise TypeError(
                "Worker: the engine has no broker; create it with BackgroundTasks(broker='redis://...') "
                f"or pass broker=RedisBroker(...) (got {type(broker).__name__})"
            )
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency: must be an integer >= 1, got {concurrency!r}")
        qsize = tasks.stats().get("queue_size") if hasattr(tasks, "stats") else None
        if isinstance(qsize, int) and concurrency > qsize:
            raise ValueError(f"concurrency ({concurrency}) exceeds the engine's queue_size ({qsize})")
        self.tasks = tasks
        self.broker = broker
        self.concurrency = concurrency
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self.block_ms = int(block_ms)
        self.session = session = broker.consumer(self.consumer)
        session.check_block(self.block_ms)
        self._unavailable = session.unavailable
        self._cancels = session.cancel_watch()  # ids of cancelled tasks, and asking running ones to stop
        self._cv = threading.Condition()
        self._inflight = 0
        self._owned: dict[Any, int] = {}  # token -> priority, for the heartbeat's renewal
        self._claims: dict[Any, Any] = {}  # token -> its idempotency key's claim, renewed too
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
        self._registry: dict[str, Any] = dict(getattr(tasks, "registered_tasks", {}))
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
        self._submit = functools.partial(_engine.Engine._submit_plain, tasks)
        self._tracing = bool(getattr(tasks, "tracing", True))  # BackgroundTasks(tracing=False): no spans
        self.ready = threading.Event()  # set once the groups exist and fetching starts
        self._deadline: float | None = None  # when a stopping worker gives up (stop(timeout))
        self._commit_give_up: float | None = None  # (without one: see _shutdown_deadline)
        # no reclaiming of other workers' tasks before this (monotonic): after an outage, live
        # workers need time to renew the leases that aged while nobody could reach the broker
        self._reclaim_after = 0.0
        self._outage = False
        self._mark_base = os.urandom(4).hex()  # batch tokens (a restarted worker may reuse a consumer name)
        self._batches = 0
        # -- rate and concurrency limits (see _admit), progress reports (progress.py) --
        self._delays = Limits()  # (its cache of configs with a delay)
        self._by_key: dict[int, _Job] = {}  # engine task key -> its job, while it runs (progress reports)
        from .. import progress

        progress.add_resolver(self._progress_target)
        # -- the cluster registry (registry.py): figures recorded by the committer, published by
        # the session's heartbeat thread
        self.figures: TaskFigures | None = None
        self._heartbeat_thread: Any = None
        interval = check_interval(heartbeat_interval)
        if interval is not None:
            self.figures = TaskFigures()
            self._heartbeat_thread = session.cluster_heartbeat(self, interval)

    # -- life ----------------------------------------------------------------------------
    def stop(self, timeout: float | None = None) -> None:
        """Stop fetching; ``run()`` returns once the held tasks are finished and their outcomes
        committed. With ``timeout`` (seconds from now), ``run()`` returns by then in any case:
        what is not committed by then (a task still running, the broker unreachable) stays held by
        the broker for redelivery, and is logged. Without it the tasks take as long as they need,
        and a commit that meets a broker error is retried for up to ``visibility_timeout`` (past
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
        wait = self.session.setup()
        if wait > 0:
            self._reclaim_after = time.monotonic() + wait

    def run(self, install_signals: bool = False) -> None:
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        if not self._set_up(claim=True):
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

    def _set_up(self, claim: bool = False) -> bool:
        """Set up the consumer (ConsumerSession.setup), retried while the broker is unreachable; False if the worker was
        stopped meanwhile (a SIGTERM during an outage is a stop, not an error). ``claim`` (at start): first
        register in the cluster registry, which refuses an id a live worker holds (registry.WorkerIdInUse),
        before anything is read under that consumer name."""
        hb = self._heartbeat_thread
        claimed = False
        try:
            if claim and callable(getattr(hb, "claim", None)):
                self._retrying(hb.claim)
                claimed = True
            self._retrying(self._ensure_groups)
        except self._unavailable as exc:
            if claimed:
                hb.stop(deregister=True)
            if not self._stop.is_set():
                raise
            log.warning("stopped before the broker could be reached (%s)", exc)
            return False
        except BaseException:
            if claimed:
                hb.stop(deregister=True)
            raise
        return True

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _enforce_deadline(self) -> None:
        """After ``stop(timeout)``: at the deadline, close the worker's connections (again every
        half second until ``run()`` returns). A broker gone silent (a dropped route: no reset, no
        reply) would otherwise hold a blocked read, or a reconnection's handshake, for a whole
        socket timeout each, and ``run()`` would return long after the deadline."""
        self._deadline_set.wait()
        while self._deadline is not None and not self._returned.is_set():
            left = self._deadline - time.monotonic()
            if left > 0:
                self._returned.wait(left)
                continue
            self.session.interrupt()
            self._returned.wait(0.5)

    def _leave(self) -> None:
        """Drop what the broker keeps of this consumer (best effort, see ConsumerSession.leave)."""
        self.session.leave(self._committer is not None and not self._committer.is_alive())

    def _finish_held(self) -> None:
        """After the fetch loop: let the held tasks finish and be committed (heartbeats go on so
        nobody takes them meanwhile), until the stop deadline if one was given."""
        hb_every = self.broker.visibility_timeout / 3
        with self._cv:
            while self._inflight > 0:
                left = None if self._deadline is None else self._deadline - time.monotonic()
                if left is not None and left <= 0:
                    log.warning(
                        "stopping with %d tasks not finished or not committed; they stay pending in the broker and "
                        "will be redelivered",
                        self._inflight,
                    )
                    break
                self._cv.wait(hb_every if left is None else min(hb_every, left))
                if self._inflight > 0:
                    self._cv.release()
                    try:
                        self._heartbeat()
                    except self.session.errors as exc:
                        log.warning("the broker is unavailable while stopping (%s)", exc)
                    finally:
                        self._cv.acquire()
        self._committer_exit = True
        self._done_event.set()
        left = None if self._deadline is None else max(0.0, self._deadline - time.monotonic()) + 1.0
        committer = cast(threading.Thread, self._committer)  # started by run(), which calls this
        committer.join(left)  # (it gives up by the deadline too: _retrying)

    def _retrying(self, fn: Any, *args: Any, committing: bool = False) -> Any:
        """``fn(*args)``, retried while the broker is unreachable. Once the worker stops, only
        commits are retried (outcomes computed before the stop are worth writing), up to the
        stop deadline; then the error is raised (those tasks stay pending)."""
        delay = 0.05
        while True:
            try:
                return fn(*args)
            except self._unavailable as exc:
                if self._stop.is_set():
                    if not committing or time.monotonic() >= self._shutdown_deadline():
                        raise
                log.warning("the broker is unavailable (%s); retrying in %.1f s", exc, delay)
                if self._stop.is_set():
                    delay = min(delay, max(0.0, self._shutdown_deadline() - time.monotonic()))
                time.sleep(delay)  # back-off before reconnecting, not synchronisation
                delay = min(delay * 2, 2.0)

    # -- fetching --------------------------------------------------------------------------
    def _fetch_loop(self) -> None:
        hk_every = min(self.broker.visibility_timeout / 3, 5.0)
        next_hk = 0.0
        session = self.session
        unavailable = self._unavailable
        refused = session.refused

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
                # no longer than the next heartbeat either: with a short visibility timeout, a
                # held task's entry and its key's claim must be renewed before they run out
                wait_ms = max(1, min(self.block_ms, int((next_hk - time.monotonic()) * 1000) + 1))
                if self._next_due_local:
                    due_ms = int((self._next_due_local - time.monotonic()) * 1000) + 1
                    if due_ms < session.fetch_granularity_ms:
                        # a blocking fetch could return that much late: a delayed task due sooner
                        # (a rate limit's next slot) is waited for here, then promoted
                        self._stop.wait(max(0, due_ms) / 1000)
                        continue
                    wait_ms = max(1, min(wait_ms, due_ms))
                flat = session.fetch(free, wait_ms)
                if flat:
                    # decoded straight from the flat list [prio, token, payload, ...], which is
                    # dropped before the tasks start: a worker holding N tasks holds no copy of
                    # the fetched list besides them
                    decode = self._decode
                    jobs = [decode(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]
                    del flat
                    self._run_jobs(jobs)
                    del jobs
            except unavailable as exc:
                # a fetch whose reply was lost still gave us its entries: look for them
                self._lost_replies = True
                self._outage = True
                next_hk = 0.0  # renew our leases first thing once the broker answers
                log.warning("the broker is unavailable (%s); retrying", exc)
                time.sleep(0.2)  # back-off before reconnecting, not synchronisation
            except refused as exc:
                self._lost_replies = True
                self._outage = True
                next_hk = 0.0
                if session.lost_state(exc):  # the server lost its data (no persistence): set up again
                    self._set_up()
                else:  # a server in a state that refuses us for now (read-only replica, OOM, ...)
                    log.error("the broker refused a fetch (%s); retrying in 1 s", exc)
                    self._stop.wait(1.0)

    def _promote_due(self) -> None:
        nxt = self.session.promote()
        self._next_due_local = nxt if nxt >= 0 else time.monotonic() + self.block_ms / 1000

    def _recover_own(self, free: int) -> int:
        """After a dropped connection: messages the broker handed to this consumer whose reply
        never arrived (the server died between delivering and answering) are held for us,
        where only the visibility timeout would free them. Run what we do not hold, at most
        ``free``. Messages held at the snapshot are skipped; one finished meanwhile was
        acknowledged before it left ``_owned``. Returns how many were taken; the flag stays up
        until none are left."""
        with self._cv:
            held = set(self._owned)
        found, more = self.session.recover(free, held)
        if not more:
            self._lost_replies = False  # (more: the next round takes them)
        n = len(found) // 3
        if n:
            self.counts["recovered"] += n
            log.warning("%d tasks delivered to this worker while the connection dropped are run now", n)
            self._dispatch(found)
        return n

    def _reclaim(self, free: int) -> int:
        """Take over tasks of workers that stopped acknowledging (idle past the visibility
        timeout), at most ``free``; returns how many."""
        if time.monotonic() < self._reclaim_after:
            return 0
        found, deliveries = self.session.reclaim(free)
        n = len(found) // 3
        if n:
            self.counts["reclaimed"] += n
            self._dispatch(found, deliveries)
        return n

    def _heartbeat(self) -> None:
        """Renew the tasks we hold (their idempotency claims, concurrency leases), so no one
        takes them while we live; with none held too (lapsed leases wake parked tasks)."""
        with self._cv:
            owned = list(self._owned.items())
            claims = [(eid, c) for eid, c in self._claims.items() if eid in self._owned] if self._claims else None
        self.session.heartbeat(owned, claims)

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

    def _decode(self, prio: int, eid: Any, payload: Any) -> _Job:
        try:
            return self._parse(prio, eid, payload)
        except Exception as exc:  # whatever a fetched entry holds, it is one dead letter
            job = _Job(self, prio, eid, None, b"")
            job.error = f"DecodeError: {_describe(exc)}"
            return job

    def _parse(self, prio: int, eid: Any, payload: Any) -> _Job:
        if isinstance(payload, str):  # the session found no message there: why
            job = _Job(self, prio, eid, None, b"")
            job.error = payload
            return job
        job = _Job(self, prio, eid, None, payload)
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
        if func is None:  # registered after this worker was made? (a copy: looked at again on a miss)
            self._registry = dict(self.tasks.registered_tasks)
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

    def _dispatch(self, flat: Entries, deliveries: dict[Any, int] | None = None) -> None:
        decode = self._decode
        self._run_jobs([decode(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)], deliveries)

    def _run_jobs(self, jobs: list[_Job], deliveries: dict[Any, int] | None = None) -> None:
        """Count ``jobs`` as held, then hand each one to the engine, or to the committer with
        the reason it does not run. Every job counted here leaves by one of two doors: the
        committer (through ``_finished``: run, skipped or dead-lettered) or ``_release`` (a
        broker error before the hand-off: un-held, still held by the broker, run again later)."""
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
        except self.session.errors:
            # the broker went away (or refused) before these were handed over: not ours any more (the
            # broker holds them for us; _recover_own takes them again once it answers)
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
        self._lost_replies = True  # the broker holds them for us: look there once it is back

    def _look_up(self, jobs: list[_Job]) -> None:
        """What the broker knows before the jobs run: rate and concurrency limits, finished
        idempotency keys, workflow runs."""
        limited = [
            j
            for j in jobs
            if j.error is None and j.cfg is not None and (j.cfg.rate_limit is not None or j.cfg.concurrency_limit)
        ]
        if limited:
            self._admit(limited)
            jobs = [j for j in jobs if not (j.defer or j.parked)]
        keyed = [j for j in jobs if j.error is None and OPT_IDEMPOTENCY_KEY in _options(j.msg)]
        if keyed:
            self._claim(keyed)
        steps = [j for j in jobs if j.error is None and OPT_WORKFLOW in _options(j.msg)]
        if steps:
            self._prepare_steps(steps)

    def _admit(self, jobs: list[_Job]) -> None:
        """Rate and concurrency limits, cluster-wide through the session (see ratelimit.py):
        decide for the limited ``jobs`` (no error) whether each runs (with its lease, if it
        has a concurrency limit; after ``local_delay`` ms if its rate slot is that close), is
        deferred to its rate limit's slot (``defer`` ms through the delayed set, its payload
        marked with the slot it reserved: it does not ask again) or is parked (``parked``)."""
        session = self.session
        ser = self.broker.serializer
        rated: list[tuple[_Job, str]] = []
        leased: list[tuple[_Job, str]] = []
        for j in jobs:
            cfg = cast(TaskConfig, j.cfg)
            msg = j.msg
            try:
                key = limit_key(cfg, tuple(msg[MSG_ARGS]), msg[MSG_KWARGS])
            except Exception as exc:
                j.error = f"{type(exc).__name__}: rate_limit_key failed: {_describe(exc)}"
                continue
            ident = msg[MSG_NAME] if key is None else f"{msg[MSG_NAME]}:{key}"
            slot = _options(msg).get(OPT_RESERVED)
            if cfg.rate_limit is not None and not slot:
                rated.append((j, ident))
                continue
            if isinstance(slot, int) and not isinstance(slot, bool):  # back for its reserved slot
                j.local_delay = max(0, int(slot - time.time() * 1000 - session.clock_offset_ms()))
            if cfg.concurrency_limit is not None:
                leased.append((j, ident))
        if rated:
            # (the emission interval in us, rounded up: never over the rate)
            slots, now_ms = session.reserve_slots(
                [(ident, self._interval_us(cast(TaskConfig, j.cfg))) for j, ident in rated]
            )
            for (j, ident), slot in zip(rated, slots, strict=True):
                wait = slot - now_ms
                if wait > LEAD_MS:
                    msg = ser.loads(j.payload)  # (the payload as sent: its arguments intact)
                    while len(msg) < 6:
                        msg.append(0 if len(msg) == 4 else None)
                    opts = dict(msg[MSG_OPTIONS] or {})
                    opts[OPT_RESERVED] = int(slot)
                    msg[MSG_OPTIONS] = opts
                    j.payload = ser.same_format(j.payload).dumps(msg)
                    j.defer = wait - LEAD_MS
                    j.limit_deferred = True
                    continue
                j.local_delay = max(0, wait)
                if cast(TaskConfig, j.cfg).concurrency_limit is not None:
                    leased.append((j, ident))
        if leased:
            got = session.acquire_leases(
                [
                    (
                        ident,
                        cast(int, cast(TaskConfig, j.cfg).concurrency_limit),
                        f"{j.msg[MSG_ID]}:{j.eid.decode() if isinstance(j.eid, bytes) else j.eid}",
                        j.prio,
                        j.payload,
                    )
                    for j, ident in leased
                ]
            )
            for (j, _), lease in zip(leased, got, strict=True):
                if lease is None:
                    j.parked = True
                else:
                    j.lease = lease

    @staticmethod
    def _interval_us(cfg: TaskConfig) -> int:
        count, per = cast("tuple[float, float]", parse_rate(cfg.rate_limit))
        return max(1, math.ceil(per / count * 1_000_000))

    def _progress_target(self, key: int) -> Any:
        """Where the progress reports of the engine task ``key`` go: the session stores them
        for its result handle (``result.progress``), if it is a task of this worker."""
        j = self._by_key.get(key)
        if j is None or j.msg is None:
            return None
        task_id = str(j.msg[MSG_ID])
        ser = self.broker.serializer.same_format(j.payload)
        session = self.session
        return lambda p: session.write_progress(task_id, ser.dumps([p.fraction, p.message]))

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
            if cfg._plain is not None:  # limits and queue were applied by the broker: not again locally
                cfg = cfg._plain
            run_cfg = cfg if not (cfg.max_retries or cfg.delay_ms) else self._run_config(cfg)
            if j.local_delay:
                run_cfg = self._delays.delayed(run_cfg, j.local_delay)
            args, kwargs = j.call if j.call is not None else (tuple(msg[MSG_ARGS]), msg[MSG_KWARGS])
            func = j.func
            if self._tracing and _tracing.provider_set():  # (tracing hook: its CONSUMER span, any broker)
                dest = destination_name(self.broker, None, j.prio)
                func = _tracing.consumer(func, headers_of(msg), msg[MSG_ID], msg[MSG_NAME], dest)
            h = self._submit(func, args, kwargs, run_cfg, -1)
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
        """Claim the idempotency keys of fetched copies (atomically, ConsumerSession.claim_keys):
        a copy runs only if it got its key's claim; one whose key is done is acknowledged with
        the first run's result; one whose key another copy holds waits in the delayed set
        (``defer``)."""
        keys = [str(j.msg[MSG_OPTIONS][OPT_IDEMPOTENCY_KEY]) for j in keyed]
        replies = self.session.claim_keys([(j.eid, k) for j, k in zip(keyed, keys, strict=True)])
        claimed = {}
        for j, k, (kind, value) in zip(keyed, keys, replies, strict=True):
            if kind == "error":
                j.error = f"ResponseError: idempotency key {k!r} cannot be claimed: {value}"
            elif kind == "done":
                j.skip = True
                j.first = value
            elif kind == "held":
                # looked at again after the holder's lease (if it died) or 1 s (it may finish)
                j.defer = min(max(int(value), 20), 1000)
            else:
                j.claim = claimed[j.eid] = value
        if claimed:
            with self._cv:
                self._claims.update(claimed)

    def _prepare_steps(self, steps: list[_Job]) -> None:
        """Workflow steps (see workflow_runs.prepare_steps): skip those whose run already ended,
        fill in the values of earlier steps that a step takes."""
        workflow_runs.prepare_steps(self.session, self.broker.serializer, steps)

    def _run_config(self, cfg: TaskConfig) -> TaskConfig:
        # retries go through the broker (another worker may run them; they survive a crash)
        key = ("run", id(cfg))
        hit = self._cfgs.get(key)
        if hit is None:
            hit = self._cfgs[key] = cfg.replace(max_retries=0, delay_ms=0)
        return hit

    def _finished(self, job: _Job, _handle: Any) -> None:
        if _handle is not None:
            self._by_key.pop(_handle._key, None)
        self._done.append(job)
        self._done_event.set()

    # -- committing ------------------------------------------------------------------------
    def _commit_loop(self) -> None:
        session = self.session
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
                session.begin_batch(b"%s-%d" % (self._mark_base.encode(), self._batches))
                try:
                    acks, counts = self._retrying(self._commit, jobs, committing=True)
                    if acks:
                        self._retrying(session.ack, acks, committing=True)
                    # counted once acknowledged (tests and stats() see what the broker holds)
                    for k, v in counts.items():
                        if v:
                            self.counts[k] += v
                    if self.figures is not None:  # (one call per acknowledged batch)
                        self.figures.record(jobs, counts["succeeded"])
                except Exception:
                    log.exception(
                        "committing %d task outcomes failed; the broker keeps them held and will redeliver them",
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

    def _commit(self, jobs: list[_Job]) -> tuple[Any, dict[str, int]]:
        """Decide the outcome of each of ``jobs`` (its operations, ``_outcome``) and commit them
        as one batch (ConsumerSession.commit). Deciding one job's outcome can fail (a value
        that cannot be encoded, a result over the size cap, a defect): that job alone is
        recorded as failed with the reason. Decided again on each retry of the batch (the
        size cap may have changed: the session learnt the server's limit)."""
        counts = dict.fromkeys(self.counts, 0)
        ctx = self._commit_context()
        for j in jobs:
            try:
                j.kinds = self._outcome(j, ctx)
            except Exception as exc:
                j.kinds = self._outcome_lost(j, ctx, exc)
            j.settle = self._settle_of(j)
        pending, stored = self.session.commit(jobs, functools.partial(self._rescue, ctx))
        lost = 0
        for j, ok in zip(jobs, stored, strict=True):
            if not ok:
                lost += 1
                j.kinds = ()  # not stored: redelivered, counted then (registry.py)
                continue
            for k in j.kinds:
                if k in counts:
                    counts[k] += 1
        counts["not_stored"] += lost
        return pending, counts

    def _rescue(self, ctx: tuple[int, int], j: _Job, exc: BaseException) -> tuple[str, ...]:
        kinds = self._outcome_lost(j, ctx, exc)
        j.kinds = kinds
        j.settle = self._settle_of(j)
        return kinds

    @staticmethod
    def _settle_of(j: _Job) -> tuple | None:
        """A task that ended for good (not retried, not waiting for its key) lets go of what
        refers to it (``job.settle``, see base.Outcome): its idempotency key's submit record,
        its schedule's run-in-progress marker."""
        opts = _options(j.msg) if j.msg else None
        if not opts or not isinstance(opts, dict) or j.defer or j.parked or "retried" in j.kinds:
            return None
        key, sched = opts.get(OPT_IDEMPOTENCY_KEY), opts.get(OPT_SCHEDULE)
        if key is None and sched is None:
            return None
        return (key, sched)

    def _commit_context(self) -> tuple[int, int]:
        return int(self.broker.result_ttl * 1000), self.session.max_record

    def _sized(self, rec: bytes, limit: int, what: str) -> bytes:
        if len(rec) > limit:
            raise _TooLarge(
                f"{what} is {len(rec):,} bytes, over the limit of {limit:,} (max_result_bytes="
                f"{getattr(self.broker, 'max_result_bytes', limit):,}{self.session.limit_note(limit)}); store large "
                "data elsewhere and return a reference to it"
            )
        return rec

    def _outcome(self, j: _Job, ctx: tuple[int, int]) -> tuple[str, ...]:
        """Set ``j.ops``, the operations of one job's outcome (see base.Outcome); return the
        counters it moves."""
        ttl_ms, limit = ctx
        j.ops = _NO_OPS
        if j.parked:  # over its concurrency limit: the session keeps it until a lease is free
            return ("parked_concurrency_limit",)
        if j.defer:  # its key is claimed by another copy (or its rate limit's slot is later): it waits
            j.ops = ((Outcome.DELAY, j.defer, j.payload),)
            self._next_due_local = min(self._next_due_local, time.monotonic() + j.defer / 1000)
            return ("deferred_rate_limit",) if j.limit_deferred else ("deferred_idempotent",)
        if j.skip and j.wf is not None:
            return ("workflow_steps_skipped",)
        if j.cancelled or (j.wf is None and j.msg and j.msg[MSG_ID] in self._cancels.ids):
            return ("cancelled",)  # its CANCELLED outcome was recorded by the cancel (cancel.py)
        if j.skip:
            if ttl_ms and j.first != j.msg[MSG_ID]:
                ser = self.broker.serializer.same_format(j.payload)
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
                j.ops = ((Outcome.COPY_RESULT, j.first, j.msg[MSG_ID], gone),)
            return ("skipped_idempotent",)
        if j.error is not None:
            return self._dead_job(j, j.error, ctx)
        h = j.handle
        status = h.status
        ser = self.broker.serializer.same_format(j.payload)
        if status is TaskStatus.SUCCEEDED and j.wf is not None:
            try:
                rec = self._sized(ser.dumps(h.wait(0)), limit, "the step's return value")
            except (TypeError, _TooLarge) as exc:
                err = [
                    type(exc).__name__ if isinstance(exc, TypeError) else "ValueError",
                    f"the step's return value cannot be stored: {exc}",
                    "",
                ]
                return ("failed", *self._dead_job(j, f"{err[0]}: {err[1]}", ctx, err))
            j.ops = (workflow_runs.done_op(j.wf, rec),)
            return ("succeeded",)
        if status is TaskStatus.SUCCEEDED:
            ops: tuple = _NO_OPS
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
                        return ("failed", *self._dead_job(j, f"{err[0]}: {err[1]}", ctx, err))
                    rec = ser.dumps([1, err, j.msg[MSG_NAME]])
                ops = ((Outcome.RESULT, j.msg[MSG_ID], rec),)
            if j.claim is not None:  # (last: once committed, this job's claim goes with the done key)
                j.ops = (*ops, (Outcome.KEY_DONE, str(j.msg[MSG_OPTIONS][OPT_IDEMPOTENCY_KEY]), j.msg[MSG_ID]))
                return ("succeeded", "settled")
            j.ops = ops
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
            or (status is TaskStatus.TIMED_OUT and cfg.retry_on_timeout)
        )
        if retry:
            msg = self.broker.serializer.loads(j.payload)  # the arguments were dropped from j.msg (see _Job)
            if len(msg) < 6:
                msg += [0, None][len(msg) - 4 :]
            msg[MSG_ATTEMPTS] = attempt + 1
            if isinstance(msg[MSG_OPTIONS], dict) and OPT_RESERVED in msg[MSG_OPTIONS]:
                del msg[MSG_OPTIONS][OPT_RESERVED]  # the slot was its first run's: a retry asks again
            delay = min(backoff_ms(cfg, attempt + 1), _MAX_BACKOFF_MS)  # (inf and NaN: the cap)
            delay = delay if delay >= 0 else _MAX_BACKOFF_MS
            j.ops = ((Outcome.DELAY, int(delay), ser.dumps(msg)),)
            due = time.monotonic() + delay / 1000
            if due < self._next_due_local:
                self._next_due_local = due  # the fetch loop blocks no longer than that
            return ("retried",)
        err = encode_error(failure)
        if j.wf is None and ttl_ms:
            rec = self._fit(ser, [STATUS_CODES.get(status, 1), err, j.msg[MSG_NAME]], limit)
            kinds = self._dead_job(j, f"{err[0]}: {err[1]}\n{err[2]}", ctx, err, result=False)
            j.ops = ((Outcome.RESULT, j.msg[MSG_ID], rec), *j.ops)
            return ("failed", *kinds)
        return ("failed", *self._dead_job(j, f"{err[0]}: {err[1]}\n{err[2]}", ctx, err))

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
        j: _Job,
        error: str,
        ctx: tuple[int, int],
        cause: list | None = None,
        result: bool = True,
    ) -> tuple[str, ...]:
        """Dead-letter ``j`` with ``error`` (sets ``j.ops``); its waiters (or its workflow run)
        learn why."""
        ttl_ms, limit = ctx
        msg = j.msg
        ops: list[tuple] = [(Outcome.DEAD, error, str(msg[MSG_NAME]) if msg else "", str(msg[MSG_ID]) if msg else "")]
        kind, _, text = error.partition(": ")
        cause = cause if cause is not None else [kind, text, ""]
        wf = j.wf if j.wf is not None else workflow_runs.step_of(j.msg)
        b = self.broker
        if wf is not None:
            ser = b.serializer.same_format(j.payload) if j.payload[:1] in (b"m", b"j") else b.serializer
            ops.append(workflow_runs.failed_ops(ser, wf, cause))
        elif result and ttl_ms and msg:  # the task id is known: its waiters learn why
            ser = b.serializer.same_format(j.payload) if j.payload[:1] in (b"m", b"j", b"p") else b.serializer
            ops.append((Outcome.RESULT, msg[MSG_ID], self._fit(ser, [1, cause, msg[MSG_NAME]], limit)))
        j.ops = tuple(ops)
        return ("dead_lettered",)

    def _outcome_lost(self, j: _Job, ctx: tuple[int, int], exc: BaseException) -> tuple[str, ...]:
        """Deciding or queuing the outcome of ``j`` raised (only this job's operations were
        dropped): record that as its failure. Built from plain strings, so this cannot fail the
        same way."""
        log.error(
            "recording the outcome of task %s (%s) failed: %s",
            j.task_id(),
            j.task_name(),
            _describe(exc),
            exc_info=exc,
        )
        j.wf = j.wf if isinstance(j.wf, list) and len(j.wf) == 4 else None
        err = [type(exc).__name__, f"the outcome of the task could not be recorded: {_describe(exc)}", ""]
        return ("failed", *self._dead_job(j, f"{err[0]}: {err[1]}", ctx, err))

    def stats(self) -> dict[str, Any]:
        with self._cv:
            inflight = self._inflight
        return {"consumer": self.consumer, "concurrency": self.concurrency, "in_flight": inflight, **self.counts}
