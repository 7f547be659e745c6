"""Process isolation: run a task in a pool of child processes.

``TaskConfig(isolation="process")`` tasks run here. The engine calls :meth:`ProcessPool.run`
from its own worker threads; the call blocks that thread (without the GIL) until the child
answers, and returns the task's value or raises the task's own exception, ``TaskTimeout``,
``MemoryLimitExceeded``, ``WorkerLost``, ``TaskExceptionNotPicklable`` or ``TypeError``.
What each means and how the pool works (start method, memory limit, waiting, process
groups): docs/isolation.md; the design: "Process isolation" in docs/architecture.md.

The package, by concern:

* ``_pool``: :class:`ProcessPool`, the public object (validation, ``run``, ``stats``, shutdown);
* ``_slots``: its children and the callers waiting for one (take, start, give back, discard);
* ``_dispatch``: a task's reply (or the child's death, or the deadline) made a value or an error;
* ``_cancel``: :class:`CancelToken` and :class:`IsolatedCall` (what the engine queues);
* ``_children``: the parent's side of one child process (start, handshake, kill, reap);
* ``_in_child``: what runs in a child (its loop, the memory limit, signals, parent watch);
* ``_wire``: the messages between them and the errors a reply or a death becomes;
* ``_pickling``: :func:`pickle_task` / :func:`check_picklable` and their TypeError.
"""

from __future__ import annotations

from ..errors import (
    ChildTraceback,
    MemoryLimitExceeded,
    TaskExceptionNotPicklable,
    TaskTimeout,
    WorkerLost,
)
from ._cancel import CancelToken, IsolatedCall
from ._dispatch import _Deadline as _Deadline  # what ProcessPool._receive raises (tests force it)
from ._in_child import in_pool_child
from ._pickling import check_picklable, pickle_task
from ._pool import ProcessPool
from ._wire import _death_error as _death_error  # tests check its messages

__all__ = [
    "ProcessPool",
    "IsolatedCall",
    "CancelToken",
    "check_picklable",
    "in_pool_child",
    "pickle_task",
    "ChildTraceback",
    "TaskTimeout",
    "MemoryLimitExceeded",
    "WorkerLost",
    "TaskExceptionNotPicklable",
]
