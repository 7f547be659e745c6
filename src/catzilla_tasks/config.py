"""Task priorities, statuses and configuration (TaskConfig)."""

from __future__ import annotations

import enum
import numbers
from typing import Any, Literal

from . import _engine

__all__ = ["TaskPriority", "TaskStatus", "TaskConfig", "RetryBackoff"]

RetryBackoff = Literal["exponential", "linear", "fixed"]
_BACKOFFS = ("exponential", "linear", "fixed")


class TaskPriority(enum.IntEnum):
    """Queue a task joins. Workers serve CRITICAL first, then HIGH, NORMAL, LOW (with ageing:
    a lower queue that has waited unserved for ``aging_ms`` is served once ahead of the others)."""

    CRITICAL = 0  # real-time work
    HIGH = 1      # user-facing work
    NORMAL = 2    # background processing
    LOW = 3       # clean-up and maintenance


class TaskStatus(enum.Enum):
    """Where a task is in its life. The last four are final."""

    PENDING = 0
    SCHEDULED = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5
    TIMED_OUT = 6

    @property
    def is_final(self) -> bool:
        return self.value >= TaskStatus.SUCCEEDED.value


def _priority(value: Any) -> TaskPriority:
    if isinstance(value, TaskPriority):
        return value
    if isinstance(value, str):
        try:
            return TaskPriority[value.upper()]
        except KeyError:
            pass
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        try:
            return TaskPriority(int(value))
        except ValueError:
            pass
    raise ValueError(
        f"priority: unknown priority {value!r}; use TaskPriority.CRITICAL, HIGH, NORMAL or LOW "
        "(or their values 0-3)"
    )


def _non_negative(field: str, value: Any, *, allow_none: bool = False, positive: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{field}: expected a number, got {type(value).__name__} {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{field}: must be > 0, got {value!r}" + (" (or None for no limit)" if allow_none else ""))
    if value < 0:
        raise ValueError(f"{field}: must be >= 0, got {value!r}")
    return value


class TaskConfig(_engine.ConfigBase):
    """How a task runs: its priority and its scheduling options.

    ``delay_ms``, ``max_retries`` and ``timeout_ms`` are validated here; in this version the
    engine refuses a task that sets them (delays, retries and timeouts are scheduled by the
    engine's timer, which is not built yet; see docs/architecture.md). ``memory_limit_mb`` is
    recorded for process isolation and is not enforced for tasks running in threads.
    """

    __slots__ = ("retry_backoff", "memory_limit_mb")

    def __init__(
        self,
        priority: TaskPriority | int | str = TaskPriority.NORMAL,
        delay_ms: float = 0,
        max_retries: int = 0,
        timeout_ms: float | None = None,
        retry_backoff: RetryBackoff = "exponential",
        memory_limit_mb: float | None = None,
    ) -> None:
        prio = _priority(priority)
        delay = _non_negative("delay_ms", delay_ms)
        if isinstance(max_retries, bool) or not isinstance(max_retries, numbers.Integral) or max_retries < 0:
            raise ValueError(f"max_retries: must be an integer >= 0, got {max_retries!r}")
        timeout = _non_negative("timeout_ms", timeout_ms, allow_none=True, positive=True)
        if retry_backoff not in _BACKOFFS:
            raise ValueError(f"retry_backoff: must be one of {', '.join(map(repr, _BACKOFFS))}, got {retry_backoff!r}")
        self.memory_limit_mb = _non_negative("memory_limit_mb", memory_limit_mb, allow_none=True, positive=True)
        self.retry_backoff = retry_backoff
        super().__init__(int(prio), int(round(delay)), int(max_retries), int(round(timeout or 0)))

    @property
    def priority(self) -> TaskPriority:
        return TaskPriority(self._priority)

    @property
    def delay_ms(self) -> int:
        return self._delay_ms

    @property
    def max_retries(self) -> int:
        return self._max_retries

    @property
    def timeout_ms(self) -> int | None:
        return self._timeout_ms or None

    def as_dict(self) -> dict[str, Any]:
        return {
            "priority": self.priority,
            "delay_ms": self.delay_ms,
            "max_retries": self.max_retries,
            "timeout_ms": self.timeout_ms,
            "retry_backoff": self.retry_backoff,
            "memory_limit_mb": self.memory_limit_mb,
        }

    def replace(self, **changes: Any) -> "TaskConfig":
        """A copy with some fields changed (validated like the constructor)."""
        fields = self.as_dict()
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"unknown TaskConfig field(s): {', '.join(sorted(unknown))}; known: {', '.join(fields)}")
        fields.update(changes)
        return TaskConfig(**fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskConfig) and self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.as_dict().items()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items())
        return f"TaskConfig({inner})"
