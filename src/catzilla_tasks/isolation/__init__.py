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
  shutdown, the parent's death) or its own death (a crash) kills its group, so a task's
  subprocesses go with it. Callers waiting for a free child wait
  on a ``threading.Condition``. Nothing polls or sleeps.

The package, by concern:

* ``_pool``: :class:`ProcessPool` (children handed out to callers, timeouts, shutdown),
  :class:`IsolatedCall` and :class:`CancelToken`;
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
from ._in_child import in_pool_child
from ._pickling import check_picklable, pickle_task
from ._pool import CancelToken, IsolatedCall, ProcessPool
from ._pool import (
    _Deadline as _Deadline,  # what ProcessPool._receive raises (tests force it)
)
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
