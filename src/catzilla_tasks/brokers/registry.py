"""The cluster registry: each worker publishes who it is and what it did, on a heartbeat.

A :class:`Heartbeat` thread per worker writes, every ``interval`` seconds, one pipeline to
Redis (``P`` = the broker's prefix)::

    P:cluster:workers          sorted set: worker id -> its last beat (epoch ms, Redis's clock)
    P:cluster:worker:<id>      hash: the worker's figures (see Heartbeat.fields); a worker of
                               several queues (``--queues``, routing.py) has one entry for all
    P:cluster:errors:<name>    list: the latest failures of task <name> (JSON, newest first,
                               at most ERRORS_KEPT; redacted)
    P:cluster:errors           sorted set: task name -> its latest failure (epoch ms)

Times (the beats, ``last_seen``, ``started``, a failure's ``at``) are in Redis's clock: each beat
asks Redis the time (TIME) and corrects this host's by it, and readers compare with Redis's
clock too, so a host whose clock is off is neither shown lost while it beats nor alive after it
stopped. A worker whose last beat is older than ``LOST_AFTER_BEATS`` of its own intervals is *lost*
(killed, frozen, cut off): what it held stays pending in the streams, where the live workers'
reclaim (XAUTOCLAIM after the visibility timeout) takes it. Every key expires: a worker's
hash and the workers' sorted set ``LOST_AFTER_BEATS`` intervals plus ``retention`` (default:
10 visibility timeouts, as a dead worker's consumer in the streams' group) after the last beat
that wrote them; the failures of a name ``errors_ttl`` (default: the broker's ``result_ttl``,
at least ``retention``) after its last failure. A worker that stops cleanly deletes its entry.

What the heartbeat publishes comes from counters the worker keeps anyway: the committer hands
each acknowledged batch to :class:`TaskFigures` (``record``: a count by name and outcome),
which keeps, per task name, the outcome counts and two latency histograms (run time; queue wait
from the moment the task became due in Redis, the stream entry's time, to its start) in the
engine's bucket layout (``ct_hist.h``: 4 log-linear buckets per power of two from 1 µs), so any
reader merges the histograms of every worker bucket by bucket and reads percentiles from the
merged counts. Timing a task reads its handle's stats (a few µs): at most ``timed_per_beat``
tasks per beat are timed (every task below that rate; a stride through them above it), so the
histograms are a uniform sample under heavy load and the outcome counts are always exact.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from operator import attrgetter, itemgetter
from typing import Any

from .._redact import redact_text
from ..errors import CatzillaTasksError

__all__ = [
    "ERRORS_KEPT",
    "LOST_AFTER_BEATS",
    "Heartbeat",
    "TaskFigures",
    "WorkerIdInUse",
    "bucket",
    "bucket_upper_ns",
    "check_interval",
    "cluster_key",
    "merge",
    "percentile",
    "rss_bytes",
]

log = logging.getLogger("catzilla_tasks.worker")

LOST_AFTER_BEATS = 3  # a worker silent for this many of its intervals is lost
ERRORS_KEPT = 20  # latest failures kept per task name
RETENTION_VISIBILITY_TIMEOUTS = 10  # a lost worker's entry: dropped this many visibility timeouts after its last beat
HIST_BUCKETS = 128
TIMED_PER_BEAT = 200  # most tasks a worker times per beat (a stride through them above that)
_SUCCEEDED = ("succeeded",)
_KINDS = attrgetter("kinds")
_MSG = attrgetter("msg")
_NAME = itemgetter(1)
_MIN_EXP = 10
_ERROR_CHARS = 2000
_ERRORS_HELD = 100  # failures a worker holds between two beats
_TRACEBACK_CHARS = 8000


class WorkerIdInUse(CatzillaTasksError, RuntimeError):
    """A worker's id (``Worker(consumer=...)``) is held by another live worker (another
    process, whose beat is recent): two workers under one id would share a registry entry and
    a consumer name in the streams (each taking over the tasks the other holds). Raised by the
    worker's ``run()`` before it fetches anything. ``worker_id``, ``host`` and ``pid``: the id
    and where the live worker runs."""

    def __init__(self, message: str, *, worker_id: str = "", host: str = "", pid: int | None = None) -> None:
        super().__init__(message)
        self.worker_id = worker_id
        self.host = host
        self.pid = pid


# The instances (Heartbeat.instance) of this process's heartbeats that hold their id: another
# worker of this process claiming one of these ids is refused, although its host and pid are
# the holder's (which, for an entry of another process, mean a killed predecessor)
_live_lock = threading.Lock()
_live: set[str] = set()


def _pid_gone(pid: int) -> bool:
    """True if no process ``pid`` runs on this host (a worker killed before it deregistered)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # (EPERM: it exists, another user's)
        return False
    return False


