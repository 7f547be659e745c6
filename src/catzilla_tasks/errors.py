"""Errors a task can end with besides its own exception.

``TaskTimeout`` is the hard timeout (process-isolated tasks today; thread tasks will reuse it),
``MemoryLimitExceeded`` and ``WorkerLost`` come from process isolation
(:mod:`catzilla_tasks.isolation`). ``TaskExceptionNotPicklable`` stands in for an exception a
process-isolated task raised that could not be sent back to the parent process.
"""

from __future__ import annotations

__all__ = ["TaskTimeout", "MemoryLimitExceeded", "WorkerLost", "TaskExceptionNotPicklable"]


class TaskTimeout(TimeoutError):
    """The task ran longer than its hard timeout and was stopped (a process-isolated task's
    child process is killed and replaced)."""


class MemoryLimitExceeded(MemoryError):
    """The task hit its ``memory_limit_mb``: an allocation failed under the child's
    address-space limit, or the kernel killed the child for memory."""


class WorkerLost(Exception):
    """The child process running the task died before the task finished (a crash such as a
    segfault, a signal such as ``kill -9``, or ``os._exit``). Only that task fails; the pool
    replaces the child.

    ``pid`` is the child's process id, ``exitcode`` its exit status as multiprocessing reports
    it (negative: killed by that signal; ``None``: unknown).
    """

    def __init__(self, message: str, *, pid: int | None = None, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode

    def __reduce__(self):  # keep pid/exitcode through pickling
        return (_rebuild_worker_lost, (self.args[0] if self.args else "", self.pid, self.exitcode))


def _rebuild_worker_lost(message: str, pid: int | None, exitcode: int | None) -> WorkerLost:
    return WorkerLost(message, pid=pid, exitcode=exitcode)


class TaskExceptionNotPicklable(Exception):
    """A process-isolated task raised an exception that cannot be pickled (or unpickled), so it
    could not be re-raised in the parent. ``type_name`` names the original exception class,
    ``child_traceback`` holds its traceback as text (also shown as this error's ``__cause__``)."""

    def __init__(self, message: str, *, type_name: str = "", child_traceback: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name
        self.child_traceback = child_traceback
