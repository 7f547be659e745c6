"""Periodic tasks across a cluster: ``@tasks.periodic(...)`` on a Redis engine.

Every process that imports the module declaring the schedule (web processes, workers) declares
it; each tick must still fire once. The state lives in Redis, per schedule (its name is the
task's name, ``module.qualname``, followed by ``#`` and a digest of its ``args``/``kwargs`` when
it has any: one function scheduled with two argument sets is two schedules), under
``P:Q:sched:<name>`` (Q: the queue its runs go to, the function's named queue if it has one,
whose workers delete its run marker): the spec, the next due time (ms,
the Redis server's clock), the last run (time, due time, task id) and counters (runs, skipped,
missed). Each declaring process runs a ticker (one thread per broker, for all of the schedules
declared on it) that calls one Lua script (``lua/sched_claim.lua``) at each due time, and at least
every ``HEARTBEAT`` seconds: the script fires the run only if the due time is reached, moving
the due time on in the same atomic step, so any number of declarers race harmlessly and a tick
fires exactly once. A declarer that dies takes nothing with it: the others go on calling.

Rules, as in-process (``periodic.py``):

* ``overlap=False`` (default): the script sets a marker ``P:Q:sched:<name>:run`` (the run's task
  id) when it queues a run; the worker that ends the run (success, final failure, dead letter,
  cancel; not a retry) deletes it (``lua/task_settled.lua``). A tick due while it exists is
  skipped, cluster-wide. The marker expires after ``MARKER_TTL`` (a run lost with a Redis
  that lost its data must not stop the schedule for good).
* Missed runs are skipped, not piled up: a tick claimed late fires once and the next due time
  is the first on the schedule after now (the skipped ones are counted in ``missed``).
* ``first_run_now``: the first declarer of a schedule fires it at once; later declarers find
  its state and follow it.

A forked child (a pre-forking server's worker) does not declare its parent's schedules (it has
no ticker thread; the parent goes on declaring them); the ticker's locks are new in the child.

A schedule whose spec changes (a new deploy) follows the new spec from its next run; its next
due time moves to the new spec's first one only if that is sooner (never later: while the old
and the new version both declare it, each call would otherwise push it back and it would never
come due). The schedule's keys expire ``KEEP`` seconds after the last declarer's last call.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import socket
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, cast

from ..periodic import PeriodicTask
from .protocol import CONFIG_ATTR, DEFAULT_CONFIG, OPT_SCHEDULE, message, task_name

if TYPE_CHECKING:
    from .redis import RedisBroker, RemoteResult

__all__ = ["ClusterPeriodicTask", "list_schedules"]

log = logging.getLogger("catzilla_tasks.periodic")

HEARTBEAT = 10.0  # a declarer calls at least this often (seconds); gone after 3 silent ones
MARKER_TTL = 86400.0  # the longest a run can keep an overlap=False schedule from firing
KEEP = 7 * 86400.0  # a schedule nobody declares any more is forgotten after this
_CRON_AHEAD = 8  # cron due times sent with each call (the script picks the first past now)

_wall = time.time  # this process's clock (cron due times are computed on the server's: see _cron_times)

# declaring is switched off while a command only reads the schedules (`catzilla-tasks schedules
# --app`: importing the app must not make the command a declarer)
_declaring = True


class _Ticker:
    """The thread that calls the claims of the schedules declared on one broker at their times
    (one per broker, not per process: a Redis gone silent holds its own schedules' calls up to
    its socket timeout, never another broker's). The thread runs while the broker has schedules
    declared: it ends when its last one is cancelled and starts again with the next one."""

    _lock = threading.Lock()
    _instances: dict[int, _Ticker] = {}  # id(broker) -> its ticker
    _tasks: weakref.WeakSet[ClusterPeriodicTask] = weakref.WeakSet()

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, ClusterPeriodicTask]] = []
        self._seq = itertools.count()
        self._pid = os.getpid()
        self._running = False

    @classmethod
    def get(cls, broker: Any) -> _Ticker:
        with cls._lock:
            t = cls._instances.get(id(broker))
            if t is None or t._pid != os.getpid():  # (a fork has no thread)
                t = cls._instances[id(broker)] = _Ticker()
            return t

    @classmethod
    def _after_fork(cls) -> None:
        # a child has no ticker thread, and the locks it takes (this class's, a schedule's for
        # the whole of its Redis call) may have been held at the fork: nobody would release them
        cls._lock = threading.Lock()
        cls._instances = {}
        for p in list(cls._tasks):
            p._lock = threading.Lock()

    def at(self, when: float, p: ClusterPeriodicTask) -> None:
        with self._cv:
            heapq.heappush(self._heap, (when, next(self._seq), p))
            if not self._running:
                self._running = True
                threading.Thread(target=self._loop, name="catzilla-schedules", daemon=True).start()
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while True:
                    if not self._heap:  # (every schedule of the broker cancelled: a tick re-arms first)
                        self._running = False
                        return
                    wait = self._heap[0][0] - time.monotonic()
                    if wait <= 0:
                        break
                    self._cv.wait(wait)
                _, _, p = heapq.heappop(self._heap)
            try:
                p._tick()
            except BaseException:  # noqa: BLE001 - one schedule's defect must not stop the others
                log.exception("periodic task %s: its tick failed", p.name)
                if not p.cancelled:
                    self.at(time.monotonic() + 1.0, p)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_Ticker._after_fork)


class ClusterPeriodicTask(PeriodicTask):
    """A periodic task fired once per tick across every process that declares it (see the
    module docstring). ``runs``, ``skipped`` and ``missed`` count what this process saw (the
    runs it fired); ``status()`` reads the schedule's cluster-wide state."""

    def __init__(self, engine: Any, func: Any, **kwargs: Any) -> None:
        broker: RedisBroker = engine.broker
        self.broker = broker
        self.task = task_name(func)  # TypeError here for a function workers cannot import
        self.schedule = _schedule_name(broker, self.task, kwargs.get("args") or (), kwargs.get("kwargs") or {})
        # a schedule lives in the queue its runs go to (the function's named queue, routing): the
        # workers of that queue delete its run marker, `catzilla-tasks schedules --queue` lists it
        cfg = getattr(func, CONFIG_ATTR, None)
        queue = getattr(cfg, "queue", None)
        self._queue = queue if queue is not None and queue != broker.queue else None
        self._streams, self._delayed_key = broker.queue_keys(self._queue)
        self.key = _key(broker, self._queue, self.schedule)
        self._index = _key(broker, self._queue, "") if self._queue is not None else broker.schedules_key
        self.declarer = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self._first_run_now = bool(kwargs.get("first_run_now"))
        self._script = broker.redis.register_script(_scripts().SCHED_CLAIM)
        super().__init__(engine, func, **kwargs)
        _Ticker._tasks.add(self)
        cfg = getattr(func, CONFIG_ATTR, None)
        self._prio = int(cfg._priority) if cfg is not None else int(DEFAULT_CONFIG._priority)
        self._delay = int(cfg.delay_ms) if cfg is not None and cfg.delay_ms > 0 else 0
        self.spec = f"every={self.every!r}" if self.every is not None else f"cron={self.cron!r} tz={self.tz}"
        self.next_run_at = time.time()
        self._left = False  # cancelled and taken off the declarers
        self._offset: float | None = None  # the Redis server's clock minus ours (seconds), for cron
        if _declaring:  # the first call at once: it declares the schedule (and may fire it)
            _Ticker.get(self.broker).at(time.monotonic(), self)

    # PeriodicTask arms its first tick at the end of its __init__: here the ticker does (above)
    def _arm(self, *, initial: bool = False, first_run_now: bool = False) -> None:
        pass

    def _cron_times(self) -> list[int]:
        # due times after the Redis server's now (this clock plus the offset the last call saw:
        # a declarer whose clock is off by more than _CRON_AHEAD periods would give only times
        # the server has passed)
        import datetime

        if self._offset is None:
            sec, usec = self.broker.redis.time()
            self._offset = sec + usec / 1e6 - _wall()
        now = datetime.datetime.fromtimestamp(_wall() + self._offset - 2, datetime.UTC).astimezone(self.tz)
        it = self._cron_cls(self.cron, now)  # type: ignore[misc]
        return [int(next(it).timestamp() * 1000) for _ in range(_CRON_AHEAD)]

    def _tick(self) -> None:
        # on the ticker thread
        with self._lock:
            if self._cancelled:
                if not self._left:  # (once: a cancel queues this call)
                    self._left = True
                    try:
                        self.broker.redis.zrem(self.key + ":who", self.declarer)
                    except Exception:  # noqa: BLE001, S110 - Redis away: it drops out after 3 heartbeats
                        pass
                return
            b = self.broker
            tid = b._new_id()
            opts = {OPT_SCHEDULE: self.schedule}
            try:
                payload = b.serializer.dumps(message(tid, self.task, self.args, self.kwargs, opts))
                every_ms = int(self.every * 1000) if self.every is not None else 0
                state, nxt, now, missed = self._script(
                    keys=[
                        self.key,
                        self.key + ":who",
                        self.key + ":run",
                        self._index,
                        self._streams[self._prio],
                        self._delayed_key,
                    ],
                    args=[
                        self.declarer,
                        self.schedule,
                        self.spec,
                        max(1, every_ms) if self.every is not None else 0,
                        int(self._first_run_now),
                        int(self.overlap),
                        tid,
                        payload,
                        self._delay,
                        int(MARKER_TTL * 1000),
                        int(KEEP * 1000),
                        int(3 * HEARTBEAT * 1000),
                        str(self._prio),
                        *(self._cron_times() if self.every is None else ()),
                    ],
                )
            except Exception as exc:  # Redis away, arguments that cannot be encoded: try again
                if self._cancelled:  # (cancelled during the call: nothing to retry)
                    _Ticker.get(self.broker).at(time.monotonic(), self)
                    return
                log.warning("periodic task %s: could not reach its schedule (%s); retrying", self.name, exc)
                delay = min(self.every or 1.0, 1.0)
                self.next_run_at = time.time() + delay
                _Ticker.get(self.broker).at(time.monotonic() + delay, self)
                return
            state = int(state)
            self._offset = int(now) / 1000 - _wall()
            if state == 1:
                self.runs += 1
                self.last = _remote(b, tid)  # type: ignore[assignment]  # (a remote handle here)
            elif state == 2:
                self.skipped += 1
            self.missed += int(missed)
            delay = max(0.0, (int(nxt) - int(now)) / 1000)
            self.next_run_at = time.time() + delay
            _Ticker.get(self.broker).at(time.monotonic() + min(delay + 0.001, HEARTBEAT), self)

    def cancel(self) -> None:
        """Stop declaring the schedule in this process (other declarers go on firing it). Returns
        at once, Redis or not (an engine's shutdown cancels its schedules): a tick already
        waiting for Redis ends as it would have; the ticker then takes this process off the
        schedule's declarers (or, Redis away, it drops out after 3 silent heartbeats)."""
        self._cancelled = True  # (not under the lock: a tick holds it for a whole Redis call)
        _Ticker.get(self.broker).at(time.monotonic(), self)

    def status(self) -> dict[str, Any]:
        """The schedule's cluster-wide state (see :func:`list_schedules`)."""
        return _describe(self.broker, self.schedule, self.key)

    def __repr__(self) -> str:
        return f"<ClusterPeriodicTask {self.schedule} {self.spec} runs={self.runs} skipped={self.skipped}>"


def _schedule_name(broker: RedisBroker, task: str, args: Any, kwargs: Any) -> str:
    """A schedule's name: its task's, and for a schedule given arguments a digest of them too
    (one function scheduled with two argument sets is two schedules, in every process alike).
    Arguments the broker's serializer cannot encode are refused here, at the declaration."""
    if not args and not kwargs:
        return task
    import hashlib

    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
        raise TypeError(f"periodic(): args must be a tuple and kwargs a dict, got {args!r} and {kwargs!r}")
    try:
        raw = broker.serializer.dumps([list(args), sorted(kwargs.items())])
    except Exception as exc:
        raise TypeError(f"periodic({task}): its args/kwargs cannot be sent to workers: {exc}") from None
    return f"{task}#{hashlib.sha256(raw).hexdigest()[:12]}"


def _scripts() -> Any:
    from . import scripts

    return scripts


def _remote(broker: RedisBroker, tid: str) -> RemoteResult:
    from .redis import RemoteResult

    return RemoteResult(tid, broker)


def _key(broker: RedisBroker, queue: str | None, name: str) -> str:
    """The key of schedule ``name`` of ``queue`` (None: the broker's); of the queue's index of
    schedules for the name "" (the same keys as ``broker.schedule_key``/``schedules_key`` on a
    broker of that queue)."""
    if queue is None:
        return broker.schedule_key(name) if name else broker.schedules_key
    return f"{broker.prefix}:{queue}:sched:{name}" if name else f"{broker.prefix}:{queue}:schedules"


def _describe(broker: RedisBroker, name: str, key: str | None = None) -> dict[str, Any]:
    r = broker.redis
    key = key or broker.schedule_key(name)
    pipe = r.pipeline(transaction=False)
    pipe.hgetall(key)
    pipe.time()
    pipe.zrange(key + ":who", 0, -1, withscores=True)
    pipe.get(key + ":run")
    h, (sec, usec), who, running = pipe.execute()
    now_ms = sec * 1000 + usec // 1000
    f = {k.decode(): v.decode(errors="replace") for k, v in h.items()}

    def at(field: str) -> float | None:
        v = f.get(field)
        return int(v) / 1000 if v and v.lstrip("-").isdigit() else None

    alive = [m.decode(errors="replace") for m, score in who if now_ms - score <= 3 * HEARTBEAT * 1000]
    return {
        "name": name,
        "spec": f.get("spec", ""),
        "next_run": at("next"),
        "last_run": at("last"),
        "last_task_id": f.get("last_id"),
        "running": running.decode(errors="replace") if running is not None else None,
        "runs": int(f.get("runs", 0)),
        "skipped": int(f.get("skipped", 0)),
        "missed": int(f.get("missed", 0)),
        "declarers": alive,
    }


def list_schedules(broker: RedisBroker) -> list[dict[str, Any]]:
    """The cluster-wide schedules of ``broker``'s queue, by name: ``spec``, ``next_run`` and
    ``last_run`` (epoch seconds, or None), ``last_task_id``, ``running`` (the task id of the run
    in progress of an overlap=False schedule), ``runs``, ``skipped``, ``missed`` and
    ``declarers`` (the processes declaring it now)."""
    raw = cast("list[bytes]", broker.redis.zrange(broker.schedules_key, 0, -1))
    names = sorted(x.decode(errors="replace") for x in raw)
    return [d for d in (_describe(broker, n) for n in names) if d["spec"]]
