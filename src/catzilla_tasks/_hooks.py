"""The Python side's hooks into the C engine, installed once, all together.

The C bindings call back into Python for a few things: running a coroutine on the event loop,
logging an error, a handle's ``await``, cancelling an async task, running a task in a child
process, recording a failure, the enum members they hand out, why a task ran as Python, routing
a call with limits or a named queue (limits.py), making a progress report (progress.py) and
submitting a task with OpenTelemetry tracing (see tracing.py).
They live in ``_engine``'s module state (one struct, ``py_hooks``: see py_internal.h) and are
set here, by one call, when the package is imported (``catzilla_tasks/__init__.py`` imports this
module). ``_engine._install_hooks`` refuses a missing, unknown or ill-typed hook, and no engine
starts before they are installed.
"""

from __future__ import annotations

import sys
from typing import Any

from . import _engine
from .config import TaskPriority, TaskStatus
from .engine import (
    _cancel_async,
    _failed,
    _isolate,
    _report_error,
    _run_coroutine,
    make_progress_hook,
    route_hook,
    trace_submit_hook,
)
from .errors import TaskTimeout
from .results import await_impl


def _native_reason(func: Any, ran_native: bool) -> str | None:
    """TaskResult.get_stats()["compile_reason"]: why the task ran as Python, or None. Only the
    compiler knows, and it is imported on first use: a process that never loaded it compiled
    nothing, and has no reason to give."""
    native = sys.modules.get(f"{__package__}.compiler.native")
    if native is None:
        return None
    reason: str | None = native._task_reason(func, ran_native)
    return reason


_engine._install_hooks(
    status_members=tuple(TaskStatus),
    priority_members=tuple(TaskPriority),
    run_coroutine=_run_coroutine,
    report_error=_report_error,
    await_impl=await_impl,
    cancel_async=_cancel_async,
    task_timeout=TaskTimeout,
    isolate=_isolate,
    failed=_failed,
    native_reason=_native_reason,
    route=route_hook,
    make_progress=make_progress_hook,
    trace_submit=trace_submit_hook,
)
