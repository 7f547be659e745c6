"""What runs inside a pool child: its main loop (one task message at a time), the per-task
memory limit (RLIMIT_AS) and how a failure is recognised as hitting it, the signals it ignores,
its own process group, and the thread that ends it when the parent dies."""

from __future__ import annotations

import errno
import faulthandler
import inspect
import io
import multiprocessing
import multiprocessing.connection as mp_connection
import os
import pickle
import resource
import signal
import threading
from collections.abc import Callable
from typing import Any

from ._pickling import _PROTOCOL
from ._wire import _HEADER, _READY, _VALUE, _error_reply, _safe_text

_MiB = 1024 * 1024
_RLIM_MAX = 2**63 - 1  # the largest limit resource.setrlimit takes (a C long long)


def _address_space_bytes() -> int:
    """This process's mapped address space (what RLIMIT_AS counts)."""
    fd = os.open("/proc/self/statm", os.O_RDONLY)
    try:
        return int(os.read(fd, 64).split()[0]) * os.sysconf("SC_PAGE_SIZE")
    finally:
        os.close(fd)


def _thread_stack_bytes() -> int:
    """The address space a new thread maps for its stack (glibc: RLIMIT_STACK's soft limit,
    8 MiB by default, or 2 MiB when unlimited; threading.stack_size() when set)."""
    size = threading.stack_size()
    if not size:
        soft = resource.getrlimit(resource.RLIMIT_STACK)[0]
        size = soft if soft != resource.RLIM_INFINITY else 2 * _MiB
    return size


_active_limit = 0  # in a child: the RLIMIT_AS set for the running task, or 0


def _guard_thread_starts() -> None:
    """In a child: a thread that cannot start ("can't start new thread") because its stack
    would not fit under the task's memory limit marks its RuntimeError as a limit hit, checked
    at the moment it fails (the threads started before it may be gone by the time the task's
    error reaches _limit_hit)."""
    import _thread

    def guarded(start: Callable[..., Any]) -> Callable[..., Any]:
        def start_thread(*args: Any, **kwargs: Any) -> Any:
            try:
                return start(*args, **kwargs)
            except RuntimeError as exc:
                limit = _active_limit
                if limit and _address_space_bytes() + _thread_stack_bytes() > limit:
                    exc._catzilla_tasks_limit_hit = True  # type: ignore[attr-defined]
                raise

        return start_thread

    # threading keeps its own reference (3.11-3.12: _start_new_thread; 3.13: _start_joinable_thread)
    for mod, name in (
        (_thread, "start_new_thread"),
        (_thread, "start_joinable_thread"),
        (threading, "_start_new_thread"),
        (threading, "_start_joinable_thread"),
    ):
        start = getattr(mod, name, None)
        if start is not None:
            setattr(mod, name, guarded(start))


