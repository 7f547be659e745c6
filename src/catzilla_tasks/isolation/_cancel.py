"""Cancelling a process-isolated call: ``CancelToken`` (one call's cancellation, between the
caller and any other thread), ``IsolatedCall`` (what the engine queues for a process-isolated
task, cancellable through ``TaskResult.cancel()``) and the ``TaskCancelled`` error they end in."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from ..errors import TaskCancelled
from ._children import _Child, kill_child

if TYPE_CHECKING:
    from ._pool import ProcessPool
    from ._slots import _ChildSlots


class CancelToken:
    """Lets another thread cancel a :meth:`ProcessPool.run_pickled` call (``cancel=token``):
    before the task reaches a child it never does; while it runs, its child and the child's
    process group are killed. Either way the call raises ``TaskCancelled``. A token serves
    one call at a time (a retried task makes its calls one after the other)."""

    __slots__ = ("_lock", "_pool", "_child", "_finished", "cancelled")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: _ChildSlots | None = None
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
            pool._wake_waiting()  # a caller waiting for a free child gives up
        return True

    def _begin(self, pool: _ChildSlots) -> None:
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