# -- histograms (the engine's layout, ct_hist.h) ---------------------------------------------
def bucket(ns: int) -> int:
    """The bucket of a duration in ns: ``ct_hist_bucket`` of the C engine."""
    if ns < 1 << _MIN_EXP:
        return 0
    e = ns.bit_length() - 1
    i = (e - _MIN_EXP) * 4 + ((ns >> (e - 2)) & 3) + 1
    return i if i < HIST_BUCKETS else HIST_BUCKETS - 1


def bucket_upper_ns(i: int) -> int:
    """The (exclusive) upper bound of bucket ``i``, in ns: ``ct_hist_upper``."""
    if i == 0:
        return 1 << _MIN_EXP
    e = (i - 1) // 4 + _MIN_EXP
    return (1 << e) + ((i - 1) % 4 + 1) * (1 << (e - 2))


def merge(hists: Iterable[Mapping[Any, int]]) -> dict[int, int]:
    """Sparse histograms ``{bucket: count}`` (keys may be strings, as JSON gives them) summed."""
    out: dict[int, int] = {}
    for h in hists:
        for k, c in h.items():
            i = int(k)
            out[i] = out.get(i, 0) + int(c)
    return out


def percentile(hist: Mapping[int, int], q: float) -> float | None:
    """The ``q``-quantile (0..1) of a sparse histogram, in seconds, interpolated inside its
    bucket (as TaskMonitor reads the engine's); None when it is empty."""
    n = sum(hist.values())
    if not n:
        return None
    rank = q * n
    seen = 0
    for i in sorted(hist):
        c = hist[i]
        if c and seen + c >= rank:
            lo = bucket_upper_ns(i - 1) if i else 0
            hi = bucket_upper_ns(i)
            return (lo + (rank - seen) / c * (hi - lo)) / 1e9
        seen += c
    return bucket_upper_ns(max(hist)) / 1e9


def check_interval(interval: Any) -> float | None:
    """A worker's ``heartbeat_interval``: seconds from 0.01 to 3600, or None (not registered)."""
    if interval is not None and (
        isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0.01 <= interval <= 3600
    ):
        raise ValueError(f"heartbeat_interval: must be a number of seconds from 0.01 to 3600 or None, got {interval!r}")
    return None if interval is None else float(interval)


def cluster_key(prefix: str, *parts: str) -> str:
    """``prefix:cluster:part:...``, the keys of the registry."""
    return ":".join((prefix, "cluster", *parts))


# -- what a worker counts --------------------------------------------------------------------
class _Name:
    __slots__ = ("outcomes", "run", "run_sum_ns", "wait", "wait_sum_ns", "last_total", "rate")

    def __init__(self) -> None:
        self.outcomes: dict[tuple[str, ...], int] = {}  # the committer's kinds tuple -> count
        self.run: dict[int, int] = {}
        self.run_sum_ns = 0
        self.wait: dict[int, int] = {}
        self.wait_sum_ns = 0
        self.last_total = 0  # finished at the previous beat (for the rate)
        self.rate = 0.0


def _kind_counts(outcomes: Mapping[tuple[str, ...], int]) -> dict[str, int]:
    out = {"succeeded": 0, "failed": 0, "retried": 0}
    for kinds, n in outcomes.items():
        if "succeeded" in kinds:
            out["succeeded"] += n
        elif "dead_lettered" in kinds:  # ran and failed for good, or could not run at all
            out["failed"] += n
        elif "retried" in kinds:
            out["retried"] += n
    return out


