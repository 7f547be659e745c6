"""Periodic tasks: ``@tasks.periodic(every=timedelta(...))`` and ``@tasks.periodic(cron="...")``.

Each periodic task is a tick on the engine's C timer (``_call_later``): at its due time the tick
queues the real task (with the function's own config) and arms the next tick. The tick is not
a task itself, so ``join()`` does not wait for the next run.

Rules (both configurable):
* ``overlap=False`` (default): when a run is due while the previous run has not finished, the
  new run is skipped (counted in ``skipped``), not queued behind it.
* Missed runs are skipped, not piled up: if the process was busy or paused past one or more due
  times, the next run is the next one on the schedule after now (counted in ``missed``).

On a Redis engine the engine builds :class:`~.brokers.schedules.ClusterPeriodicTask` instead
(a subclass): the same rules, with the schedule's state in Redis, so a tick fires once however
many processes declare it.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .config import MAX_MS

if TYPE_CHECKING:
    from .engine import BackgroundTasks
    from .results import TaskResult

__all__ = ["PeriodicTask"]


def _cron(expr: str) -> Any:
    try:
        from cronsim import CronSim, CronSimError
    except ImportError:
        raise ImportError("cron schedules need the 'cronsim' package: pip install 'catzilla-tasks[cron]'") from None
    try:
        CronSim(expr, datetime.datetime.now(datetime.UTC))
    except CronSimError as exc:
        raise ValueError(f"cron: {expr!r} is not a valid cron expression ({exc})") from None
    return CronSim


class PeriodicTask:
    """A function run on a schedule by an engine. ``cancel()`` stops it."""

    def __init__(
        self,
        engine: BackgroundTasks,
        func: Callable[..., Any],
        *,
        every: datetime.timedelta | float | None = None,
        cron: str | None = None,
        tz: datetime.tzinfo | None = None,
        overlap: bool = False,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
        first_run_now: bool = False,
    ) -> None:
        if (every is None) == (cron is None):
            raise ValueError("periodic(): give exactly one of every=timedelta(...) or cron='...'")
        if tz is not None and not isinstance(tz, datetime.tzinfo):
            raise ValueError(f"tz: expected a datetime.tzinfo (zoneinfo.ZoneInfo('Europe/Paris'), say), got {tz!r}")
        if every is not None:
            if isinstance(every, bool) or not isinstance(every, (datetime.timedelta, int, float)):
                raise ValueError(f"every: expected a timedelta or a number of seconds, got {every!r}")
            seconds = every.total_seconds() if isinstance(every, datetime.timedelta) else float(every)
            # (NaN fails every comparison: the test is written so that it is refused too)
            if not 0 < seconds <= MAX_MS / 1000:
                raise ValueError(f"every: must be a positive interval of at most {MAX_MS // 1000} s, got {every!r}")
            self.every: float | None = seconds
            self._cron_cls = None
        else:
            if not isinstance(cron, str):
                raise ValueError(f"cron: expected a cron expression string, got {cron!r}")
            self.every = None
            self._cron_cls = _cron(cron)
        self.cron = cron
        self.tz = tz or datetime.UTC
        self.engine = engine
        self.func = func
        self.args = args
        self.kwargs = dict(kwargs or {})
        self.overlap = overlap
        self.runs = 0
        self.skipped = 0
        self.missed = 0
        self.last: TaskResult | None = None
        self._lock = threading.Lock()
        self._cancelled = False
        self._due_mono: float | None = None
        self.name = getattr(func, "__qualname__", repr(func))
        self.first_run_now = bool(first_run_now)
        self._arm(initial=True, first_run_now=first_run_now)

    # -- schedule ------------------------------------------------------------------------
    def next_delay(self, now_mono: float, now_wall: datetime.datetime) -> float:
        """Seconds from now to the next run (after the one just due, skipping missed ones)."""
        if self.every is not None:
            due = self._due_mono if self._due_mono is not None else now_mono
            nxt = due + self.every
            if nxt <= now_mono:
                late = int((now_mono - due) // self.every)
                self.missed += late
                nxt = due + (late + 1) * self.every
            self._due_mono = nxt
            return nxt - now_mono
        it = self._cron_cls(self.cron, now_wall.astimezone(self.tz))  # type: ignore[misc]
        nxt = next(it)
        if nxt <= now_wall:
            nxt = next(it)
        return (nxt - now_wall).total_seconds()

    def _arm(self, *, initial: bool = False, first_run_now: bool = False) -> None:
        if self._cancelled:
            return
        now_mono = time.monotonic()
        now_wall = datetime.datetime.now(datetime.UTC)
        if initial and first_run_now:
            delay = 0.0
            self._due_mono = now_mono
        else:
            if initial and self.every is not None:
                self._due_mono = now_mono
            delay = self.next_delay(now_mono, now_wall)
        self.next_run_at = time.time() + delay
        self.engine._call_later(delay, self._tick)

    def _tick(self) -> None:
        # Runs on the engine's timer thread: only quick work here.
        with self._lock:
            if self._cancelled:
                return
            prev = self.last
            if not self.overlap and prev is not None and not prev.is_ready():
                self.skipped += 1
            else:
                try:
                    self.last = self.engine.add_task(self.func, *self.args, **self.kwargs)
                    self.runs += 1
                except Exception as exc:  # a full or closed engine: this run is skipped
                    self.skipped += 1
                    if self.engine.is_shutdown:
                        self._cancelled = True
                        return
                    import logging

                    logging.getLogger("catzilla_tasks").warning("periodic task %s skipped a run: %s", self.name, exc)
            self._arm()

    def cancel(self) -> None:
        """Stop scheduling runs (a run already queued or running is left alone)."""
        with self._lock:
            self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def __repr__(self) -> str:
        sched = f"every={self.every}s" if self.every is not None else f"cron={self.cron!r}"
        return f"<PeriodicTask {self.name} {sched} runs={self.runs} skipped={self.skipped} missed={self.missed}>"
