"""catzilla_tasks: a background task engine for Python with a C core.

Layers: the C extension ``_engine`` (task nodes, four priority queues, native worker threads,
results) is wrapped by ``engine`` (BackgroundTasks), ``config`` (TaskPriority, TaskStatus,
TaskConfig) and ``results`` (TaskResult, TaskFuture) and ``workflows`` (TaskChain, workflow, chain, group,
chord). This module is the whole public API.
"""

from ._engine import QueueFull as QueueFull
from ._engine import TaskCancelled as TaskCancelled
from .config import TaskConfig as TaskConfig
from .config import TaskPriority as TaskPriority
from .config import TaskStatus as TaskStatus
from .errors import MemoryLimitExceeded as MemoryLimitExceeded
from .errors import TaskTimeout as TaskTimeout
from .errors import WorkerLost as WorkerLost
from .engine import BackgroundTasks as BackgroundTasks
from .engine import ShutdownTimeout as ShutdownTimeout
from .engine import current_task as current_task
from .engine import task as task
from .results import TaskFuture as TaskFuture
from .results import TaskResult as TaskResult
from .workflows import TaskChain as TaskChain
from .workflows import WorkflowError as WorkflowError
from .workflows import call as call
from .workflows import chain as chain
from .workflows import chord as chord
from .workflows import group as group
from .workflows import result_of as result_of
from .workflows import results_of as results_of
from .workflows import workflow as workflow
from .compiler import CompileError as CompileError

__version__ = "0.1.0"

__all__ = [
    "BackgroundTasks",
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
]
