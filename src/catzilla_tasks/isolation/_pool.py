"""``ProcessPool``: up to ``size`` child processes, one task at a time each, shared by the engine's
worker threads; ``IsolatedCall`` (what the engine queues for a process-isolated task) and
``CancelToken`` (cancelling one call). A child's start, death and reaping are ``_children``'s;
what it runs is ``_in_child``'s; the bytes they exchange are ``_wire``'s."""

from __future__ import annotations

import atexit
import itertools
import math
import multiprocessing
import multiprocessing.connection as mp_connection
import multiprocessing.process as mp_process
import numbers
import os
import pickle
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from ..errors import TaskCancelled, TaskTimeout, WorkerLost
from ._children import (
    _Child,
    _forkserver_preload,
    end_children,
    handshake,
    kill_child,
    start_child,
)
from ._pickling import _why, pickle_task
from ._wire import (
    _ERROR,
    _HEADER,
    _VALUE,
    _death_error,
    _oom_kill_count,
    _rebuild_error,
)

_START_METHODS = ("forkserver", "spawn")
_POOLS: weakref.WeakSet[ProcessPool] = weakref.WeakSet()


class CancelToken:
    """Lets another thread cancel a :meth:`ProcessPool.run_pickled` call (``cancel=token``):
    before the task reaches a child it never does; while it runs, its child and the child's
    process group are killed. Either way the call raises ``TaskCancelled``. A token serves
    one call at a time (a retried task makes its calls one after the other)."""

    __slots__ = ("_lock", "_pool", "_child", "_finished", "cancelled")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ProcessPool | None = None
        self._child: _Child | None = None
        self._finished = False  # the last call has its outcome: too late to cancel it
        self.cancelled = False

    def cancel(self) -> bool:
        """True if the call is (or will be) cancelled; False once it has its outcome."""
        with self._lock:
            if self._finished:
                return False
            self.cancelled = True
            pool, child = self._pool, self._child
        if child is not None:
            kill_child(child)  # the waiting caller sees the death and raises TaskCancelled
        elif pool is not None:
            with pool._lock:  # a caller waiting for a free child gives up
                pool._child_free.notify_all()
        return True

    def _begin(self, pool: ProcessPool) -> None:
        with self._lock:
            if self.cancelled:
                raise _cancelled_error(None)
            self._pool, self._finished = pool, False

    def _attach(self, child: _Child) -> bool:
        """Give the call its child; False if cancelled meanwhile (the task was not sent)."""
        with self._lock:
            if self.cancelled:
                return False
            self._child = child
            return True

    def _settle(self) -> bool:
        """The call has its outcome: True to keep it, False if cancelled first."""
        with self._lock:
            self._child = None
            if self.cancelled:
                return False
            self._finished = True
            return True


def _cancelled_error(pid: int | None) -> BaseException:
    if pid is None:
        return TaskCancelled("the process-isolated task was cancelled before it started")
    return TaskCancelled(
        f"the process-isolated task was cancelled while it ran: its child process (pid {pid}) "
        "and the child's process group were killed"
    )


class IsolatedCall:
    """What the engine queues for a process-isolated task (``engine._isolate``): calling it
    runs the pickled task in the pool (blocking the worker thread); ``cancel()``, which
    ``TaskResult.cancel()`` of the running task calls, kills it (the task ends CANCELLED)."""

    def __init__(
        self, pool: ProcessPool, payload: bytes, name: str, timeout_s: float | None, memory_limit_mb: float | None
    ) -> None:
        self._pool = pool
        self._payload = payload
        self._timeout_s = timeout_s
        self._memory_limit_mb = memory_limit_mb
        self._token = CancelToken()
        self.__qualname__ = name  # what the monitor's failure list shows

    def __call__(self) -> Any:
        return self._pool.run_pickled(
            self._payload, timeout_s=self._timeout_s, memory_limit_mb=self._memory_limit_mb, cancel=self._token
        )

    def cancel(self) -> bool:
        return self._token.cancel()

    def __repr__(self) -> str:
        return f"<IsolatedCall {self.__qualname__} in {self._pool!r}>"


