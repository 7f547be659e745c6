"""Process isolation: run a task in a pool of child processes.

``TaskConfig(isolation="process")`` tasks run here. The engine calls :meth:`ProcessPool.run`
from its own worker threads; the call blocks that thread (without the GIL) until the child
answers, and returns the task's value or raises:

* the task's own exception, re-raised in the parent with the child's traceback text as its
  ``__cause__`` (a :class:`ChildTraceback`);
* :class:`~catzilla_tasks.errors.TaskTimeout`: the hard timeout passed; the child was killed
  (the pool starts a new one when it next needs one);
* :class:`~catzilla_tasks.errors.MemoryLimitExceeded`: the task hit ``memory_limit_mb``;
* :class:`~catzilla_tasks.errors.WorkerLost`: the child died under the task (segfault,
  ``kill -9``, ``os._exit``); only that task fails;
* :class:`~catzilla_tasks.errors.TaskExceptionNotPicklable`: the task raised an exception
  that cannot travel back to the parent (its type, message and traceback are in the error);
* ``TypeError``: the function, an argument or the result cannot be pickled.

Design (see also the class docstrings):

* Start method: ``forkserver`` by default (``spawn`` also works; ``fork`` is refused). The
  engine's native worker threads make ``fork`` of the application process unsafe (a child
  could inherit a lock some other thread held). The forkserver is a fresh single-threaded
  process started with fork+exec, and children are forked from it: safe, no interpreter
  start per child (``spawn`` starts one each time), and only the file descriptors we pass
  reach a child. A child still imports the application's main module (Python 3.11's
  forkserver does not preload it) and this package, so a start costs ~0.1 s here either
  way, paid once per child: at first use and after a timeout or crash.
* One task at a time per child; children are started lazily up to ``size`` and reused. An
  ``async def`` task runs to its end in the child on an event loop of its own (``asyncio.run``).
* Memory limit: per task, in the child: ``RLIMIT_AS`` (virtual memory, not resident memory:
  a thread's whole stack counts) is set to the child's current address
  space + ``memory_limit_mb`` just before the call and restored just after, so the limit
  bounds what the task itself maps, whatever the child's baseline (an interpreter with
  numpy mapped is hundreds of MB of address space before any task runs). A child whose task
  hit its limit is retired, not reused.
* Waiting: the caller blocks in ``multiprocessing.connection.wait([conn, pidfd], timeout)``
  (the process sentinel where there is no pidfd), i.e. ``poll(2)`` with the real deadline,
  which releases the GIL; a dead child wakes the caller at once through its pidfd or EOF.
* Process groups: each child leads its own; killing a child (timeout, ``cancel()``,
  shutdown, the parent's death) or its own death (a crash) kills its group, so a task's subprocesses go with it. Callers waiting for a free child wait
  on a ``threading.Condition``. Nothing polls or sleeps.
"""

from __future__ import annotations

import atexit
import errno
import faulthandler
import inspect
import io
import itertools
import math
import multiprocessing
import multiprocessing.connection as mp_connection
import multiprocessing.process as mp_process
import numbers
import os
import pickle
import resource
import signal
import struct
import sys
import threading
import time
import traceback
import types
import weakref
from typing import Any, Callable

from .errors import ChildTraceback, MemoryLimitExceeded, TaskExceptionNotPicklable, TaskTimeout, WorkerLost

__all__ = [
    "ProcessPool",
    "check_picklable",
    "in_pool_child",
    "pickle_task",
    "ChildTraceback",
    "TaskTimeout",
    "MemoryLimitExceeded",
    "WorkerLost",
    "TaskExceptionNotPicklable",
]

