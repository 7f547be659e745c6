"""Rate limits, concurrency limits and named queues of the in-process engine.

A TaskConfig with ``rate_limit``, ``concurrency_limit`` or a named ``queue`` is *routed*: the C
``add_task`` hands the call to :func:`route` (the ``route`` hook, installed by ``_hooks.py``)
instead of queueing it. Tasks without any of them never come here (no cost to them).

* **rate_limit** (``"N/s"``, ``"/m"``, ``"/h"``): GCRA with reservation, per task name (and
  ``rate_limit_key(*args, **kwargs)`` when given). Each call takes the next free slot, one every
  ``period / N`` seconds, at once when the limit is idle, and is queued with the engine's timer
  (``delay_ms``) for the wait: no worker is held while it waits, nothing is dropped. In any window
  of W seconds at most ``floor(W * N / period) + 1`` tasks start (the burst is one task).
* **concurrency_limit**: at most N tasks of the name (and key) run at once. A call over the limit
  is parked here (not in the engine: it holds no worker and no queue room) and is queued when a
  running one ends. Its handle is a TaskResult settled with the outcome of the run.
* **queue**: a named queue is a bulkhead, an engine of its own with the workers given in
  ``BackgroundTasks(queues={"emails": 4})``; ``"default"`` is the engine itself.

All state is per engine (``engine._limits``), guarded by one lock.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, cast

from . import _engine
from .config import TaskConfig, TaskStatus

__all__ = ["Limits", "route", "task_name_of"]

# the engine's own C submission: a DistributedTasks overrides _submit to publish to its broker,
# but what comes here runs locally (a consumer's engine). The plain one: route() is reached from
# a submission that already chose whether to trace (add_task, _submit) or not (_submit_plain),
# so the call is not traced twice (tracing.py)
_c_submit = _engine.Engine._submit_plain


def task_name_of(func: Any) -> str:
    """The name a limit counts under: ``module.qualname`` (as ``@tasks.task`` registers it)."""
    mod = getattr(func, "__module__", None) or ""
    qual = getattr(func, "__qualname__", None) or repr(func)
    return f"{mod}.{qual}"


def limit_key(cfg: TaskConfig, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> str | None:
    """``cfg.rate_limit_key(*args, **kwargs)``, checked to be a string (None without a key)."""
    fn = cfg.rate_limit_key
    if fn is None:
        return None
    key = fn(*args, **(kwargs or {}))
    if not isinstance(key, str):
        raise TypeError(f"rate_limit_key must return a str, got {type(key).__name__} {key!r:.80}")
    return key


class Limits:
    """The limit state of one engine."""

    __slots__ = ("_lock", "_tat", "_running", "_parked", "_delayed_cfgs")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tat: dict[tuple[str, str | None], float] = {}  # GCRA: theoretical arrival time (monotonic s)
        self._running: dict[tuple[str, str | None], int] = {}
        self._parked: dict[tuple[str, str | None], deque[tuple[Any, ...]]] = {}
        self._delayed_cfgs: dict[tuple[int, int], tuple[TaskConfig, TaskConfig]] = {}

    def reserve(self, ident: tuple[str, str | None], rate: tuple[float, float], not_before: float) -> float:
        """Take the next slot of ``ident`` at or after ``not_before`` (monotonic s); its time."""
        interval = rate[1] / rate[0]
        with self._lock:
            slot = max(self._tat.get(ident, 0.0), not_before)
            self._tat[ident] = slot + interval
            if len(self._tat) > 100_000:  # keys of a long-gone past: forget them
                now = time.monotonic()
                self._tat = {k: v for k, v in self._tat.items() if v > now}
        return slot

    def delayed(self, cfg: TaskConfig, delay_ms: int) -> TaskConfig:
        """``cfg`` with ``delay_ms`` (cached per whole ms: building a TaskConfig costs ~15 us)."""
        key = (id(cfg), delay_ms)
        hit = self._delayed_cfgs.get(key)
        if hit is None or hit[0] is not cfg:
            if len(self._delayed_cfgs) > 4096:
                self._delayed_cfgs.clear()
            hit = self._delayed_cfgs[key] = (cfg, cfg.replace(delay_ms=delay_ms))
        return hit[1]

    # -- concurrency -------------------------------------------------------------------------
    def acquire(self, ident: tuple[str, str | None], limit: int, entry: tuple[Any, ...]) -> bool:
        """A slot now (True), or ``entry`` parked until one is released (False)."""
        with self._lock:
            n = self._running.get(ident, 0)
            if n < limit:
                self._running[ident] = n + 1
                return True
            self._parked.setdefault(ident, deque()).append(entry)
            return False

    def release(self, ident: tuple[str, str | None]) -> tuple[Any, ...] | None:
        """Give a slot back; the parked entry that takes it over, if any (its slot is kept)."""
        with self._lock:
            q = self._parked.get(ident)
            while q:
                entry = q.popleft()
                if not entry[0].done():  # (one cancelled while parked is skipped)
                    return entry
            self._parked.pop(ident, None)
            n = self._running.get(ident, 1) - 1
            if n > 0:
                self._running[ident] = n
            else:
                self._running.pop(ident, None)
            return None

    def cancel_parked(self) -> int:
        """Cancel every parked call (shutdown without waiting); how many."""
        with self._lock:
            entries = [e for q in self._parked.values() for e in q]
            self._parked.clear()
        n = 0
        for e in entries:
            n += bool(e[0].cancel())
        return n

    def parked(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._parked.values())


def _limits_of(engine: Any) -> Limits:
    lim = engine._limits
    if lim is None:
        with engine._runner_lock:
            if engine._limits is None:
                engine._limits = Limits()
            lim = engine._limits
    return lim


def _target(engine: Any, cfg: TaskConfig) -> Any:
    q = cfg.queue
    if q is None or q == "default":
        return engine
    sub = engine._queue_engines.get(q)
    if sub is None:
        known = ", ".join(sorted(engine._queue_engines)) or "none"
        raise ValueError(
            f"queue {q!r}: this engine has no such queue (its named queues: {known}); create it with "
            f"BackgroundTasks(queues={{{q!r}: workers}}), or leave queue unset for the default one"
        )
    return sub


def _submit_at(
    engine: Any, lim: Limits, target: Any, func: Any, args: tuple, kwargs: Any, cfg: TaskConfig, block: float
) -> Any:
    """Submit an admitted call: with the wait for its rate-limit slot, if it has a rate limit."""
    plain = cast(TaskConfig, cfg._plain)  # (set on every routed config)
    run_cfg = plain
    if cfg._rate is not None:
        now = time.monotonic()
        slot = lim.reserve((task_name_of(func), limit_key(cfg, args, kwargs)), cfg._rate, now + plain.delay_ms / 1000)
        wait_ms = int((slot - now) * 1000 + 0.999)
        if wait_ms > 0:
            run_cfg = lim.delayed(plain, wait_ms)
    return _c_submit(target, func, args, kwargs, run_cfg, block)


def route(engine: Any, func: Any, args: tuple, kwargs: dict[str, Any], cfg: TaskConfig, block: float) -> Any:
    """The C engine's route hook: queue ``func(*args, **kwargs)`` under ``cfg``'s limits and
    queue; return its handle."""
    target = _target(engine, cfg)
    if cfg._rate is None and cfg.concurrency_limit is None:
        return _c_submit(target, func, args, kwargs, cfg._plain, block)
    lim = _limits_of(engine)
    limit = cfg.concurrency_limit
    if limit is None:
        return _submit_at(engine, lim, target, func, args, kwargs, cfg, block)
    ident = (task_name_of(func), limit_key(cfg, args, kwargs))
    outer = _engine.detached()
    outer._link_progress(None)  # PENDING while parked (then the run's status: _launch links it)
    entry = (outer, target, func, args, kwargs, cfg, ident)
    if lim.acquire(ident, limit, entry):
        try:
            _launch(engine, lim, entry, block)
        except BaseException:
            _next(engine, lim, ident)
            raise
    return outer


def _launch(engine: Any, lim: Limits, entry: tuple[Any, ...], block: float) -> None:
    outer, target, func, args, kwargs, cfg, ident = entry
    inner = _submit_at(engine, lim, target, func, args, kwargs, cfg, block)
    outer._link_progress(inner)
    inner._on_done(lambda h: _ended(engine, lim, outer, h, ident))
    outer._on_done(lambda o: inner.cancel() if o.status is TaskStatus.CANCELLED else None)


def _ended(engine: Any, lim: Limits, outer: Any, inner: Any, ident: tuple[str, str | None]) -> None:
    from .results import forward_outcome

    try:
        forward_outcome(inner, outer)
    finally:
        _next(engine, lim, ident)


def _next(engine: Any, lim: Limits, ident: tuple[str, str | None]) -> None:
    """A slot of ``ident`` is free: start the next parked call in it."""
    while True:
        entry = lim.release(ident)
        if entry is None:
            return
        try:
            _launch(engine, lim, entry, -1.0)
            return
        except BaseException as exc:  # it cannot be queued (shut down, bad arguments): its outcome
            entry[0]._settle(exc=exc)
