"""A ``ProcessPool``'s children, as bookkeeping: up to ``size`` slots, idle children (LIFO) and
busy ones, callers inside ``run`` and callers waiting for a free child (a Condition), counters
for ``stats()``. A caller takes an idle child, or starts one in a free slot (a child lost to a
timeout or a crash freed its slot, so the next caller starts its replacement), and gives it
back or discards it (killed, reaped). ``_ResultDispatch`` and ``ProcessPool`` build on it."""

from __future__ import annotations

import itertools
import multiprocessing
import multiprocessing.process as mp_process
import threading

from ._cancel import CancelToken, _cancelled_error
from ._children import _Child, end_children, handshake, start_child


class _ChildSlots:
    """The children of one pool and the callers using them (see the module docstring)."""

    # Declared here so the type checker knows them before it has read __init__.
    _size: int
    _name: str
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
    _idle: list[_Child]
    _busy: set[_Child]

    def __init__(self, size: int, name: str, ctx: multiprocessing.context.BaseContext, start_timeout: float) -> None:
        self._size = size
        self._name = name
        self._ctx = ctx
        self._start_timeout = start_timeout
        self._lock = threading.Lock()
        self._child_free = threading.Condition(self._lock)  # an idle child or a free slot
        self._all_done = threading.Condition(self._lock)  # no caller inside run() any more
        self._idle = []  # LIFO: the most recently used child runs the next task
        self._busy = set()
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

    def _wake_waiting(self) -> None:
        """Wake every caller waiting for a free child (each then re-checks why it waits)."""
        with self._lock:
            self._child_free.notify_all()

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