def _limit_hit(exc: BaseException) -> bool:
    """Whether a task's failure under its RLIMIT_AS comes from that limit: a MemoryError,
    an allocation refused with ENOMEM (mmap, fork), or a thread that could not map its stack
    while near the limit -- the failure itself or anything in its cause/context chain (a task
    that turned a MemoryError into its own error still hit its limit)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, MemoryError):
            return True
        if isinstance(e, OSError) and e.errno == errno.ENOMEM:
            return True
        if isinstance(e, (ImportError, OSError)) and _dl_out_of_memory(e):
            return True
        if getattr(e, "_catzilla_tasks_limit_hit", False):  # see _guard_thread_starts
            return True
        e = e.__cause__ or e.__context__
    return False


# What the dynamic loader (glibc's dlerror) says when it cannot map a shared library: the
# error of an import (ImportError) or of ctypes/cffi (OSError, no errno) that failed that way.
_DL_NO_MEMORY = ("failed to map segment from shared object", "cannot map zero-fill pages", "cannot allocate memory")


def _dl_out_of_memory(exc: BaseException) -> bool:
    text = _safe_text(exc).lower()
    return any(mark in text for mark in _DL_NO_MEMORY) and "static tls" not in text


def _run_coroutine(coro: Any) -> Any:
    import asyncio  # only children that run async tasks pay for it

    return asyncio.run(coro)


def _run_one(message: bytes) -> tuple[bytes | memoryview, bool]:
    """Run one task message; return (reply, retire this child)."""
    global _active_limit
    (limit_mb,) = _HEADER.unpack_from(message)
    try:
        func, args, kwargs = pickle.loads(memoryview(message)[_HEADER.size :])  # noqa: S301 - from the parent over a private pipe
    except BaseException as exc:  # noqa: BLE001
        return _error_reply(exc, "load"), False
    del message

    old_limit = None
    new_soft = 0  # RLIMIT_AS for the task (0: none)
    if limit_mb > 0:
        try:
            old_limit = resource.getrlimit(resource.RLIMIT_AS)
            soft, hard = old_limit
            new_soft = _address_space_bytes() + int(limit_mb * _MiB)
            for cap in (soft, hard, _RLIM_MAX):  # a limit setrlimit cannot take is none at all
                if cap != resource.RLIM_INFINITY:
                    new_soft = min(new_soft, cap)
            resource.setrlimit(resource.RLIMIT_AS, (new_soft, hard))
        except (OSError, ValueError) as exc:
            return _error_reply(exc, "limit"), False
    _active_limit = new_soft
    failure: BaseException | None = None
    memory = False
    value: Any = None
    try:
        value = func(*args, **kwargs)
        if inspect.iscoroutine(value):  # an async def task: run to its end on a loop of its own
            value = _run_coroutine(value)
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        failure = exc
        memory = old_limit is not None and _limit_hit(exc)
    finally:
        _active_limit = 0
        if old_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, old_limit)
    del func, args, kwargs

    if failure is not None:
        reply = _error_reply(failure, "call", memory=memory)
        del failure
        return reply, memory  # a child that ran out of memory is not reused
    buf = io.BytesIO()
    buf.write(_VALUE)
    try:
        pickle.Pickler(buf, protocol=_PROTOCOL).dump(value)
    except BaseException as exc:  # noqa: BLE001
        del buf
        reply = _error_reply(exc, "result")
        return reply, False
    del value
    return buf.getbuffer(), False


def _watch_parent() -> None:
    """Exit when the parent process is gone, even in the middle of a task (a task spinning in
    ``while True`` must not outlive a parent killed with SIGKILL)."""
    parent = multiprocessing.parent_process()
    sentinel = getattr(parent, "sentinel", None)
    if sentinel is None:
        return

    def watch() -> None:
        try:
            mp_connection.wait([sentinel])
        finally:
            _kill_own_group()
            os._exit(70)

    threading.Thread(target=watch, name="catzilla-tasks-parent-watch", daemon=True).start()


def _kill_own_group() -> None:
    """SIGKILL this child's process group (the task's own subprocesses, and this process),
    if this child leads one; never the group it was started in."""
    try:
        if os.getpgid(0) == os.getpid():
            os.killpg(0, signal.SIGKILL)
    except OSError:
        pass


def _ignore_signal(signum: int, frame: Any) -> None:
    """SIGTERM in a pool child: the parent drains (or kills) it; a handler rather than SIG_IGN,
    so a task's own subprocesses start with the default action (exec resets handlers)."""


_IN_CHILD = False


def in_pool_child() -> bool:
    """True in a ProcessPool child, and in any multiprocessing child (or forkserver) while it
    imports the application's main module, i.e. before a pool child runs its first task. An
    engine created there (a module-level ``BackgroundTasks()`` in the main module or in a
    task's module) should not start worker threads: the child only runs what the parent
    sends it."""
    return _IN_CHILD or bool(getattr(multiprocessing.current_process(), "_inheriting", False))


def _child_main(conn: Any, crash_w: Any) -> None:
    """Body of a pool child: answer task messages on ``conn`` until EOF."""
    global _IN_CHILD
    _IN_CHILD = True
    # A process group of its own: a hard timeout, cancel() or the parent's death kills the
    # task's subprocesses with it (the parent signals the group), and a signal for the
    # parent's group (Ctrl-C in a terminal, kill -TERM -pgid) does not reach it.
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    # Ctrl-C and SIGTERM (systemd signals every process of the service): the parent decides
    # what happens to running tasks (a drain, or shutdown), the children do not die under them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _ignore_signal)
    _guard_thread_starts()
    try:  # a crash (SIGSEGV, SIGABRT, ...) writes the task's Python stack here for WorkerLost
        faulthandler.enable(file=crash_w, all_threads=False)
    except (OSError, ValueError, RuntimeError):
        pass
    _watch_parent()
    conn.send_bytes(_READY)
    while True:
        try:
            # no local reference to the message: _run_one drops it once the task is unpickled
            reply, retire = _run_one(conn.recv_bytes())
        except (EOFError, OSError):
            return
        try:
            conn.send_bytes(reply)
        except OSError:
            return
        del reply
        if retire:
            return