def _check_limit(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name}: expected a number > 0 or None, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name}: must be > 0 (or None for no limit), got {value!r}")
    return None if math.isinf(value) else float(value)


class ProcessPool:
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

    # Declared here so the type checker knows them before it has read __init__ (CancelToken,
    # defined above, uses the pool's lock).
    _size: int
    _name: str
    _start_method: str
    _ctx: multiprocessing.context.BaseContext
    _start_timeout: float
    _lock: threading.Lock
    _child_free: threading.Condition
    _all_done: threading.Condition
    _slots: int  # children alive or being started (<= size)
    _inflight: int  # callers inside run()
    _closing: bool
    _terminating: bool
    _forked: bool
    _ids: itertools.count[int]
    _started: int
    _lost: int
    _timeouts: int
    _tasks: int

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
        self._size = int(size)
        self._name = str(name)
        self._start_method = mp_context
        self._ctx = multiprocessing.get_context(mp_context)
        if mp_context == "forkserver":
            _forkserver_preload()
        self._start_timeout = start_timeout_f
        self._lock = threading.Lock()
        self._child_free = threading.Condition(self._lock)  # an idle child or a free slot
        self._all_done = threading.Condition(self._lock)  # no caller inside run() any more
        self._idle: list[_Child] = []  # LIFO: the most recently used child runs the next task
        self._busy: set[_Child] = set()
        self._slots = 0  # children alive or being started (<= size)
        self._inflight = 0  # callers inside run()
        self._closing = False  # shutdown() called: new run() calls are refused
        self._terminating = False  # running tasks are being killed, waiting callers refused
        self._forked = False  # this is a copy of the pool in an os.fork() child
        self._ids = itertools.count(1)
        self._started = 0
        self._lost = 0
        self._timeouts = 0
        self._tasks = 0
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

    # -- internals ---------------------------------------------------------------------

    def _enter(self) -> None:
        if self._forked:
            raise RuntimeError(
                "this ProcessPool belongs to the parent of this os.fork() child and cannot be "
                "used here; create a new pool in this process"
            )
        with self._lock:
            if self._closing:
                raise RuntimeError(f"{self!r} is shut down: it accepts no more tasks")
            self._inflight += 1

    def _leave(self) -> None:
        with self._lock:
            self._inflight -= 1
            if self._inflight == 0:
                self._all_done.notify_all()

    def _acquire(self, cancel: CancelToken | None = None) -> _Child:
        """An idle child (marked busy), a newly started one, or wait for either."""
        with self._lock:
            while True:
                if self._terminating:
                    raise RuntimeError(f"{self!r} was shut down before the task could start")
                if cancel is not None and cancel.cancelled:
                    raise _cancelled_error(None)
                if self._idle:
                    child = self._idle.pop()
                    self._busy.add(child)
                    return child
                if self._slots < self._size:
                    self._slots += 1
                    break
                try:
                    self._child_free.wait()
                except BaseException:  # e.g. Ctrl-C: do not swallow a wake-up meant for a caller
                    self._child_free.notify()
                    raise
        try:
            child = self._start_child()
        except BaseException:
            with self._lock:
                self._slots -= 1
                self._child_free.notify()
            raise
        with self._lock:
            self._busy.add(child)
            terminating = self._terminating
        if terminating:
            self._discard(child, kill=True)
            raise RuntimeError(f"{self!r} was shut down before the task could start")
        return child

    def _start_child(self) -> _Child:
        child = start_child(self._ctx, f"{self._name}-{next(self._ids)}")
        with self._lock:
            self._started += 1
        handshake(child, self._start_timeout)
        return child

    def _release(self, child: _Child, ran: bool = True) -> None:
        """Return a healthy child to the idle list (or end it if the pool is terminating)."""
        child.tasks += ran
        with self._lock:
            self._tasks += ran
            self._busy.discard(child)
            if not self._terminating:
                self._idle.append(child)
                self._child_free.notify()
                return
        self._discard(child, kill=False)

    def _discard(self, child: _Child, *, kill: bool) -> tuple[int | None, str]:
        """End a child we own (busy), reap it and free its slot: (exit code, crash report)."""
        try:
            return end_children([child], kill=kill)[0]
        finally:
            with self._lock:
                self._busy.discard(child)
                self._slots -= 1
                self._child_free.notify()

    def _receive(self, child: _Child, deadline: float | None) -> bytes | None:
        """The child's reply; None if it died first; raises _Deadline when time is up."""
        conn = child.conn
        death = child.death
        while True:
            if deadline is None:
                remaining = None
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if conn.poll(0):  # the answer came in at the last moment
                        break
                    raise _Deadline
            ready = mp_connection.wait([conn, death], remaining)
            if conn in ready:
                break
            if ready:  # the child exited; nothing (not even EOF) on its pipe
                return None
        try:
            return conn.recv_bytes()
        except (EOFError, OSError):
            return None

    def _outcome(
        self, child: _Child, timeout_s: float | None, memory_limit_mb: float | None, cancel: CancelToken | None = None
    ) -> Any:
        """Wait for the task sent to ``child`` and turn the reply into a value or an error."""
        oom_before = _oom_kill_count() if memory_limit_mb is not None else None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            data = self._receive(child, deadline)
        except _Deadline:
            cancelled = cancel is not None and not cancel._settle()
            self._discard(child, kill=True)
            if cancelled:  # cancel() came first and said True: the task ends cancelled, not timed out
                raise _cancelled_error(child.pid) from None
            with self._lock:
                self._timeouts += 1
            raise TaskTimeout(
                f"the task did not finish within its hard timeout of {timeout_s:g} s: its child "
                f"process (pid {child.pid}) was killed"
            ) from None
        except BaseException:
            # e.g. KeyboardInterrupt while waiting: the child's answer can no longer be
            # collected, so it cannot be reused
            if cancel is not None:
                cancel._settle()
            self._discard(child, kill=True)
            raise
        if cancel is not None and not cancel._settle():
            self._discard(child, kill=True)  # killed by cancel(), or about to be
            raise _cancelled_error(child.pid)

        if data is None or data[:1] not in (_VALUE, _ERROR):
            # (killed even if dead: the task's subprocesses are left in its process group)
            exitcode, crash_text = self._discard(child, kill=True)
            with self._lock:
                self._lost += 1
                shutting_down = self._terminating
            raise _death_error(
                child.pid,
                exitcode,
                crash_text,
                memory_limit_mb=memory_limit_mb,
                oom_kills_before=oom_before,
                oom_kills_after=_oom_kill_count() if memory_limit_mb is not None else None,
                shutting_down=shutting_down,
            )

        if data[:1] == _VALUE:
            self._release(child)
            try:
                return pickle.loads(memoryview(data)[1:])  # noqa: S301 - from our child over a private pipe
            except Exception as exc:  # noqa: BLE001
                raise TypeError(
                    f"the task's result could not be unpickled in the parent process ({_why(exc)})"
                ) from exc

        info = pickle.loads(memoryview(data)[1:])  # noqa: S301 - from our child over a private pipe
        del data
        if info["memory"]:
            self._discard(child, kill=False)  # the child exits by itself after such a failure
        else:
            self._release(child)
        raise _rebuild_error(info, memory_limit_mb)

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

    def _forget_after_fork(self) -> None:
        """In an os.fork() child: this copy must never touch the parent's children."""
        self._forked = True
        self._closing = True
        # another thread of the parent may have held the lock at fork time
        self._lock = threading.Lock()
        self._child_free = threading.Condition(self._lock)
        self._all_done = threading.Condition(self._lock)
        children = list(self._idle) + list(self._busy)
        self._idle = []
        self._busy = set()
        self._slots = self._inflight = 0
        for child in children:
            # multiprocessing would otherwise terminate or join them at this process's exit
            mp_process._children.discard(child.process)  # type: ignore[attr-defined]


class _Deadline(Exception):
    """Internal: the task's hard timeout passed."""


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
