"""Every exception the package raises, in one tree under :class:`CatzillaTasksError`.

Each class keeps the builtin base it had before the tree existed (``TaskTimeout`` is still a
``TimeoutError``, ``CompileError`` a ``TypeError``...), so ``except TimeoutError`` code keeps
working and ``except CatzillaTasksError`` catches them all. The modules that raised them first
re-export them (``catzilla_tasks.workflows.WorkflowError`` is this module's class); the C
extension imports ``QueueFull`` and ``TaskCancelled`` from here when it initialises, so there is
one definition of each.

This module is a leaf: it imports nothing of the package (the C extension imports it while the
package itself is still importing).

The second half is the wire form of an exception (``encode_error``/``decode_error``): how a task's
exception travels from a remote worker to the process that waits for its result. Decoding is one
lookup by name in :data:`_BY_WIRE_NAME` (builtins by their plain name); an exception of a type
not found there comes back as :class:`RemoteTaskError`.
"""

from __future__ import annotations

import builtins
from typing import Any

__all__ = [
    "CatzillaTasksError",
    "ChildTraceback",
    "CompileError",
    "DecodeError",
    "MemoryLimitExceeded",
    "QueueFull",
    "RemoteTaskError",
    "ShutdownTimeout",
    "TaskCancelled",
    "TaskExceptionNotPicklable",
    "TaskTimeout",
    "WorkerLost",
    "WorkflowError",
]


class CatzillaTasksError(Exception):
    """The base of every exception catzilla_tasks raises (a task's own exception is re-raised
    as itself, not wrapped)."""

    # attributes that travel with the error to another process (plain values only)
    _remote_fields: tuple[str, ...] = ()

    @classmethod
    def _from_remote(cls, message: str, fields: dict[str, Any]) -> CatzillaTasksError:
        """Rebuild from the wire: the message and the ``_remote_fields`` a remote sent."""
        return cls(message, **{k: fields[k] for k in cls._remote_fields if k in fields})

    def __reduce__(self) -> Any:
        # Pickle's default calls cls(*args), which cannot pass keyword-only arguments; rebuild the
        # way a remote error is, then restore every attribute (process isolation sends a task's
        # exception to the parent by pickle).
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[CatzillaTasksError], args: tuple[Any, ...], state: dict[str, Any]) -> CatzillaTasksError:
    exc = cls._from_remote(args[0] if args else "", state)
    exc.args = args
    exc.__dict__.update(state)
    return exc


# -- the engine (raised by the C extension) ---------------------------------------------------


class QueueFull(CatzillaTasksError):
    """The engine already holds ``queue_size`` queued tasks (or its ``memory_pool_mb``)."""


class TaskCancelled(CatzillaTasksError):
    """The task was cancelled before it ran (or while it ran, if it checked for it)."""


class ShutdownTimeout(CatzillaTasksError, TimeoutError):
    """shutdown() ran out of time: ``cancelled`` queued tasks were cancelled and ``running``
    tasks were still running when it returned."""

    _remote_fields = ("cancelled", "running")

    def __init__(self, message: str, cancelled: int = 0, running: int = 0) -> None:
        super().__init__(message)
        self.cancelled = cancelled
        self.running = running


# -- limits and process isolation -------------------------------------------------------------


class TaskTimeout(CatzillaTasksError, TimeoutError):
    """The task ran longer than its hard timeout and was stopped (a process-isolated task's
    child process is killed and replaced)."""


class MemoryLimitExceeded(CatzillaTasksError, MemoryError):
    """The task hit its ``memory_limit_mb``: an allocation failed under the child's
    address-space limit, or the kernel killed the child for memory."""


