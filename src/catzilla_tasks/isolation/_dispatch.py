"""What becomes of a task sent to a child: waiting for its reply (``poll(2)`` on the pipe and the
child's pidfd, with the hard deadline) and turning it into the task's value or error, giving
the child back or discarding it (a timeout, a death, a memory limit hit, a cancel)."""

from __future__ import annotations

import multiprocessing.connection as mp_connection
import pickle
import time
from typing import Any

from ..errors import TaskTimeout
from ._cancel import CancelToken, _cancelled_error
from ._children import _Child
from ._pickling import _why
from ._slots import _ChildSlots
from ._wire import _ERROR, _VALUE, _death_error, _oom_kill_count, _rebuild_error


class _Deadline(Exception):
    """Internal: the task's hard timeout passed."""


class _ResultDispatch(_ChildSlots):
    """Waits for a child's reply and dispatches it (see the module docstring)."""

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
