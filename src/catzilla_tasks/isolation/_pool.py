"""``ProcessPool``, the public object: up to ``size`` child processes, one task at a time each,
shared by the engine's worker threads. Its parts: ``_slots`` (the children and the callers
waiting for one), ``_dispatch`` (a task's reply turned into a value or an error), ``_cancel``
(``CancelToken``, ``IsolatedCall``); a child's start, death and reaping are ``_children``'s,
what it runs is ``_in_child``'s, the bytes they exchange are ``_wire``'s."""

from __future__ import annotations

import atexit
import itertools
import math
import multiprocessing
import numbers
import os
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any

from ..errors import WorkerLost
from ._cancel import CancelToken, _cancelled_error
from ._children import _forkserver_preload, end_children, kill_child
from ._dispatch import _ResultDispatch
from ._pickling import pickle_task
from ._wire import _HEADER

__all__ = ["ProcessPool"]

_START_METHODS = ("forkserver", "spawn")
_POOLS: weakref.WeakSet[ProcessPool] = weakref.WeakSet()


def _check_limit(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name}: expected a number > 0 or None, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name}: must be > 0 (or None for no limit), got {value!r}")
    return None if math.isinf(value) else float(value)


class ProcessPool(_ResultDispatch):
    """A pool of up to ``size`` child processes, each running one task at a time.

    ``run`` is thread-safe and meant to be called from many threads at once: a caller takes
    an idle child, or starts one if fewer than ``size`` exist, or waits (on a Condition) for
    one to come free. A child killed for a timeout or lost to a crash is reaped at once and
    replaced the next time a caller needs one.

    ``mp_context``: ``"forkserver"`` (default) or ``"spawn"``. Both import the application's
    main module in the children (as ``__mp_main__``), so a main script must guard its start-up
    code with ``if __name__ == "__main__":``. ``fork`` is refused: the engine's native worker
    threads make forking the application process unsafe.

    ``start_timeout``: seconds a new child may take to start (importing the main module
    included) before the task fails with WorkerLost.

    Children are not daemonic processes, so tasks may use multiprocessing themselves. An
    ``atexit`` hook kills the children of every pool still open at interpreter exit; the
    children also exit on their own when the parent process dies.
    """

    _start_method: str

    def __init__(
        self,
        size: int | None = None,
        *,
        mp_context: str = "forkserver",
        name: str = "catzilla-tasks",
        start_timeout: float = 60.0,
    ) -> None:
        if size is None:
            size = len(os.sched_getaffinity(0)) or 1
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(f"size: must be an integer >= 1, got {size!r}")
        if mp_context == "fork":
            raise ValueError(
                "mp_context='fork' is not supported: forking a process that runs the engine's "
                "native worker threads is unsafe; use 'forkserver' (default) or 'spawn'"
            )
        if mp_context not in _START_METHODS:
            raise ValueError(f"mp_context: must be one of {', '.join(map(repr, _START_METHODS))}, got {mp_context!r}")
        start_timeout_f = _check_limit("start_timeout", start_timeout)
        if start_timeout_f is None:
            raise ValueError("start_timeout: must be a finite number of seconds > 0")
        ctx = multiprocessing.get_context(mp_context)
        if mp_context == "forkserver":
            _forkserver_preload()
        super().__init__(int(size), str(name), ctx, start_timeout_f)
        self._start_method = mp_context
        _POOLS.add(self)

    # -- introspection -----------------------------------------------------------------

    @property
    def size(self) -> int:
        """The most children this pool runs at once."""
        return self._size

    @property
    def start_method(self) -> str:
        return self._start_method

    @property
    def alive(self) -> int:
        """Children that exist now (idle, busy or starting)."""
        with self._lock:
            return self._slots

    @property
    def busy(self) -> int:
        """Children running a task now."""
        with self._lock:
            return len(self._busy)

    @property
    def closed(self) -> bool:
        return self._closing

    def pids(self) -> list[int]:
        """Process ids of the children that have started (idle or busy)."""
        with self._lock:
            return sorted(c.pid for c in itertools.chain(self._idle, self._busy))

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "size": self._size,
                "alive": self._slots,
                "idle": len(self._idle),
                "busy": len(self._busy),
                "waiting": max(0, self._inflight - len(self._busy)),
                "tasks": self._tasks,
                "children_started": self._started,
                "children_lost": self._lost,
                "timeouts": self._timeouts,
            }

    def __repr__(self) -> str:
        state = "closed" if self._closing else "open"
        return f"<ProcessPool {self._name!r} size={self._size} {self._start_method} alive={self._slots} {state}>"

    def __enter__(self) -> ProcessPool:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown(wait=True)

    # -- running tasks -----------------------------------------------------------------

    def run(
        self,
        func: Callable[..., Any],
        args: tuple = (),
        kwargs: dict | None = None,
        *,
        timeout_s: float | None = None,
        memory_limit_mb: float | None = None,
    ) -> Any:
        """Run ``func(*args, **kwargs)`` in a child and return its value, or raise the task's
        own exception (with the child's traceback as ``__cause__``), ``TaskTimeout`` (the child
        was killed after ``timeout_s`` seconds), ``MemoryLimitExceeded``, ``WorkerLost`` (the
        child died), ``TaskExceptionNotPicklable``, or ``TypeError`` (something does not
        pickle). Blocks the calling thread, without holding the GIL while it waits.

        ``timeout_s`` counts from the moment the task is handed to a running child (time spent
        waiting for a free child or starting one is not included). Raises ``RuntimeError`` after
        :meth:`shutdown`."""
        timeout_s = _check_limit("timeout_s", timeout_s)
        memory_limit_mb = _check_limit("memory_limit_mb", memory_limit_mb)
        payload = pickle_task(func, args, kwargs)
        return self.run_pickled(payload, timeout_s=timeout_s, memory_limit_mb=memory_limit_mb)

    def run_pickled(
        self,
        payload: bytes,
        *,
        timeout_s: float | None = None,
        memory_limit_mb: float | None = None,
        cancel: CancelToken | None = None,
    ) -> Any:
        """:meth:`run` for a task already pickled by :func:`pickle_task`. ``cancel``: a
        :class:`CancelToken` another thread may use to cancel this call."""
        timeout_s = _check_limit("timeout_s", timeout_s)
        memory_limit_mb = _check_limit("memory_limit_mb", memory_limit_mb)
        message = _HEADER.pack(memory_limit_mb or 0.0) + payload
        if cancel is not None:
            cancel._begin(self)
        self._enter()
        try:
            for _attempt in range(3):
                if cancel is not None and cancel.cancelled:
                    raise _cancelled_error(None)
                child = self._acquire(cancel)
                if cancel is not None and not cancel._attach(child):
                    self._release(child, ran=False)
                    raise _cancelled_error(None)
                try:
                    if child.conn.poll(0):
                        # An idle child never speaks first: this is EOF, it died while idle
                        # (killed from outside). The task has not started: use another child.
                        self._discard(child, kill=False)
                        continue
                    child.conn.send_bytes(message)
                except OSError:  # it died while idle, or while reading the task
                    self._discard(child, kill=True)
                    continue
                except BaseException:
                    self._discard(child, kill=True)
                    raise
                return self._outcome(child, timeout_s, memory_limit_mb, cancel)
            raise WorkerLost(
                "the task could not be handed to a child process: three children in a row died before it started"
            )
        finally:
            self._leave()

    # -- shutdown ------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, timeout: float | None = None) -> None:
        """Stop the pool: later ``run`` calls raise RuntimeError, then every child exits.

        ``wait=True``: tasks already inside ``run`` (running, or waiting for a child) finish
        first; with ``timeout``, those still unfinished after ``timeout`` seconds are killed
        (their callers get WorkerLost) and those still waiting get RuntimeError.
        ``wait=False``: kill running tasks now, the same way. Either way the call returns once
        the children are gone. Idempotent."""
        if self._forked:
            return
        timeout = _check_limit("timeout", timeout)
        with self._lock:
            self._closing = True
            if not wait:
                self._terminating = True
            elif timeout is None:
                while self._inflight:
                    self._all_done.wait()
            else:
                deadline = time.monotonic() + timeout
                while self._inflight:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._terminating = True
                        break
                    self._all_done.wait(remaining)
            busy = list(self._busy) if self._terminating else []
            self._child_free.notify_all()  # waiting callers see _terminating and give up
        for child in busy:
            kill_child(child)  # their callers see the death, reap the child and raise
        with self._lock:
            # callers leave promptly once their child is dead; bound the wait all the same
            deadline = time.monotonic() + 30.0
            while self._inflight and time.monotonic() < deadline:
                self._all_done.wait(max(0.0, deadline - time.monotonic()))
            idle, self._idle = self._idle, []
        if idle:
            try:
                end_children(idle, kill=False)
            finally:
                with self._lock:
                    self._slots -= len(idle)


def _shutdown_all_at_exit() -> None:
    # This module is imported on first use, after engine.py registered its exit hook, so this
    # hook runs first: the engines drain here (their queued process tasks need the pools),
    # then the pools stop. engine's own hook then finds them shut down.
    engine = sys.modules.get(f"{__package__.rpartition('.')[0]}.engine")
    if engine is not None:
        engine._shutdown_all()
    for pool in list(_POOLS):
        try:
            pool.shutdown(wait=False)
        except Exception:  # noqa: BLE001, S110 - exiting anyway
            pass


def _after_fork_in_child() -> None:
    for pool in list(_POOLS):
        pool._forget_after_fork()


# Registered after multiprocessing's own exit hook, so it runs before it: our children are
# gone by the time multiprocessing joins its non-daemonic children.
atexit.register(_shutdown_all_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)