class TaskFigures:
    """Per task name: outcomes, run-time and queue-wait histograms, new failures. ``record``
    runs on the worker's committer thread, ``snapshot`` on the heartbeat's."""

    def __init__(self, timed_per_beat: int = TIMED_PER_BEAT) -> None:
        self._lock = threading.Lock()
        self._names: dict[str, _Name] = {}
        self._timed_per_beat = timed_per_beat
        self._stride = 1
        self._skip = 0
        self._errors: list[dict[str, Any]] = []  # failures since the last beat (capped)

    def record(self, jobs: Iterable[Any], succeeded: int | None = None) -> None:
        """Count acknowledged jobs (the worker's ``_Job``: ``msg``, ``kinds``, ``handle``,
        ``error``, ``eid``); a job whose outcome was not stored has empty ``kinds`` (counted
        under them, which no figure reads). ``succeeded``: how many of them succeeded, when
        the caller knows (the commit counted them): all of them spares a pass over the jobs."""
        if not isinstance(jobs, list):
            jobs = list(jobs)
        with self._lock:
            if succeeded is None:
                kinds_seen = Counter(map(_KINDS, jobs))
                all_ok = len(kinds_seen) == 1 and _SUCCEEDED in kinds_seen
            else:
                all_ok = succeeded == len(jobs)
            if all_ok:
                # the common batch, all succeeded: counted by name in C loops
                try:
                    by_name = Counter(map(_NAME, map(_MSG, jobs)))
                except TypeError:  # a job without a message (never one that succeeded)
                    self._count_each(jobs)
                else:
                    for name, n in by_name.items():
                        out = self._name(name).outcomes
                        out[_SUCCEEDED] = out.get(_SUCCEEDED, 0) + n
            else:
                self._count_each(jobs)
            # timed: a stride through the tasks (1 when fewer than the budget finish per beat)
            stride = self._stride
            start = self._skip
            for j in jobs[start::stride]:
                if j.handle is not None and j.kinds:
                    msg = j.msg
                    self._time(self._name(msg[1] if msg else "?"), j, j.handle)
            n = len(jobs)
            self._skip = start - n if start >= n else (stride - 1 - (n - 1 - start) % stride)

    def _name(self, name: str) -> _Name:
        f = self._names.get(name)
        if f is None:
            f = self._names[name] = _Name()
        return f

    def _count_each(self, jobs: list[Any]) -> None:
        for j in jobs:
            msg = j.msg
            name = msg[1] if msg else "?"
            kinds = j.kinds
            out = self._name(name).outcomes
            out[kinds] = out.get(kinds, 0) + 1
            if kinds and kinds[0] != "succeeded" and ("dead_lettered" in kinds or "retried" in kinds):
                self._failure(j, name, kinds)

    @staticmethod
    def _time(f: _Name, j: Any, h: Any) -> None:
        try:
            st = h.get_stats()
        except Exception:  # a handle that cannot say: not timed
            return
        run_ms = st.get("execution_time_ms")
        if run_ms is not None:
            ns = max(0, int(run_ms * 1e6))
            i = bucket(ns)
            f.run[i] = f.run.get(i, 0) + 1
            f.run_sum_ns += ns
        started = st.get("started_at")
        eid = j.eid
        if started is not None and isinstance(eid, bytes):
            ms, _, _ = eid.partition(b"-")
            if ms.isdigit():
                # (the stream entry's time is Redis's clock, started_at this host's: skew adds in)
                ns = max(0, int((started - int(ms) / 1000) * 1e9))
                i = bucket(ns)
                f.wait[i] = f.wait.get(i, 0) + 1
                f.wait_sum_ns += ns

    def _failure(self, j: Any, name: str, kinds: tuple[str, ...]) -> None:
        if len(self._errors) >= _ERRORS_HELD:  # more in one beat than anyone reads: the first ones are kept
            return
        kind, message, tb = "Error", "", ""
        h = j.handle
        if j.error is not None:
            kind, _, message = str(j.error).partition(": ")
        elif h is not None:
            try:
                h.wait(0)
                kind, message = "RuntimeError", f"task ended {h.status.name}"
            except BaseException as exc:  # the task's own exception
                from ..errors import encode_error

                try:
                    kind, message, tb = (str(x) for x in encode_error(exc)[:3])
                except Exception:
                    kind, message = type(exc).__name__, "<the error could not be described>"
        msg = j.msg
        broker = getattr(getattr(j, "worker", None), "broker", None)  # (the queue it came from)
        self._errors.append(
            {
                "at": time.time(),
                "queue": getattr(broker, "queue", None),
                "task": name,
                "task_id": str(msg[0]) if msg else "",
                "retried": "retried" in kinds,
                "error": redact_text(f"{kind}: {message}")[:_ERROR_CHARS],
                "traceback": redact_text(tb)[-_TRACEBACK_CHARS:],
            }
        )

    def unpublished(self, errors: list[dict[str, Any]]) -> None:
        """Give back failures a beat took (``snapshot``) but could not publish (Redis away):
        the next beat publishes them, ahead of newer ones (within the same cap)."""
        with self._lock:
            self._errors = [*errors, *self._errors][:_ERRORS_HELD]

    def totals(self) -> dict[str, Any]:
        """Per task name: succeeded, failed, retried, the histograms and their sums (a copy;
        for an exporter: the rates and failures stay the heartbeat's)."""
        with self._lock:
            return {
                name: {
                    **_kind_counts(f.outcomes),
                    "rate": f.rate,
                    "run": dict(f.run),
                    "run_sum_ns": f.run_sum_ns,
                    "wait": dict(f.wait),
                    "wait_sum_ns": f.wait_sum_ns,
                }
                for name, f in self._names.items()
            }

    def snapshot(self, dt: float) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
        """(figures per task name, failures since the last call, tasks finished since the last
        call); also updates each name's rate (tasks finished per second over ``dt``) and the
        timing stride for the next beat."""
        with self._lock:
            errors, self._errors = self._errors, []
            out: dict[str, Any] = {}
            finished = 0
            for name, f in self._names.items():
                counts = _kind_counts(f.outcomes)
                total = counts["succeeded"] + counts["failed"] + counts["retried"]
                finished += total - f.last_total
                f.rate = (total - f.last_total) / dt if dt > 0 else 0.0
                f.last_total = total
                out[name] = {
                    **counts,
                    "rate": round(f.rate, 3),
                    "run": dict(f.run),
                    "run_sum_ns": f.run_sum_ns,
                    "wait": dict(f.wait),
                    "wait_sum_ns": f.wait_sum_ns,
                }
            self._stride = max(1, math.ceil(finished / self._timed_per_beat))
        return out, errors, finished


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# -- the heartbeat ---------------------------------------------------------------------------
class Heartbeat:
    """Registers ``worker`` in Redis and beats every ``interval`` seconds on a thread of its
    own; ``stop()`` deregisters it (``deregister=False``: leaves it to be seen as lost)."""

    def __init__(
        self, worker: Any, interval: float = 2.0, retention: float | None = None, errors_ttl: float | None = None
    ) -> None:
        broker = worker.broker
        self.worker = worker
        self.interval = float(interval)
        vt = float(getattr(broker, "visibility_timeout", 60.0))
        self.retention = float(retention) if retention is not None else RETENTION_VISIBILITY_TIMEOUTS * vt
        self.errors_ttl = (
            float(errors_ttl)
            if errors_ttl is not None
            else max(float(getattr(broker, "result_ttl", 0.0)), self.retention)
        )
        self.prefix: str = broker.prefix
        self.id: str = worker.consumer
        # a MultiQueueWorker (routing.py): its --queues {name: weight}; a Worker: its broker's queue
        self.weights: dict[str, int] = dict(getattr(worker, "weights", None) or {})
        self.queues: list[str] = list(self.weights) or [broker.queue]
        self.figures: TaskFigures = worker.figures
        self.started = time.time()
        self._r = broker.redis
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last = time.monotonic()
        # Redis's clock minus this host's, in seconds (None until measured): the beats' times are
        # Redis's, as the readers' (cluster.py), so a host whose clock is off is judged rightly
        self._offset: float | None = None
        self._zset = cluster_key(self.prefix, "workers")
        self._hash = cluster_key(self.prefix, "worker", self.id)
        # this heartbeat's own mark in the entry: a beat finding another's there (a successor took the
        # id while this worker was judged lost) leaves that entry alone and stops this worker
        self.instance = os.urandom(8).hex()
        self._taken_over = False
        self._static = {
            "id": self.id,
            "instance": self.instance,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": json.dumps(self.queues),
            "weights": json.dumps(self.weights),
            "concurrency": worker.concurrency,
            "started": repr(self.started),
            "interval": repr(self.interval),
        }
        from .. import __version__

        self._static["version"] = __version__

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="catzilla-heartbeat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                self.beat()
            except Exception as exc:  # Redis away: the next beat tries again (missed ones show as lost)
                log.warning("heartbeat not published: %s", redact_text(str(exc)))
            if self._stop.wait(self.interval):
                return

    def fields(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The hash's fields now, and the failures to append."""
        now_m = time.monotonic()
        tasks, errors, _ = self.figures.snapshot(now_m - self._last)
        self._last = now_m
        w = self.worker
        s = w.stats()
        succeeded = sum(t["succeeded"] for t in tasks.values())
        failed = sum(t["failed"] for t in tasks.values())
        engine: dict[str, Any] = {}
        try:
            raw = w.tasks._monitor_raw()
            for key in ("exec", "wait"):
                h = raw[key]
                engine[key] = {
                    "counts": {i: c for i, c in enumerate(h["counts"]) if c},
                    "sum_ns": h["sum_ns"],
                }
        except Exception:  # an engine without the C figures (a test double): none published
            engine = {}
        rss = rss_bytes()
        return {
            **self._static,
            "started": repr(self.started + (self._offset or 0.0)),
            "last_seen": repr(self.clock()),
            "in_flight": s["in_flight"],
            "processed": succeeded + failed,
            "succeeded": succeeded,
            "failed": failed,
            "retried": sum(t["retried"] for t in tasks.values()),
            "reclaimed": s.get("reclaimed", 0),
            "rss_bytes": "" if rss is None else rss,
            "tasks": json.dumps(tasks, separators=(",", ":")),
            "engine": json.dumps(engine, separators=(",", ":")),
        }, errors

    def clock(self) -> float:
        """Now, in epoch seconds of Redis's clock (as last measured; this host's until then)."""
        return time.time() + (self._offset or 0.0)

    def _measure(self, redis_time: Any, sent: float, received: float) -> None:
        sec, usec = redis_time
        self._offset = int(sec) + int(usec) / 1e6 - (sent + received) / 2

    def claim(self) -> None:
        """Register the worker (its first beat), unless another live process holds its id: then
        raise WorkerIdInUse. Called by the worker before it fetches. Atomic (WATCH on the entry):
        of two workers starting at once under one id, one registers, the other is refused. A
        live-looking entry of this host whose process is gone (killed, no deregistration) is
        taken over."""
        import redis

        sent = time.time()
        self._measure(self._r.time(), sent, time.time())
        me = (str(self._static["host"]), str(self._static["pid"]))
        with self._r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(self._hash)
                    host, pid, interval, last, instance = (
                        v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                        for v in pipe.hmget(self._hash, "host", "pid", "interval", "last_seen", "instance")
                    )
                    with _live_lock:
                        in_process = instance is not None and instance != self.instance and instance in _live
                    if in_process:
                        raise WorkerIdInUse(
                            f"worker id {self.id!r} is in use by another worker of this process (host {host!r}, "
                            f"pid {pid}): give each worker an id of its own (Worker(consumer=...)), or stop that "
                            "one first",
                            worker_id=self.id,
                            host=str(host),
                            pid=os.getpid(),
                        )
                    if host is not None and (host, pid) != me:
                        try:
                            every = float(interval or "nan")
                            seen = float(last or "nan")
                        except ValueError:
                            every = seen = math.nan
                        every = every if every > 0 else 2.0  # (as the readers, cluster.py)
                        other = int(pid) if (pid or "").isdigit() else None
                        alive = self.clock() - seen <= LOST_AFTER_BEATS * every
                        if alive and not (host == me[0] and other is not None and _pid_gone(other)):
                            raise WorkerIdInUse(
                                f"worker id {self.id!r} is in use by a live worker on host {host!r}, pid {pid} "
                                f"(its last beat {max(0.0, self.clock() - seen):.1f} s ago): give each worker "
                                "an id of its own (Worker(consumer=...)), or stop that one first",
                                worker_id=self.id,
                                host=host,
                                pid=other,
                            )
                    fields, errors = self.fields()
                    pipe.multi()
                    self._write(pipe, fields, errors)
                    pipe.time()
                    sent = time.time()
                    with _live_lock:  # (before the entry is ours: a worker of this process looking next sees it)
                        _live.add(self.instance)
                    try:
                        replies = pipe.execute()
                    except BaseException:
                        with _live_lock:
                            _live.discard(self.instance)
                        if errors:
                            self.figures.unpublished(errors)
                        raise
                    self._measure(replies[-1], sent, time.time())
                    return
                except redis.WatchError:  # the entry changed meanwhile (a worker starting at once): look again
                    continue

    def beat(self) -> bool:
        """Publish the figures now; False (nothing written) if the entry is another worker's."""
        if self._taken_over:
            return False
        if self._offset is None:  # (the first beat: Redis's clock asked first, then at each beat)
            sent = time.time()
            self._measure(self._r.time(), sent, time.time())
        fields, errors = self.fields()

        def queue(pipe: Any) -> None:
            self._write(pipe, fields, errors)
            pipe.time()

        try:
            replies = self._owned(queue)
        except BaseException:
            if errors:  # (kept for the next beat: what failed during an outage is what one looks for)
                self.figures.unpublished(errors)
            raise
        if replies is None:
            return False
        self._measure(replies[-1][0], replies[-1][1], time.time())
        return True

    def _owned(self, queue: Any) -> list[Any] | None:
        """Run the writes ``queue(pipe)`` queues in one transaction, unless the entry holds
        another heartbeat's instance (a successor that claimed the id while this worker was
        judged lost: frozen, cut off): then write nothing, say so, stop beating and stop the
        worker (two workers under one id must not both run), and return None. The replies, the
        last one a (Redis TIME, time sent) pair."""
        import redis

        with self._r.pipeline(transaction=True) as pipe:  # (atomic: no key is ever left without its TTL)
            while True:
                try:
                    pipe.watch(self._hash)
                    host, pid, instance = (
                        v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                        for v in pipe.hmget(self._hash, "host", "pid", "instance")
                    )
                    if instance is not None and instance != self.instance:
                        self._lose_id(host, pid)
                        return None
                    pipe.multi()
                    queue(pipe)
                    sent = time.time()
                    replies = pipe.execute()
                    replies[-1] = (replies[-1], sent)
                    return replies
                except redis.WatchError:  # the entry changed meanwhile (a worker claiming the id): look again
                    continue

    def _lose_id(self, host: Any, pid: Any) -> None:
        self._taken_over = True
        self._stop.set()
        with _live_lock:
            _live.discard(self.instance)
        log.error(
            "worker id %r was taken over by a worker on host %r, pid %s, while this one was judged lost "
            "(no beat for %d of its intervals): this worker stops, and leaves that worker's registry entry alone",
            self.id,
            host,
            pid,
            LOST_AFTER_BEATS,
        )
        stop = getattr(self.worker, "stop", None)
        if callable(stop):
            stop()

    def _write(self, pipe: Any, fields: dict[str, Any], errors: list[dict[str, Any]]) -> None:
        """A beat's writes, queued on ``pipe`` (a transaction)."""
        now_ms = int(self.clock() * 1000)
        keep_ms = int((LOST_AFTER_BEATS * self.interval + self.retention) * 1000)
        pipe.hset(self._hash, mapping=fields)
        pipe.pexpire(self._hash, keep_ms)
        pipe.zadd(self._zset, {self.id: now_ms})
        pipe.zremrangebyscore(self._zset, "-inf", now_ms - keep_ms)  # long-lost workers
        pipe.pexpire(self._zset, keep_ms)  # (gone keep_ms after the last beat of any worker)
        errors_ms = max(1, int(self.errors_ttl * 1000))
        by_name: dict[str, list[str]] = {}
        for e in errors:
            item = {**e, "worker": self.id, "queue": e.get("queue") or self.queues[0]}
            item["at"] = e["at"] + (self._offset or 0.0)  # (in Redis's clock, as the beats)
            by_name.setdefault(e["task"], []).append(json.dumps(item))
        for name, items in by_name.items():
            key = cluster_key(self.prefix, "errors", name)
            pipe.lpush(key, *items)
            pipe.ltrim(key, 0, ERRORS_KEPT - 1)
            pipe.pexpire(key, errors_ms)
        if by_name:
            zkey = cluster_key(self.prefix, "errors")
            pipe.zadd(zkey, dict.fromkeys(by_name, now_ms))
            pipe.zremrangebyscore(zkey, "-inf", now_ms - errors_ms)
            pipe.pexpire(zkey, errors_ms)

    def stop(self, deregister: bool = True) -> None:
        """Stop beating. ``deregister``: publish the failures not yet published, then delete
        the worker's entry; otherwise (a worker past its stop deadline, Redis perhaps silent)
        return at once and leave the entry to age into "lost"."""
        self._stop.set()
        if not deregister:
            with _live_lock:
                _live.discard(self.instance)
            return
        if self._thread is not None:
            self._thread.join(self.interval + 5)
        try:
            # the last failures, then the entry itself, each only while the entry is this worker's
            if self.beat():
                self._owned(lambda pipe: (pipe.zrem(self._zset, self.id), pipe.delete(self._hash), pipe.time()))
        except Exception as exc:  # Redis away: the entry expires on its own, shown as lost meanwhile
            log.warning("could not deregister worker %s: %s", self.id, redact_text(str(exc)))
        finally:
            with _live_lock:
                _live.discard(self.instance)
