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
from typing import Any

from .. import _engine
from ..config import TaskConfig, TaskStatus
from ..errors import WorkflowError, encode_error, wire_name
from . import scripts
from .redis import _STATUS_CODES, CONFIG_ATTR, GROUP, RedisBroker
from .serialization import DecodeError

__all__ = ["Worker"]

log = logging.getLogger("catzilla_tasks.worker")

_DEFAULT_CONFIG = TaskConfig()
_ERRORS = None
# keys of a message's options that are not TaskConfig fields: idempotency key, workflow step,
# where a step takes earlier steps' values
_NOT_CONFIG = ("k", "w", "f")


def _redis_errors() -> tuple[type[BaseException], ...]:
    global _ERRORS
    if _ERRORS is None:
        import redis

        _ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
    return _ERRORS


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

    __slots__ = ("worker", "prio", "eid", "msg", "payload", "func", "cfg", "handle", "error", "skip", "first", "wf",
                 "call", "claim", "defer")

    def __init__(self, worker: "Worker", prio: int, eid: bytes, msg: Any, payload: bytes) -> None:
        self.worker = worker
        self.prio = prio
        self.eid = eid
        self.msg = msg
        self.payload = payload
        self.func: Any = None
        self.cfg: TaskConfig | None = None
        self.handle: Any = None
        self.error: str | None = None  # set: dead-letter this entry with that error, unrun
        self.skip = False              # an idempotency key already done: acknowledge, do not run
        self.first = ""                # then: the id of the task that did it
        self.wf: list | None = None    # a workflow step: [run id, step index, step id, workflow name]
        self.call: tuple | None = None  # a step's (args, kwargs) with the values of earlier steps in
        self.claim: tuple[str, str] | None = None  # its idempotency key's claim: (claim key, token)
        self.defer = 0                 # > 0: another copy holds its key: back to the delayed set, ms

    def __call__(self, handle: Any) -> None:  # the engine's done-callback (any thread, GIL held)
        self.worker._finished(self, handle)


