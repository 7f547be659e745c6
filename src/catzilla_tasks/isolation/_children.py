"""The parent's side of a child process: start it (with a pidfd where Linux has them) and wait
for its handshake, SIGKILL it and its process group, end and reap it (with its crash report).
Every start and every reap holds ``_MP_LOCK`` (see there)."""

from __future__ import annotations

import multiprocessing.connection as mp_connection
import os
import signal
import threading
import time
from typing import Any

from ..errors import WorkerLost
from ._in_child import _child_main
from ._wire import _READY, _exit_description, _read_crash_text

_RETIRE_GRACE_S = 2.0  # an idle child told to exit (EOF) gets this long before SIGKILL
_REAP_WAIT_S = 5.0  # after SIGKILL, how long to wait for the exit status

# multiprocessing reads a forkserver child's exit status from its sentinel on the first
# poll(); two threads polling the same child at once could split that read. Every start
# (Process.start polls all children) and every reap in this module holds this lock.
_MP_LOCK = threading.Lock()


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
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux >= 5.3
        return None


# the preload module's name, catzilla_tasks._forkserver_init: it sits at the package's top, so
# the forkserver loads the package's __init__ and that module, not this pool
_FORKSERVER_INIT = f"{__package__.rpartition('.')[0]}._forkserver_init"


def _forkserver_preload() -> None:
    """Have the forkserver import _forkserver_init (it then ignores SIGTERM), besides what the
    application preloads. Takes effect when the forkserver starts: not for one already
    running (the application started it first), which then dies on a SIGTERM; the pool's
    children are not affected either way (they know their own deaths through pidfds)."""
    from multiprocessing import forkserver

    mods = list(getattr(forkserver._forkserver, "_preload_modules", None) or [])
    if _FORKSERVER_INIT not in mods:
        forkserver.set_forkserver_preload(mods + [_FORKSERVER_INIT])


def start_child(ctx: Any, name: str) -> _Child:
    """Start a child process running the pool's child loop (``_in_child._child_main``); it is
    not usable before :func:`handshake`."""
    parent_end, child_end = ctx.Pipe(duplex=True)
    crash_r, crash_w = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child_main, args=(child_end, crash_w), name=name, daemon=False)
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
    return _Child(process, parent_end, crash_r, pidfd)


def handshake(child: _Child, start_timeout: float) -> None:
    """Wait until a new child says it is ready (it has imported everything, so a task's timeout
    never includes a start-up); one that cannot start is ended and its WorkerLost raised here."""
    parent_end = child.conn
    try:
        ready = mp_connection.wait([parent_end, child.death], start_timeout)
        hello = parent_end.recv_bytes() if parent_end in ready else None
    except (EOFError, OSError):
        hello = None
    except BaseException:
        end_children([child], kill=True)
        raise
    if hello == _READY:
        child.leader = True  # it called setpgid before saying so
        return
    timed_out = not ready
    exitcode, crash_text = end_children([child], kill=True)[0]
    if timed_out:
        raise WorkerLost(
            f"a new child process (pid {child.pid}) did not start within {start_timeout:g} s "
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


def kill_child(child: _Child) -> None:
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
                    signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
                else:
                    child.process.kill()
        except (OSError, ValueError):
            pass


def end_children(children: list[_Child], *, kill: bool) -> list[tuple[int | None, str]]:
    """Stop children and reap them. ``kill``: SIGKILL now; otherwise close their pipe (an
    idle child exits on EOF) and SIGKILL only those still alive after a grace period."""
    if kill:
        for child in children:
            kill_child(child)
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
                    kill_child(child)
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


def _after_fork_in_child() -> None:
    global _MP_LOCK
    _MP_LOCK = threading.Lock()  # another thread may have held it at fork time


os.register_at_fork(after_in_child=_after_fork_in_child)