_PROTOCOL = pickle.HIGHEST_PROTOCOL
_MiB = 1024 * 1024
# parent -> child: header (memory_limit_mb as a double, 0.0 = none) + pickle of (func, args, kwargs)
_HEADER = struct.Struct("<d")
# child -> parent: the first byte says what follows
_READY = b"+"   # handshake after start
_VALUE = b"R"   # + pickle of the task's return value
_ERROR = b"E"   # + pickle of a dict describing the failure (see _error_reply)
_CRASH_TEXT_MAX = 16 * 1024
_RLIM_MAX = 2**63 - 1  # the largest limit resource.setrlimit takes (a C long long)
_RETIRE_GRACE_S = 2.0    # an idle child told to exit (EOF) gets this long before SIGKILL
_REAP_WAIT_S = 5.0       # after SIGKILL, how long to wait for the exit status
_START_METHODS = ("forkserver", "spawn")

# multiprocessing reads a forkserver child's exit status from its sentinel on the first
# poll(); two threads polling the same child at once could split that read. Every start
# (Process.start polls all children) and every reap in this module holds this lock.
_MP_LOCK = threading.Lock()
_POOLS: "weakref.WeakSet[ProcessPool]" = weakref.WeakSet()


# ----------------------------------------------------------------------------- pickling

def _describe(obj: Any) -> str:
    if isinstance(obj, types.FunctionType):
        if obj.__name__ == "<lambda>":
            return "a lambda"
        if "<locals>" in obj.__qualname__:
            return f"a local function {obj.__qualname__!r}"
        return f"function {obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, types.MethodType):
        return f"a bound method {getattr(obj, '__qualname__', repr(obj))!r}"
    if isinstance(obj, type):
        return f"class {obj.__module__}.{obj.__qualname__}"
    cls = type(obj)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"{article} {name}"


def _hint(obj: Any) -> str:
    if isinstance(obj, (types.FunctionType, types.MethodType, type)):
        return "define the function at module level (not a lambda, not inside another function)"
    return "pass plain data (not live objects such as locks, sockets, open files or generators)"


