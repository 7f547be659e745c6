"""catzilla_tasks: a background task engine for Python with a C core.

Layers: the C extension ``_engine`` (task nodes, four priority queues, native worker threads,
results) is wrapped by ``engine`` (BackgroundTasks), ``config`` (TaskPriority, TaskStatus,
TaskConfig) and ``results`` (TaskResult, TaskFuture) and ``workflows`` (TaskChain, workflow, chain, group,
chord). This module is the whole public API.
"""

from typing import Any

# installs the C engine's hooks into the Python side, once (see _hooks.py)
from . import _hooks as _hooks
from .config import TaskConfig as TaskConfig
from .config import TaskPriority as TaskPriority
from .config import TaskStatus as TaskStatus
from .engine import BackgroundTasks as BackgroundTasks
from .engine import current_task as current_task
from .engine import task as task
from .errors import CatzillaTasksError as CatzillaTasksError
from .errors import CompileError as CompileError
from .errors import MemoryLimitExceeded as MemoryLimitExceeded
from .errors import QueueFull as QueueFull
from .errors import ShutdownTimeout as ShutdownTimeout
from .errors import TaskCancelled as TaskCancelled
from .errors import TaskTimeout as TaskTimeout
from .errors import WorkerLost as WorkerLost
from .errors import WorkflowError as WorkflowError
from .results import TaskFuture as TaskFuture
from .results import TaskResult as TaskResult

# Loaded on first use (module __getattr__ below): a process that only runs tasks, such as a
# distributed worker, never pays for the workflow builder or the compiler's module.
_LAZY = {
    "TaskChain": "workflows",
    "call": "workflows",
    "chain": "workflows",
    "chord": "workflows",
    "group": "workflows",
    "result_of": "workflows",
    "results_of": "workflows",
    "workflow": "workflows",
    "TaskMonitor": "monitor",
    "AutoScaler": "monitor",
}

__version__ = "0.1.0"

__all__ = [
    "BackgroundTasks",
    "CatzillaTasksError",
    "QueueFull",
    "ShutdownTimeout",
    "TaskCancelled",
    "TaskConfig",
    "TaskFuture",
    "TaskPriority",
    "TaskResult",
    "TaskStatus",
    "TaskTimeout",
    "MemoryLimitExceeded",
    "WorkerLost",
    "current_task",
    "task",
    "TaskChain",
    "WorkflowError",
    "call",
    "chain",
    "chord",
    "group",
    "result_of",
    "results_of",
    "workflow",
    "CompileError",
    "TaskMonitor",
    "AutoScaler",
]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'catzilla_tasks' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value  # later lookups are plain module attributes
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
