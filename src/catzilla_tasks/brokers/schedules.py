"""Periodic tasks across a cluster: ``@tasks.periodic(...)`` on a Redis engine.

Every process that imports the module declaring the schedule (web processes, workers) declares
it; each tick must still fire once. The state lives in Redis, per schedule (its name is the
task's name, ``module.qualname``), under ``P:Q:sched:<name>``: the spec, the next due time (ms,
the Redis server's clock), the last run (time, due time, task id) and counters (runs, skipped,
missed). Each declaring process runs a ticker (one thread per process, for all of its
schedules) that calls one Lua script (``lua/sched_claim.lua``) at each due time, and at least
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

A schedule whose spec changes (a new deploy) starts again from the new spec. The schedule's keys
expire ``KEEP`` seconds after the last declarer's last call.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import socket
import threading
import time
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

# declaring is switched off while a command only reads the schedules (`catzilla-tasks schedules
# --app`: importing the app must not make the command a declarer)
_declaring = True


class _Ticker:
    """One thread per process that calls each declared schedule's claim at its times."""

    _lock = threading.Lock()
    _instance: _Ticker | None = None

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, ClusterPeriodicTask]] = []
        self._seq = itertools.count()
        self._pid = os.getpid()
        threading.Thread(target=self._loop, name="catzilla-schedules", daemon=True).start()

    @classmethod
    def get(cls) -> _Ticker:
        with cls._lock:
            if cls._instance is None or cls._instance._pid != os.getpid():  # (a fork has no thread)
                cls._instance = _Ticker()
            return cls._instance

    def at(self, when: float, p: ClusterPeriodicTask) -> None:
        with self._cv:
            heapq.heappush(self._heap, (when, next(self._seq), p))
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cv.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _, p = heapq.heappop(self._heap)
            try:
                p._tick()
            except BaseException:  # noqa: BLE001 - one schedule's defect must not stop the others
                log.exception("periodic task %s: its tick failed", p.name)
                if not p.cancelled:
                    self.at(time.monotonic() + 1.0, p)


class ClusterPeriodicTask(PeriodicTask):
    """A periodic task fired once per tick across every process that declares it (see the
    module docstring). ``runs``, ``skipped`` and ``missed`` count what this process saw (the
    runs it fired); ``status()`` reads the schedule's cluster-wide state."""

    def __init__(self, engine: Any, func: Any, **kwargs: Any) -> None:
        broker: RedisBroker = engine.broker
        self.broker = broker
        self.task = task_name(func)  # TypeError here for a function workers cannot import
        self.key = broker.schedule_key(self.task)
        self.declarer = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self._first_run_now = bool(kwargs.get("first_run_now"))
        self._script = broker.redis.register_script(_scripts().SCHED_CLAIM)
        super().__init__(engine, func, **kwargs)
        cfg = getattr(func, CONFIG_ATTR, None)
        self._prio = int(cfg._priority) if cfg is not None else int(DEFAULT_CONFIG._priority)
        self._delay = int(cfg.delay_ms) if cfg is not None and cfg.delay_ms > 0 else 0
        self.spec = f"every={self.every!r}" if self.every is not None else f"cron={self.cron!r} tz={self.tz}"
        self.next_run_at = time.time()
        if _declaring:  # the first call at once: it declares the schedule (and may fire it)
            _Ticker.get().at(time.monotonic(), self)

    # PeriodicTask arms its first tick at the end of its __init__: here the ticker does (above)
    def _arm(self, *, initial: bool = False, first_run_now: bool = False) -> None:
        pass

    def _cron_times(self) -> list[int]:
        import datetime

        now = datetime.datetime.now(datetime.UTC).astimezone(self.tz) - datetime.timedelta(seconds=2)
        it = self._cron_cls(self.cron, now)  # type: ignore[misc]
        return [int(next(it).timestamp() * 1000) for _ in range(_CRON_AHEAD)]

    def _tick(self) -> None:
        # on the ticker thread
        with self._lock:
            if self._cancelled:
                return
            b = self.broker
            tid = b._new_id()
            opts = {OPT_SCHEDULE: self.task}
            try:
                payload = b.serializer.dumps(message(tid, self.task, self.args, self.kwargs, opts))
                every_ms = int(self.every * 1000) if self.every is not None else 0
                state, nxt, now, missed = self._script(
                    keys=[
                        self.key,
                        self.key + ":who",
                        self.key + ":run",
                        b.schedules_key,
                        b.streams[self._prio],
                        b.delayed_key,
                    ],
                    args=[
                        self.declarer,
                        self.task,
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
                log.warning("periodic task %s: could not reach its schedule (%s); retrying", self.name, exc)
                delay = min(self.every or 1.0, 1.0)
                self.next_run_at = time.time() + delay
                _Ticker.get().at(time.monotonic() + delay, self)
                return
            state = int(state)
            if state == 1:
                self.runs += 1
                self.last = _remote(b, tid)  # type: ignore[assignment]  # (a remote handle here)
            elif state == 2:
                self.skipped += 1
            self.missed += int(missed)
            delay = max(0.0, (int(nxt) - int(now)) / 1000)
            self.next_run_at = time.time() + delay
            _Ticker.get().at(time.monotonic() + min(delay + 0.001, HEARTBEAT), self)

    def cancel(self) -> None:
        """Stop declaring the schedule in this process (other declarers go on firing it)."""
        with self._lock:
            self._cancelled = True
        try:
            self.broker.redis.zrem(self.key + ":who", self.declarer)
        except Exception:  # noqa: BLE001, S110 - Redis away: the declarer drops out after 3 heartbeats
            pass

    def status(self) -> dict[str, Any]:
        """The schedule's cluster-wide state (see :func:`list_schedules`)."""
        return _describe(self.broker, self.task)

    def __repr__(self) -> str:
        return f"<ClusterPeriodicTask {self.task} {self.spec} runs={self.runs} skipped={self.skipped}>"


def _scripts() -> Any:
    from . import scripts

    return scripts


def _remote(broker: RedisBroker, tid: str) -> RemoteResult:
    from .redis import RemoteResult

    return RemoteResult(tid, broker)


def _describe(broker: RedisBroker, name: str) -> dict[str, Any]:
    r = broker.redis
    key = broker.schedule_key(name)
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