def _why(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_NEED = "process-isolated tasks need picklable functions, arguments and results"


def _unpicklable_error(func: Any, args: tuple, kwargs: dict, exc: BaseException) -> TypeError:
    """The TypeError naming the first part of a task that does not pickle."""
    parts: list[tuple[str, Any]] = [("the task function", func)]
    parts += [(f"argument {i}", a) for i, a in enumerate(args, 1)]
    parts += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    for label, obj in parts:
        try:
            pickle.dumps(obj, protocol=_PROTOCOL)
        except Exception as part_exc:  # noqa: BLE001 - pickling raises many types
            return TypeError(
                f"{label} ({_describe(obj)}) cannot be pickled ({_why(part_exc)}): {_NEED}; {_hint(obj)}"
            )
    return TypeError(f"the task's function and arguments cannot be pickled together ({_why(exc)}): {_NEED}")


def pickle_task(func: Callable[..., Any], args: tuple = (), kwargs: dict | None = None) -> bytes:
    """Pickle a task for :meth:`ProcessPool.run_pickled` (once, e.g. at ``add_task``).

    Raises ``TypeError`` naming the offending part when the function or an argument cannot
    be pickled (see :func:`check_picklable`)."""
    if not callable(func):
        raise TypeError(f"a task must be callable, got {_describe(func)}")
    args = tuple(args)
    kwargs = dict(kwargs or {})
    try:
        return pickle.dumps((func, args, kwargs), protocol=_PROTOCOL)
    except Exception as exc:  # noqa: BLE001
        raise _unpicklable_error(func, args, kwargs, exc) from exc


def check_picklable(func: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    """Raise ``TypeError`` naming the offending argument when ``func``, ``args`` or ``kwargs``
    cannot be pickled, e.g. ``argument 2 (a lambda) cannot be pickled (...): process-isolated
    tasks need picklable functions, arguments and results; define the function at module
    level``. Positional arguments are numbered from 1, ``func`` not counted.

    This pickles everything once; to avoid pickling twice, call :func:`pickle_task` and pass
    its bytes to :meth:`ProcessPool.run_pickled` instead.
    """
    pickle_task(func, args, kwargs)


# ----------------------------------------------------------------------------- errors

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


# ----------------------------------------------------------------------------- the child

def _address_space_bytes() -> int:
    """This process's mapped address space (what RLIMIT_AS counts)."""
    fd = os.open("/proc/self/statm", os.O_RDONLY)
    try:
        return int(os.read(fd, 64).split()[0]) * os.sysconf("SC_PAGE_SIZE")
    finally:
        os.close(fd)


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
        "stage": stage,         # "load" (unpickling the task), "call", "result" (pickling the value)
        "type": _type_name(exc),
        "text": _safe_text(exc),
        "traceback": tb,
        "exc": exc_bytes,
        "problem": problem,
        "memory": memory,
        "pid": os.getpid(),
    }
    return _ERROR + pickle.dumps(info, protocol=_PROTOCOL)


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
    for mod, name in ((_thread, "start_new_thread"), (_thread, "start_joinable_thread"),
                      (threading, "_start_new_thread"), (threading, "_start_joinable_thread")):
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
        func, args, kwargs = pickle.loads(memoryview(message)[_HEADER.size:])  # noqa: S301 - from the parent over a private pipe
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


# ----------------------------------------------------------------------------- the parent

class _Child:
    __slots__ = ("process", "conn", "crash_r", "pid", "tasks", "reaped", "pidfd", "death", "leader")

    def __init__(self, process: Any, conn: Any, crash_r: Any, pidfd: int | None) -> None:
        self.process = process
        self.conn = conn
        self.crash_r = crash_r
        self.pid: int = process.pid
        self.tasks = 0
        self.reaped = False  # set under _MP_LOCK once the process is joined and closed
        self.leader = False  # it leads a process group of its own (set once it has started)
        # A pidfd (Linux) is readable exactly when the process has exited, whoever its parent
        # is: a dead forkserver does not make a live child look dead (the forkserver's
        # sentinel reports EOF then), and signals through it never reach a reused pid.
        self.pidfd = pidfd
        self.death: Any = pidfd if pidfd is not None else process.sentinel

    def dead(self) -> bool:
        return bool(mp_connection.wait([self.death], 0))


def _pidfd_open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)  # type: ignore[attr-defined]
    except (AttributeError, OSError):  # not Linux >= 5.3
        return None


_FORKSERVER_INIT = f"{__package__}._forkserver_init"


def _forkserver_preload() -> None:
    """Have the forkserver import _forkserver_init (it then ignores SIGTERM), besides what the
    application preloads. Takes effect when the forkserver starts: not for one already
    running (the application started it first), which then dies on a SIGTERM; the pool's
    children are not affected either way (they know their own deaths through pidfds)."""
    from multiprocessing import forkserver

    mods = list(getattr(forkserver._forkserver, "_preload_modules", None) or [])
    if _FORKSERVER_INIT not in mods:
        forkserver.set_forkserver_preload(mods + [_FORKSERVER_INIT])


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
            ProcessPool._kill(child)  # the waiting caller sees the death and raises TaskCancelled
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
    from ._engine import TaskCancelled

    if pid is None:
        return TaskCancelled("the process-isolated task was cancelled before it started")
    return TaskCancelled(f"the process-isolated task was cancelled while it ran: its child process (pid {pid}) "
                         "and the child's process group were killed")


class IsolatedCall:
    """What the engine queues for a process-isolated task (``engine._isolate``): calling it
    runs the pickled task in the pool (blocking the worker thread); ``cancel()``, which
    ``TaskResult.cancel()`` of the running task calls, kills it (the task ends CANCELLED)."""

    def __init__(self, pool: "ProcessPool", payload: bytes, name: str, timeout_s: float | None,
                 memory_limit_mb: float | None) -> None:
        self._pool = pool
        self._payload = payload
        self._timeout_s = timeout_s
        self._memory_limit_mb = memory_limit_mb
        self._token = CancelToken()
        self.__qualname__ = name  # what the monitor's failure list shows

    def __call__(self) -> Any:
        return self._pool.run_pickled(self._payload, timeout_s=self._timeout_s,
                                      memory_limit_mb=self._memory_limit_mb, cancel=self._token)

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


