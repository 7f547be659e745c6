"""Progress of a running task: ``current_task().set_progress(fraction, message=None)`` inside
it, ``result.progress`` anywhere (a :class:`Progress`, or None before the first report).

In-process the last report is kept by the C engine under the task's id for as long as the task's
record lives (a handle to it, or the task queued or running). A task run by a distributed worker
also writes each report to Redis (``P:p:<task id>``, kept ``result_ttl``), where
``RemoteResult.progress`` reads it from any process.
"""

from __future__ import annotations

import numbers
import threading
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["Progress"]


class Progress(NamedTuple):
    """How far a task is: ``fraction`` from 0.0 to 1.0 and an optional ``message``."""

    fraction: float
    message: str | None = None


# distributed workers: each tells, for a task key (TaskResult._key), where that task's reports go
_resolvers: list[weakref.WeakMethod[Callable[[int], Callable[[Progress], None] | None]]] = []
_lock = threading.Lock()


def make(fraction: Any, message: Any = None) -> Progress:
    """A validated Progress (ValueError/TypeError at the caller otherwise)."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
        raise TypeError(f"set_progress(): fraction must be a number from 0 to 1, got {type(fraction).__name__}")
    f = float(fraction)
    if not 0.0 <= f <= 1.0:  # (NaN fails too)
        raise ValueError(f"set_progress(): fraction must be from 0.0 to 1.0, got {fraction!r}")
    if message is not None and not isinstance(message, str):
        raise TypeError(f"set_progress(): message must be a str or None, got {type(message).__name__}")
    if message is not None and len(message) > 4096:
        message = message[:4096]
    return Progress(f, message)


def hook(handle: Any, fraction: Any, message: Any) -> Progress:
    """The C engine's make_progress hook (TaskResult.set_progress)."""
    p = make(fraction, message)
    if _resolvers:
        key = handle._key
        for ref in list(_resolvers):
            resolve = ref()
            if resolve is None:
                with _lock:
                    if ref in _resolvers:
                        _resolvers.remove(ref)
                continue
            pub = resolve(key)
            if pub is not None:
                pub(p)
                break
    return p


def add_resolver(method: Callable[[int], Callable[[Progress], None] | None]) -> None:
    """A worker's ``method(task key)``: the publisher of that task's reports, or None (held weakly)."""
    with _lock:
        _resolvers.append(weakref.WeakMethod(method))


def from_wire(rec: Any) -> Progress | None:
    """A Progress from its stored form ``[fraction, message]`` (None if it is not one)."""
    if isinstance(rec, (list, tuple)) and len(rec) == 2:
        try:
            return make(rec[0], rec[1])
        except (TypeError, ValueError):
            return None
    return None
