"""The messages between the parent and a child, and what a reply (or a death) means.

parent -> child: ``_HEADER`` (the task's memory limit) + ``pickle_task``'s bytes.
child -> parent: one byte, then a payload: ``_READY`` once after start, ``_VALUE`` + the
pickled value, or ``_ERROR`` + a pickled dict describing the failure (``_error_reply``, built
in the child; ``_rebuild_error`` turns it back into an exception in the parent). A child that
dies instead of answering becomes ``_death_error`` (WorkerLost, or MemoryLimitExceeded when the
kernel's OOM killer took it), with what its faulthandler wrote (``_read_crash_text``).
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import traceback
from typing import Any

from ..errors import (
    ChildTraceback,
    MemoryLimitExceeded,
    TaskExceptionNotPicklable,
    WorkerLost,
)
from ._pickling import _NEED, _PROTOCOL, _why

# parent -> child: header (memory_limit_mb as a double, 0.0 = none) + pickle of (func, args, kwargs)
_HEADER = struct.Struct("<d")
# child -> parent: the first byte says what follows
_READY = b"+"  # handshake after start
_VALUE = b"R"  # + pickle of the task's return value
_ERROR = b"E"  # + pickle of a dict describing the failure (see _error_reply)
_CRASH_TEXT_MAX = 16 * 1024


def _safe_text(exc: BaseException, limit: int = 2000) -> str:
    try:
        text = str(exc)
    except BaseException:  # noqa: BLE001 - a broken __str__ must not kill the child
        text = "<str() failed>"
    return text if len(text) <= limit else text[:limit] + "..."


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _error_reply(exc: BaseException, stage: str, *, memory: bool = False) -> bytes:
    """Describe a failure for the parent: the exception pickled if it survives a round trip,
    else its type, message and traceback as text."""
    try:
        tb = "".join(traceback.format_exception(exc))
    except BaseException:  # noqa: BLE001
        tb = f"{_type_name(exc)}: {_safe_text(exc)}\n(the traceback could not be formatted)\n"
    exc_bytes: bytes | None
    problem = ""
    try:
        exc_bytes = pickle.dumps(exc, protocol=_PROTOCOL)
        pickle.loads(exc_bytes)  # noqa: S301 - our own bytes, just made: an exception whose __init__ needs more args fails only here
    except BaseException as pickling_exc:  # noqa: BLE001
        exc_bytes = None
        problem = _why(pickling_exc)
    info = {
        "stage": stage,  # "load" (unpickling the task), "call", "result" (pickling the value)
        "type": _type_name(exc),
        "text": _safe_text(exc),
        "traceback": tb,
        "exc": exc_bytes,
        "problem": problem,
        "memory": memory,
        "pid": os.getpid(),
    }
    return _ERROR + pickle.dumps(info, protocol=_PROTOCOL)


def _rebuild_error(info: dict, memory_limit_mb: float | None) -> BaseException:
    """The parent-side exception for an error reply from a child."""
    tb = ChildTraceback(info["traceback"], info.get("pid"))
    stage = info["stage"]
    if info["memory"]:
        exc: BaseException = MemoryLimitExceeded(
            f"the task exceeded its memory limit (memory_limit_mb={memory_limit_mb:g} of virtual memory: "
            f"address space mapped during the task, thread stacks included): "
            f"{info['type']}: {info['text']}".rstrip(": ")
        )
        exc.__cause__ = tb
        return exc
    if stage == "result":
        exc = TypeError(f"the task's result cannot be pickled ({info['type']}: {info['text']}): {_NEED}")
        exc.__cause__ = tb
        return exc
    original = None
    if info["exc"] is not None:
        try:
            original = pickle.loads(info["exc"])  # noqa: S301 - from our child over a private pipe
        except Exception as exc_:  # noqa: BLE001 - e.g. its class does not exist in the parent
            info["problem"] = _why(exc_)
    if not isinstance(original, BaseException):
        what = "could not be loaded in the child process" if stage == "load" else "raised"
        exc = TaskExceptionNotPicklable(
            f"the task {what} {info['type']}: {info['text']} -- an exception that cannot be "
            f"sent back to the parent process ({info['problem']}); its traceback is this "
            f"error's __cause__",
            type_name=info["type"],
            child_traceback=info["traceback"],
        )
        exc.__cause__ = tb
        return exc
    if stage == "load":
        original.add_note(
            "catzilla_tasks: the task could not be unpickled in the child process; a "
            "process-isolated task's function must be importable there (a module-level "
            "function of an importable module)"
        )
    elif stage == "limit":
        original.add_note("catzilla_tasks: the child process could not apply memory_limit_mb")
    original.__cause__ = tb
    return original


def _exit_description(exitcode: int | None) -> str:
    if exitcode is None:
        return "its exit status is unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        desc = signal.strsignal(-exitcode) or ""
        return f"killed by {name}" + (f" ({desc.lower()})" if desc else "")
    if exitcode == 255:
        return "exited with code 255 (or its exit status was lost: is the forkserver gone?)"
    return f"exited with code {exitcode}"


def _death_error(
    pid: int | None,
    exitcode: int | None,
    crash_text: str,
    *,
    memory_limit_mb: float | None,
    oom_kills_before: int | None,
    oom_kills_after: int | None,
    shutting_down: bool = False,
) -> BaseException:
    """The error for a task whose child died under it (WorkerLost, or MemoryLimitExceeded
    when a memory-limited child was SIGKILLed while the kernel's OOM killer was at work)."""
    killed = exitcode == -signal.SIGKILL
    if (
        killed
        and memory_limit_mb is not None
        and oom_kills_before is not None
        and oom_kills_after is not None
        and oom_kills_after > oom_kills_before
    ):
        return MemoryLimitExceeded(
            f"the task's child process (pid {pid}) was killed by SIGKILL while the kernel's "
            f"out-of-memory killer was active: the task ran out of memory before reaching its "
            f"memory_limit_mb={memory_limit_mb:g} (the machine has less memory than that)"
        )
    if shutting_down:
        msg = f"the process pool was shut down while the task ran: its child process (pid {pid}) was killed"
    else:
        msg = f"the child process (pid {pid}) running the task died: {_exit_description(exitcode)}"
        if killed:
            msg += " (by another process, or by the kernel's out-of-memory killer)"
    if crash_text:
        msg += "\n" + crash_text
    return WorkerLost(msg, pid=pid, exitcode=exitcode)


def _oom_kill_count() -> int | None:
    """The kernel's count of out-of-memory kills (/proc/vmstat oom_kill), or None."""
    try:
        with open("/proc/vmstat", "rb") as f:
            for line in f:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _read_crash_text(crash_r: Any) -> str:
    """What the dead child's faulthandler wrote (non-blocking: the writer is gone or silent)."""
    chunks: list[bytes] = []
    try:
        fd = crash_r.fileno()
        total = 0
        while total < _CRASH_TEXT_MAX:
            try:
                chunk = os.read(fd, _CRASH_TEXT_MAX - total)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError:
        pass
    text = b"".join(chunks).decode("utf-8", "replace").strip()
    return f"crash report from the child (faulthandler):\n{text}" if text else ""