class Worker:
    """Runs the tasks of ``broker`` (default: ``tasks.broker``) on the local engine ``tasks``.

    ``concurrency``: most tasks held at once (fetched and not yet acknowledged); the worker
    fetches only its free capacity. ``run()`` returns after ``stop()`` (or SIGTERM/SIGINT with
    ``install_signals=True``): it stops fetching, lets in-flight tasks finish, acknowledges them.
    """

    def __init__(
        self,
        tasks: Any,
        broker: RedisBroker | None = None,
        *,
        concurrency: int = 16,
        consumer: str | None = None,
        block_ms: int = 200,
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
        self._committer: threading.Thread | None = None
        self._committer_exit = False
        self._cfgs: dict[tuple[str, Any], TaskConfig] = {}
        self._registry = getattr(tasks, "_registered", {})
        self._names: dict[str, str] = {}
        self.counts = {"fetched": 0, "succeeded": 0, "failed": 0, "retried": 0, "dead_lettered": 0,
                       "skipped_idempotent": 0, "deferred_idempotent": 0, "reclaimed": 0,
                       "workflow_steps_skipped": 0, "recovered": 0}
        self._next_due_local: float = 0.0  # monotonic time of the next delayed task (0: check now)
        self._submit = functools.partial(_engine.Engine._submit, tasks)
        self.ready = threading.Event()  # set once the groups exist and fetching starts

    # -- life ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop fetching; run() returns once in-flight tasks are finished and acknowledged."""
        self._stop.set()
        with self._cv:
            self._cv.notify_all()

    def _ensure_groups(self) -> None:
        import redis

        for s in self.broker.streams:
            try:
                self._r.xgroup_create(s, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def run(self, install_signals: bool = False) -> None:
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        self._retrying(self._ensure_groups)
        self._committer = threading.Thread(target=self._commit_loop, name="catzilla-committer", daemon=True)
        self._committer.start()
        self.ready.set()
        try:
            self._fetch_loop()
        finally:
            # finish what we hold: heartbeats go on so nobody takes it meanwhile
            hb_every = self.broker.visibility_timeout / 3
            with self._cv:
                while self._inflight > 0:
                    self._cv.wait(hb_every)
                    if self._inflight > 0:
                        self._cv.release()
                        try:
                            self._heartbeat()
                        finally:
                            self._cv.acquire()
            self._committer_exit = True
            self._done_event.set()
            self._committer.join()
            self._leave()

    def _leave(self) -> None:
        """Remove this worker's consumer from the groups where nothing is pending for it (see
        scripts.LEAVE_GROUPS): a process's consumer name is never used again, and left there it
        would stay in Redis for good. Best effort: a consumer left behind costs a few bytes."""
        try:
            self._leave_groups(keys=list(self.broker.streams), args=[GROUP, self.consumer])
        except Exception as exc:  # Redis away, or a server without the command: the consumer stays
            log.warning("could not remove consumer %s from the groups: %s", self.consumer, exc)

    def _retrying(self, fn: Any, *args: Any) -> Any:
        delay = 0.05
        while True:
            try:
                return fn(*args)
            except _redis_errors() as exc:
                if self._stop.is_set() and fn is not self._commit:
                    raise
                log.warning("redis unavailable (%s); retrying in %.1f s", exc, delay)
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
                    wait_ms = max(1, min(wait_ms, int((self._next_due_local - time.monotonic()) * 1000) + 1))
                got = self._r.xreadgroup(GROUP, self.consumer, {s: ">" for s in self.broker.streams},
                                         count=1, block=wait_ms)
                if got:
                    self._dispatch(self._flatten(got))
            except errors as exc:
                # a fetch whose reply was lost still gave us its entries: look for them
                self._lost_replies = True
                log.warning("redis unavailable (%s); retrying", exc)
                time.sleep(0.2)  # back-off before reconnecting, not synchronisation
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc):  # the server lost its data (no persistence): set up again
                    self._retrying(self._ensure_groups)
                else:
                    raise

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
            last = "0"
            while len(found) < free:
                got = self._r.xreadgroup(GROUP, self.consumer, {s: last}, count=max(100, free))
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
        for eid, rows in zip(ids, pipe.execute()):
            if rows:
                out[eid] = int(rows[0]["times_delivered"])
        return out

    def _heartbeat(self) -> None:
        """Reset the idle time of the tasks we hold, so no one reclaims them while we live."""
        with self._cv:
            owned = list(self._owned.items())
            claims = [(eid, *c) for eid, c in self._claims.items() if eid in self._owned] if self._claims else None
        if not owned:
            return
        by_prio: dict[int, list[bytes]] = {}
        for eid, prio in owned:
            by_prio.setdefault(prio, []).append(eid)
        pipe = self._r.pipeline(transaction=False)
        for prio, ids in by_prio.items():
            for i in range(0, len(ids), 1000):
                pipe.xclaim(self.broker.streams[prio], GROUP, self.consumer, 0, ids[i:i + 1000], justid=True)
        if claims:  # and the leases of the idempotency keys of the copies running here
            lease = int(self.broker.visibility_timeout * 1000)
            streams = self.broker.streams
            prios = dict(owned)
            for i in range(0, len(claims), 500):
                keys: list[str] = []
                args: list[Any] = [lease, GROUP, self.consumer]
                for eid, claim_key, token in claims[i:i + 500]:
                    keys += (claim_key, streams[prios[eid]])
                    args += (token, eid)
                self._idem_renew(keys=keys, args=args, client=pipe)
        pipe.execute()

    # -- dispatch --------------------------------------------------------------------------
    def _config(self, name: str, func: Any, opts: dict[str, Any] | None) -> TaskConfig:
        cfg_opts = [(k, v) for k, v in opts.items() if k not in _NOT_CONFIG] if opts else None
        key = (name, tuple(sorted(cfg_opts)) if cfg_opts else None)
        cfg = self._cfgs.get(key)
        if cfg is None:
            base = getattr(func, CONFIG_ATTR, None)
            if not isinstance(base, TaskConfig):
                base = _DEFAULT_CONFIG
            fields = dict(cfg_opts or ())
            cfg = base.replace(**fields) if fields else base
            if len(self._cfgs) > 1024:
                self._cfgs.clear()
            self._cfgs[key] = cfg
        return cfg

    def _decode(self, prio: int, eid: bytes, fields: Any) -> _Job:
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
        if (not isinstance(msg, list) or len(msg) < 4 or not isinstance(msg[0], str) or not isinstance(msg[1], str)
                or not isinstance(msg[2], list) or not isinstance(msg[3], dict)
                or (len(msg) > 4 and not isinstance(msg[4], int))
                or (len(msg) > 5 and msg[5] is not None and not isinstance(msg[5], dict))):
            job.error = f"DecodeError: not a task message: {msg!r:.200}"
            return job
        job.msg = msg
        func = self._registry.get(msg[1])
        if func is not None:  # one copy of each task name, not one per message held
            msg[1] = self._names.setdefault(msg[1], msg[1])
        if func is None:
            job.error = (f"LookupError: unknown task name {msg[1]!r}: this worker's engine has no task registered "
                         "under it (register it with @tasks.task in the module the worker imports)")
            return job
        job.func = func
        try:
            job.cfg = self._config(msg[1], func, msg[5] if len(msg) > 5 else None)
        except (TypeError, ValueError) as exc:
            job.error = f"{type(exc).__name__}: bad per-task options: {exc}"
        return job

    def _dispatch(self, entries: list[tuple[int, bytes, Any]], deliveries: dict[bytes, int] | None = None) -> None:
        self._run_jobs([self._decode(p, e, f) for p, e, f in entries], deliveries)

    def _run_jobs(self, jobs: list[_Job], deliveries: dict[bytes, int] | None = None) -> None:
        limit = self.broker.max_deliveries
        if deliveries and limit:
            for j in jobs:
                n = deliveries.get(j.eid, 0)
                if n > limit and j.error is None:
                    j.error = (f"catzilla_tasks.errors.WorkerLost: delivered {n} times (max_deliveries={limit}); every worker that took "
                               "it stopped before finishing it: the task may be what kills them")
        with self._cv:
            self._inflight += len(jobs)
            for j in jobs:
                self._owned[j.eid] = j.prio
        self.counts["fetched"] += len(jobs)
        keyed = [j for j in jobs if j.error is None and len(j.msg) > 5 and j.msg[5] and "k" in j.msg[5]]
        if keyed:
            self._claim(keyed)
        steps = [j for j in jobs if len(j.msg or ()) > 5 and j.msg[5] and "w" in j.msg[5]]
        if steps:
            self._prepare_steps(steps)
        submit = self._submit
        finished = self._finished
        for j in jobs:
            msg = j.msg
            if j.error is not None or j.skip or j.defer:
                finished(j, None)
                continue
            cfg = j.cfg
            run_cfg = cfg if not (cfg.max_retries or cfg._delay_ns) else self._run_config(cfg)
            args, kwargs = j.call if j.call is not None else (tuple(msg[2]), msg[3])
            try:
                h = submit(j.func, args, kwargs, run_cfg, -1)
            except Exception as exc:  # e.g. bad arguments for isolation, engine shut down
                j.error = f"{type(exc).__name__}: could not start the task: {exc}"
                finished(j, None)
                continue
            del args, kwargs
            msg[2] = msg[3] = j.call = None  # the engine holds its own references (see _Job)
            j.handle = h
            h._on_done(j)

    def _claim(self, keyed: list[_Job]) -> None:
        """Claim the idempotency keys of fetched copies (one script, atomic): a copy runs only
        if it got its key's claim; one whose key is done is acknowledged with the first run's
        result; one whose key another copy holds waits in the delayed set (``defer``)."""
        b = self.broker
        keys: list[str] = []
        tokens: list[str] = []
        for j in keyed:
            k = str(j.msg[5]["k"])
            keys += (b.done_key(k), b.claim_key(k))
            tokens.append(f"{self.consumer} {j.eid.decode()}")
        replies = self._idem_claim(keys=keys, args=[int(b.visibility_timeout * 1000), *tokens])
        claimed = {}
        for i, (j, got) in enumerate(zip(keyed, replies)):
            if isinstance(got, bytes):
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
        values of earlier steps that a step takes (read from the run's hash, one round trip)."""
        b = self.broker
        pipe = self._r.pipeline(transaction=False)
        wanted = []
        for j in steps:
            wf = j.msg[5]["w"]
            fills = j.msg[5].get("f") or []
            if not (isinstance(wf, list) and len(wf) == 4 and isinstance(fills, list)):
                j.error = f"DecodeError: bad workflow step options: {j.msg[5]!r:.200}"
                wanted.append(None)
                continue
            j.wf = wf
            srcs: list[int] = []
            for _, src in fills:
                srcs.extend(src if isinstance(src, list) else [src])
            srcs = list(dict.fromkeys(srcs))
            pipe.hmget(b.workflow_key(str(wf[0])), ["state", *(f"v:{s}" for s in srcs)])
            wanted.append(srcs)
        replies = iter(pipe.execute())
        for j, srcs in zip(steps, wanted):
            if srcs is None:
                continue
            state, *vals = next(replies)
            if state != b"run":
                j.skip = True  # the run failed (or is gone): acknowledged, not run
                j.first = ""
                continue
            fills = j.msg[5].get("f") or []
            if not fills:
                continue
            got = {}
            for s_, v in zip(srcs, vals):
                if v is None:
                    j.error = f"LookupError: workflow step {j.wf[2]!r}: the value of step {s_} is not in Redis"
                    break
                try:
                    got[s_] = b.serializer.loads(v)
                except DecodeError as exc:
                    j.error = f"DecodeError: workflow step {j.wf[2]!r}: the value of step {s_}: {exc}"
                    break
            if j.error is not None:
                continue
            args = list(j.msg[2])
            kwargs = dict(j.msg[3])
            for where, src in fills:
                value = [got[x] for x in src] if isinstance(src, list) else got[src]
                if isinstance(where, int) and 0 <= where < len(args):
                    args[where] = value
                elif isinstance(where, str):
                    kwargs[where] = value
                else:
                    j.error = f"DecodeError: workflow step {j.wf[2]!r}: bad argument position {where!r}"
                    break
            j.call = (tuple(args), kwargs)

    def _run_config(self, cfg: TaskConfig) -> TaskConfig:
        # retries go through Redis (another worker may run them; they survive a crash)
        key = ("run", id(cfg))
        hit = self._cfgs.get(key)  # type: ignore[arg-type]
        if hit is None:
            hit = self._cfgs[key] = cfg.replace(max_retries=0, delay_ms=0)  # type: ignore[index]
        return hit

    def _finished(self, job: _Job, _handle: Any) -> None:
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
                try:
                    self._retrying(self._commit, jobs)
                except Exception:
                    log.exception("committing %d task outcomes failed; they stay pending and will be redelivered", len(jobs))
                n = len(jobs)
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

    def _commit(self, jobs: list[_Job]) -> None:
        b = self.broker
        pipe = self._r.pipeline(transaction=True)
        acks: list[list[bytes]] = [[], [], [], []]
        ttl_ms = int(b.result_ttl * 1000)
        idem_ms = max(1, int(b.idempotency_ttl * 1000))
        # counted once the transaction is applied (tests and stats() see what Redis holds)
        counts = dict.fromkeys(self.counts, 0)
        wf_ttl = ttl_ms or 3_600_000
        settled: set[bytes] = set()  # entries whose key this commit marks done (their claim goes with it)
        for j in jobs:
            acks[j.prio].append(j.eid)
            if j.defer:  # its key is claimed by another copy: it waits in the delayed set, unrun
                counts["deferred_idempotent"] += 1
                self._add_delayed(keys=[b.delayed_key], args=[j.defer, b"%d" % j.prio + j.payload], client=pipe)
                self._next_due_local = min(self._next_due_local, time.monotonic() + j.defer / 1000)
                continue
            if j.skip and j.wf is not None:
                counts["workflow_steps_skipped"] += 1
                continue
            if j.skip:
                counts["skipped_idempotent"] += 1
                if ttl_ms and j.first != j.msg[0]:
                    ser = b.serializer.same_format(j.payload)
                    gone = ser.dumps([1, ["DuplicateTask", f"idempotency key {j.msg[5]['k']!r} was already done by "
                                      f"task {j.first}, whose result has expired", ""]])
                    self._copy_result(keys=[b.result_key(j.first), b.result_key(j.msg[0])], args=[ttl_ms, gone],
                                      client=pipe)
                continue
            if j.error is not None:
                self._dead(pipe, j, j.error, counts)
                wf = j.wf if j.wf is not None else self._step_of(j)
                if wf is not None:
                    kind, _, text = j.error.partition(": ")
                    self._fail_workflow(pipe, j, wf, [kind, text, ""], wf_ttl)
                    continue
                if ttl_ms and j.msg:  # the task id is known: its waiters learn why
                    key = b.result_key(j.msg[0])
                    kind, _, text = j.error.partition(": ")
                    pipe.rpush(key, b.serializer.same_format(j.payload).dumps([1, [kind, text, ""]]))
                    pipe.pexpire(key, ttl_ms)
                continue
            h = j.handle
            status = h.status
            ser = b.serializer.same_format(j.payload)
            if status is TaskStatus.SUCCEEDED and j.wf is not None:
                try:
                    rec = ser.dumps(h.wait(0))
                except TypeError as exc:
                    counts["failed"] += 1
                    err = ["TypeError", f"the step's return value cannot be stored: {exc}", ""]
                    self._dead(pipe, j, f"{err[0]}: {err[1]}", counts)
                    self._fail_workflow(pipe, j, j.wf, err, wf_ttl)
                    continue
                counts["succeeded"] += 1
                wf_key = b.workflow_key(str(j.wf[0]))
                self._wf_done(keys=[wf_key, b.result_key(str(j.wf[0])), *b.streams, b.delayed_key], args=[j.wf[1], rec, wf_ttl],
                              client=pipe)
                continue
            if status is TaskStatus.SUCCEEDED:
                counts["succeeded"] += 1
                if ttl_ms:
                    try:
                        rec = ser.dumps([0, h.wait(0)])
                    except TypeError as exc:
                        rec = ser.dumps([1, ["TypeError", f"the task's return value cannot be stored: {exc}", ""]])
                    key = b.result_key(j.msg[0])
                    pipe.rpush(key, rec)
                    pipe.pexpire(key, ttl_ms)
                if j.claim is not None:
                    self._idem_done(keys=[b.done_key(str(j.msg[5]["k"])), j.claim[0]],
                                    args=[j.msg[0], idem_ms, j.claim[1]], client=pipe)
                    settled.add(j.eid)
                continue
            try:
                h.wait(0)
                exc: BaseException = RuntimeError(f"task ended {status.name}")
            except BaseException as e:  # the task's own exception
                exc = e
            cfg = j.cfg
            attempt = j.msg[4] if len(j.msg) > 4 else 0
            retry = attempt < cfg.max_retries and (
                (status is TaskStatus.FAILED and isinstance(exc, cfg.retry_on))
                or (status is TaskStatus.TIMED_OUT and cfg._retry_ms[2])
            )
            if retry:
                counts["retried"] += 1
                msg = b.serializer.loads(j.payload)  # the arguments were dropped from j.msg (see _Job)
                if len(msg) < 6:
                    msg += [0, None][len(msg) - 4:]
                msg[4] = attempt + 1
                member = b"%d" % j.prio + ser.dumps(msg)
                delay = backoff_ms(cfg, attempt + 1)
                self._add_delayed(keys=[b.delayed_key], args=[int(delay), member], client=pipe)
                due = time.monotonic() + delay / 1000
                if due < self._next_due_local:
                    self._next_due_local = due  # the fetch loop blocks no longer than that
                continue
            counts["failed"] += 1
            err = encode_error(exc)
            if j.wf is not None:
                self._dead(pipe, j, f"{err[0]}: {err[1]}\n{err[2]}", counts)
                self._fail_workflow(pipe, j, j.wf, err, wf_ttl)
                continue
            if ttl_ms:
                key = b.result_key(j.msg[0])
                pipe.rpush(key, ser.dumps([_STATUS_CODES.get(status, 1), err]))
                pipe.pexpire(key, ttl_ms)
            self._dead(pipe, j, f"{err[0]}: {err[1]}\n{err[2]}", counts)
        if self._claims:  # copies that did not succeed give their key's claim back
            for j in jobs:
                if j.claim is not None and j.eid not in settled:
                    self._idem_release(keys=[j.claim[0]], args=[j.claim[1]], client=pipe)
        for prio, ids in enumerate(acks):
            if ids:
                pipe.xack(b.streams[prio], GROUP, *ids)
                pipe.xdel(b.streams[prio], *ids)
        pipe.execute()
        for k, v in counts.items():
            if v:
                self.counts[k] += v

    @staticmethod
    def _step_of(j: _Job) -> list | None:
        opts = j.msg[5] if j.msg and len(j.msg) > 5 and isinstance(j.msg[5], dict) else None
        wf = opts.get("w") if opts else None
        return wf if isinstance(wf, list) and len(wf) == 4 else None

    def _fail_workflow(self, pipe: Any, j: _Job, wf: list, cause: list, ttl_ms: int) -> None:
        """A step failed for good: the run fails with WorkflowError naming it (first failure
        only); steps not yet released never run."""
        b = self.broker
        run_id, _, step, name = (str(x) for x in wf)
        message = f"workflow {name!r}: step {step!r} failed: {cause[0]}: {cause[1]}"
        ser = b.serializer.same_format(j.payload) if j.payload[:1] in (b"m", b"j") else b.serializer
        rec = ser.dumps([1, [wire_name(WorkflowError), message, cause[2] if len(cause) > 2 else "",
                             {"workflow": name, "step": step, "cause": cause}]])
        self._wf_failed(keys=[b.workflow_key(run_id), b.result_key(run_id)], args=[rec, ttl_ms], client=pipe)

    def _dead(self, pipe: Any, j: _Job, error: str, counts: dict[str, int]) -> None:
        counts["dead_lettered"] += 1
        msg = j.msg
        pipe.xadd(self.broker.dead_key, {
            "m": j.payload,
            "e": error[:8000],
            "n": msg[1] if msg else "",
            "i": msg[0] if msg else "",
            "p": j.prio,
            "t": int(time.time() * 1000),
            "w": self.consumer,
        }, maxlen=self.broker.dead_letter_maxlen, approximate=False)  # bounded: the oldest go

    def stats(self) -> dict[str, Any]:
        with self._cv:
            inflight = self._inflight
        return {"consumer": self.consumer, "concurrency": self.concurrency, "in_flight": inflight, **self.counts}