class WorkerLost(CatzillaTasksError):
    """The child process running the task died before the task finished (a crash such as a
    segfault, a signal such as ``kill -9``, or ``os._exit``). Only that task fails; the pool
    replaces the child.

    ``pid`` is the child's process id, ``exitcode`` its exit status as multiprocessing reports
    it (negative: killed by that signal; ``None``: unknown).
    """

    _remote_fields = ("pid", "exitcode")

    def __init__(self, message: str, *, pid: int | None = None, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode


class TaskExceptionNotPicklable(CatzillaTasksError):
    """A process-isolated task raised an exception that cannot be pickled (or unpickled), so it
    could not be re-raised in the parent. ``type_name`` names the original exception class,
    ``child_traceback`` holds its traceback as text (also shown as this error's ``__cause__``)."""

    _remote_fields = ("type_name", "child_traceback")

    def __init__(self, message: str, *, type_name: str = "", child_traceback: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name
        self.child_traceback = child_traceback


class ChildTraceback(CatzillaTasksError):
    """The traceback text of an exception raised in a child process. A re-raised task
    exception carries it as its ``__cause__``, so a printed traceback shows both sides."""

    _remote_fields = ("pid",)

    def __init__(self, text: str, pid: int | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.pid = pid

    def __str__(self) -> str:
        where = f" (pid {self.pid})" if self.pid is not None else ""
        return f"traceback in the child process{where}:\n{self.text.rstrip()}"


# -- workflows, the compiler, distributed mode ------------------------------------------------


class WorkflowError(CatzillaTasksError):
    """A step of a workflow failed, so the workflow did.

    ``step`` is the failing step's id, ``workflow`` the workflow's name, ``__cause__`` the
    step's own exception (TaskCancelled if someone cancelled the step, RuntimeError if the
    engine shut down before the step could be queued), and ``results`` the values of the steps
    that had succeeded when it failed, by step id.
    """

    _remote_fields = ("workflow", "step")

    def __init__(self, message: str, *, workflow: str, step: str, results: dict[str, Any]) -> None:
        super().__init__(message)
        self.workflow = workflow
        self.step = step
        self.results = results

    @classmethod
    def _from_remote(cls, message: str, fields: dict[str, Any]) -> WorkflowError:
        # the step values are not in the error record; RemoteResult reads them from the run
        return cls(message, workflow=str(fields.get("workflow", "")), step=str(fields.get("step", "")), results={})


class CompileError(CatzillaTasksError, TypeError):
    """``compile_to_c="require"`` and the task cannot be compiled (the message says why)."""


class RemoteTaskError(CatzillaTasksError):
    """A task run by a remote worker raised an exception that cannot be rebuilt here (not a
    built-in exception type). ``type_name`` names its class, ``remote_traceback`` is its
    traceback as text."""

    _remote_fields = ("type_name", "remote_traceback")

    def __init__(self, message: str, *, type_name: str = "", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name
        self.remote_traceback = remote_traceback


class DecodeError(CatzillaTasksError, ValueError):
    """A payload that cannot be decoded (garbage, an unknown format, or pickle not allowed)."""


# -- the wire form of an exception ------------------------------------------------------------

# The name each error travels by. It is the name the class had before this module held them all
# (``module.qualname`` of where it was defined), so a result written by an older worker still
# decodes here and an older producer still recognises a newer worker's errors.
_WIRE_NAME: dict[type[BaseException], str] = {
    QueueFull: "catzilla_tasks.QueueFull",
    TaskCancelled: "catzilla_tasks.TaskCancelled",
    ShutdownTimeout: "catzilla_tasks.engine.ShutdownTimeout",
    TaskTimeout: "catzilla_tasks.errors.TaskTimeout",
    MemoryLimitExceeded: "catzilla_tasks.errors.MemoryLimitExceeded",
    WorkerLost: "catzilla_tasks.errors.WorkerLost",
    TaskExceptionNotPicklable: "catzilla_tasks.errors.TaskExceptionNotPicklable",
    ChildTraceback: "catzilla_tasks.isolation.ChildTraceback",
    WorkflowError: "catzilla_tasks.workflows.WorkflowError",
    CompileError: "catzilla_tasks.compiler.CompileError",
    RemoteTaskError: "catzilla_tasks.brokers.redis.RemoteTaskError",
    DecodeError: "catzilla_tasks.brokers.serialization.DecodeError",
}
# name -> class: the wire names above, and each class's name in this module (a future wire name)
_BY_WIRE_NAME: dict[str, type[BaseException]] = {
    **{f"{__name__}.{cls.__qualname__}": cls for cls in _WIRE_NAME},
    **{name: cls for cls, name in _WIRE_NAME.items()},
}


def wire_name(kind: type[BaseException]) -> str:
    """The name an exception type travels by: ours by :data:`_WIRE_NAME`, a builtin by its plain
    name, anything else as ``module.qualname``."""
    name = _WIRE_NAME.get(kind)
    if name is not None:
        return name
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def remote_class(name: str) -> type[BaseException] | None:
    """The exception class a wire name stands for (ours or a builtin), None if not known here."""
    kind = _BY_WIRE_NAME.get(name)
    if kind is None and "." not in name:
        found = getattr(builtins, name, None)
        kind = found if isinstance(found, type) and issubclass(found, Exception) else None
    return kind


def encode_error(exc: BaseException, **extra: Any) -> list[Any]:
    """``[name, message, traceback]`` of an exception, plus a dict of its ``_remote_fields``
    (and ``extra``) when there are any."""
    import traceback

    kind = type(exc)
    # Never raises (one task's odd exception must not spoil a commit batch): an exception whose
    # __str__ or traceback formatting raises is described by its type name and repr instead.
    try:
        message = exc.args[0] if isinstance(exc, CatzillaTasksError) and exc.args else str(exc)
        message = str(message)
    except Exception as bad:
        try:
            shown = repr(exc)
        except Exception:
            shown = f"<{kind.__qualname__} object>"
        message = f"{shown} (its str() raised {type(bad).__name__})"
    try:
        tb = "".join(traceback.format_exception(kind, exc, exc.__traceback__))
    except Exception:
        tb = ""
    try:
        fields = {k: getattr(exc, k) for k in getattr(kind, "_remote_fields", ())}
    except Exception:
        fields = {}
    fields.update(extra)
    record: list[Any] = [wire_name(kind), message, tb]
    if fields:
        record.append(fields)
    return record


def decode_error(record: Any) -> BaseException:
    """Rebuild a remote task's exception from :func:`encode_error`'s record: built-in types and
    ours come back as themselves (with ``remote_traceback`` set), anything else as
    :class:`RemoteTaskError`. A ``cause`` field is decoded as the error's ``__cause__``."""
    try:
        name, message, tb = (list(record) + ["", "", ""])[:3]
    except TypeError:
        name, message, tb = "Exception", repr(record), ""
    name, message = str(name), str(message)
    fields = record[3] if isinstance(record, (list, tuple)) and len(record) > 3 and isinstance(record[3], dict) else {}
    kind = remote_class(name)
    exc: BaseException | None = None
    if kind is not None:
        try:
            if issubclass(kind, CatzillaTasksError):
                exc = kind._from_remote(message, fields)
            else:
                exc = kind(message)
        except Exception:  # a builtin whose constructor wants more (UnicodeDecodeError...)
            exc = None
    if exc is None:
        return RemoteTaskError(f"{name}: {message}", type_name=name, remote_traceback=tb)
    if fields.get("cause") is not None:
        exc.__cause__ = decode_error(fields["cause"])
    if not getattr(exc, "remote_traceback", ""):  # a RemoteTaskError keeps the innermost one
        exc.remote_traceback = tb  # type: ignore[attr-defined]
    return exc