def _wait_exit_without_pidfd(child: _Child) -> None:
    """After SIGKILL to a child whose death no pidfd reports: wait (at most _REAP_WAIT_S) until
    its end of the task pipe closes, i.e. it has exited. Its sentinel says nothing here: the
    forkserver's EOF looks the same when the forkserver died and the child lives on. (A late
    reply on the pipe is dropped.)"""
    deadline = time.monotonic() + _REAP_WAIT_S
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            if mp_connection.wait([child.conn], remaining):
                child.conn.recv_bytes()
        except (EOFError, OSError):
            return


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
        self._all_done = threading.Condition(self._lock)    # no caller inside run() any more
        self._idle: list[_Child] = []   # LIFO: the most recently used child runs the next task
        self._busy: set[_Child] = set()
        self._slots = 0                 # children alive or being started (<= size)
        self._inflight = 0              # callers inside run()
        self._closing = False           # shutdown() called: new run() calls are refused
        self._terminating = False       # running tasks are being killed, waiting callers refused
        self._forked = False            # this is a copy of the pool in an os.fork() child
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
            raise WorkerLost("the task could not be handed to a child process: three children in a row died before it started")
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
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        crash_r, crash_w = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=_child_main,
            args=(child_end, crash_w),
            name=f"{self._name}-{next(self._ids)}",
            daemon=False,
        )
        try:
            try:
                with _MP_LOCK:
                    process.start()
                    pidfd = _pidfd_open(process.pid)  # before anything reaps it (it cannot exit yet: it waits for us)
            finally:
                # the child has its own copies now; ours would hide its EOF from us
                child_end.close()
                crash_w.close()
        except BaseException:
            parent_end.close()
            crash_r.close()
            raise
        os.set_blocking(crash_r.fileno(), False)
        child = _Child(process, parent_end, crash_r, pidfd)
        with self._lock:
            self._started += 1
        # Handshake: the child is ready once it has imported everything, so a task's timeout
        # never includes a start-up, and a child that cannot start says so here.
        try:
            ready = mp_connection.wait([parent_end, child.death], self._start_timeout)
            hello = parent_end.recv_bytes() if parent_end in ready else None
        except (EOFError, OSError):
            hello = None
        except BaseException:
            self._end_children([child], kill=True)
            raise
        if hello == _READY:
            child.leader = True  # it called setpgid before saying so
            return child
        timed_out = not ready
        exitcode, crash_text = self._end_children([child], kill=True)[0]
        if timed_out:
            raise WorkerLost(
                f"a new child process (pid {child.pid}) did not start within {self._start_timeout:g} s "
                "(does the main module run its program at import? guard it with "
                "'if __name__ == \"__main__\":')",
                pid=child.pid,
                exitcode=exitcode,
            )
        msg = (
            f"a new child process (pid {child.pid}) failed to start: {_exit_description(exitcode)} "
            "(its stderr has the details: often the main module or a task's module failing to import)"
        )
        if crash_text:
            msg += "\n" + crash_text
        raise WorkerLost(msg, pid=child.pid, exitcode=exitcode)

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
            return self._end_children([child], kill=kill)[0]
        finally:
            with self._lock:
                self._busy.discard(child)
                self._slots -= 1
                self._child_free.notify()

    def _end_children(self, children: list[_Child], *, kill: bool) -> list[tuple[int | None, str]]:
        """Stop children and reap them. ``kill``: SIGKILL now; otherwise close their pipe (an
        idle child exits on EOF) and SIGKILL only those still alive after a grace period."""
        if kill:
            for child in children:
                self._kill(child)
            for child in children:
                if child.pidfd is None:
                    _wait_exit_without_pidfd(child)
        for child in children:
            try:
                child.conn.close()
            except OSError:
                pass
        if not kill:
            deadline = time.monotonic() + _RETIRE_GRACE_S
            pending = {child.death: child for child in children}
            while pending:
                remaining = deadline - time.monotonic()
                ready = mp_connection.wait(list(pending), max(0.0, remaining)) if remaining > 0 else []
                if not ready:
                    for child in pending.values():
                        self._kill(child)
                    break
                for death in ready:
                    pending.pop(death, None)
        results = []
        for child in children:
            exitcode = None
            process = child.process
            if mp_connection.wait([child.death], _REAP_WAIT_S):
                with _MP_LOCK:
                    process.join(1.0)
                    exitcode = process.exitcode
                    if exitcode is not None or child.pidfd is not None:
                        child.reaped = True
                        if child.pidfd is not None:
                            os.close(child.pidfd)
                            child.pidfd = None
                    if exitcode is not None:
                        try:
                            process.close()
                        except ValueError:
                            pass
            crash_text = _read_crash_text(child.crash_r)
            try:
                child.crash_r.close()
            except OSError:
                pass
            results.append((exitcode, crash_text))
        return results

    @staticmethod
    def _kill(child: _Child) -> None:
        """SIGKILL a child and its process group (the task's own subprocesses).

        Never signal anything once the child is reaped here (reaping happens under _MP_LOCK
        too), nor a child whose exit is already known (its pid may be reused). Its group is
        signalled even then, if it leads one (it started): a child that crashed leaves the
        task's subprocesses in its group, and an id in use as a process group (or by the
        unreaped child) is never given to a new process; only an empty group's id may be,
        once the pid counter has wrapped around, and then killpg finds no such group."""
        with _MP_LOCK:
            if child.reaped:
                return
            try:
                dead = child.dead()
                if child.leader or not dead:
                    try:
                        os.killpg(child.pid, signal.SIGKILL)
                    except OSError:  # no such group: still starting, or every member is gone
                        pass
                if not dead:
                    if child.pidfd is not None:
                        signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)  # type: ignore[attr-defined]
                    else:
                        child.process.kill()
            except (OSError, ValueError):
                pass

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

    def _outcome(self, child: _Child, timeout_s: float | None, memory_limit_mb: float | None,
                 cancel: CancelToken | None = None) -> Any:
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
            self._kill(child)  # their callers see the death, reap the child and raise
        with self._lock:
            # callers leave promptly once their child is dead; bound the wait all the same
            deadline = time.monotonic() + 30.0
            while self._inflight and time.monotonic() < deadline:
                self._all_done.wait(max(0.0, deadline - time.monotonic()))
            idle, self._idle = self._idle, []
        if idle:
            try:
                self._end_children(idle, kill=False)
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
        exc = TypeError(
            f"the task's result cannot be pickled ({info['type']}: {info['text']}): {_NEED}"
        )
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


# ----------------------------------------------------------------------------- process hooks

def _shutdown_all_at_exit() -> None:
    # This module is imported on first use, after engine.py registered its exit hook, so this
    # hook runs first: the engines drain here (their queued process tasks need the pools),
    # then the pools stop. engine's own hook then finds them shut down.
    engine = sys.modules.get(f"{__package__}.engine")
    if engine is not None:
        engine._shutdown_all()
    for pool in list(_POOLS):
        try:
            pool.shutdown(wait=False)
        except Exception:  # noqa: BLE001, S110 - exiting anyway
            pass


def _after_fork_in_child() -> None:
    global _MP_LOCK
    _MP_LOCK = threading.Lock()  # another thread may have held it at fork time
    for pool in list(_POOLS):
        pool._forget_after_fork()


# Registered after multiprocessing's own exit hook, so it runs before it: our children are
# gone by the time multiprocessing joins its non-daemonic children.
atexit.register(_shutdown_all_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)
