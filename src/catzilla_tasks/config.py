"""Task priorities, statuses and configuration (TaskConfig)."""

from __future__ import annotations

import enum
import numbers
import re
from typing import Any, Literal

from . import _engine

__all__ = ["TaskPriority", "TaskStatus", "TaskConfig", "RetryBackoff"]

RetryBackoff = Literal["exponential", "linear", "fixed"]
_BACKOFFS = ("exponential", "linear", "fixed")


class TaskPriority(enum.IntEnum):
    """Queue a task joins. Workers serve CRITICAL first, then HIGH, NORMAL, LOW (with ageing:
    a lower queue that has waited unserved for ``aging_ms`` is served once ahead of the others)."""

    CRITICAL = 0  # real-time work
    HIGH = 1  # user-facing work
    NORMAL = 2  # background processing
    LOW = 3  # clean-up and maintenance


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
        f"priority: unknown priority {value!r}; use TaskPriority.CRITICAL, HIGH, NORMAL or LOW (or their values 0-3)"
    )


# The longest time in ms any option can name: the engine's one bound (CT_MAX_TIME_NS, 100
# years), so now + any time never overflows its int64 nanoseconds.
MAX_MS = _engine.MAX_TIME_NS // 1_000_000


def _non_negative(field: str, value: Any, *, allow_none: bool = False, positive: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{field}: expected a number, got {type(value).__name__} {value!r}")
    if value != value:  # noqa: PLR0124  NaN, of any Real type (float, numpy, Decimal); math.isnan overflows on huge ints
        raise ValueError(f"{field}: expected a number, got NaN")
    if positive and value <= 0:
        raise ValueError(f"{field}: must be > 0, got {value!r}" + (" (or None for no limit)" if allow_none else ""))
    if value < 0:
        raise ValueError(f"{field}: must be >= 0, got {value!r}")
    return value


def _time_ms(field: str, value: Any, *, allow_none: bool = False, positive: bool = False, limit: bool = False) -> Any:
    """A time in ms the engine can hold (one rule for every entry point): NaN is refused; for a
    *limit* (a timeout, a back-off's cap) infinity or anything past MAX_MS (100 years) means "no
    limit" (None where None is allowed, else MAX_MS); for a *delay* it is refused with a clear
    error (a task delayed past the engine's horizon would only hold its room in the queue)."""
    value = _non_negative(field, value, allow_none=allow_none, positive=positive)
    if value is not None and value > MAX_MS:
        if limit:
            return None if allow_none else MAX_MS
        if value == float("inf"):
            raise ValueError(f"{field}: must be finite (at most {MAX_MS} ms, 100 years), got inf")
        raise ValueError(
            f"{field}: {value!r:.40} ms is past the longest time the engine can hold ({MAX_MS} ms, 100 years)"
        )
    return value


Isolation = Literal["thread", "process"]
_ISOLATIONS = ("thread", "process")


def _exception_kinds(value: Any) -> tuple[type[BaseException], ...]:
    kinds = value if isinstance(value, tuple) else (value,)
    if not kinds or not all(isinstance(k, type) and issubclass(k, BaseException) for k in kinds):
        raise ValueError(f"retry_on: expected an exception class or a tuple of them, got {value!r}")
    return kinds


def _hook(field: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise ValueError(f"{field}: expected a callable or None, got {type(value).__name__} {value!r}")
    return value


QUEUE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# the second part of the Redis broker's keys that are not a queue's (P:r:<task id>, P:cluster:...,
# see brokers/redis.py): a queue of one of these names would share its keys with them, so no
# queue (in-process or on Redis) takes one
RESERVED_QUEUE_NAMES = ("r", "done", "claim", "wf", "idem", "p", "rl", "cc", "cluster", "cancel", "cancelled")


def reserved_queue_error(what: str, name: str) -> ValueError:
    """The error for a queue named after a kind of key (``RESERVED_QUEUE_NAMES``)."""
    return ValueError(
        f"{what}: {name!r} is reserved (the Redis broker names other keys under its prefix with "
        f"{', '.join(RESERVED_QUEUE_NAMES)}); choose another queue name"
    )


_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*(s|sec|second|m|min|minute|h|hour)\s*", re.ASCII)
_SLOWEST_INTERVAL = 86400.0  # s between two slots of the slowest rate limit taken (one a day)
_PERIODS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}


def parse_rate(value: Any) -> tuple[float, float] | None:
    """``"100/s"``, ``"30/m"``, ``"1000/h"`` (also ``"5/10s"``) as (tasks, per seconds); None: none."""
    if value is None:
        return None
    m = _RATE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"rate_limit: expected 'N/s', 'N/m' or 'N/h' (e.g. '100/s'), got {value!r}")
    count = float(m.group(1))
    period = float(m.group(2) or 1) * _PERIODS[m.group(3)]
    if not count > 0 or not period > 0 or count / period > 1e6:
        raise ValueError(f"rate_limit: must be > 0 and at most 1000000 tasks a second, got {value!r}")
    if not period / count <= _SLOWEST_INTERVAL:  # (an infinite period too)
        # one slot every century would push each call's wait past what the engine's timer holds
        raise ValueError(f"rate_limit: must be at least one task a day ('1/24h'), got {value!r:.80}")
    return count, period


class TaskConfig(_engine.ConfigBase):
    """How a task runs: priority, delay, retries with back-off, timeout, isolation, hooks.

    * ``delay_ms``: wait this long in the engine's timer before the task is queued (at most
      100 years: a longer delay, or an infinite one, is refused).
    * ``max_retries``: further attempts after a failure whose exception matches ``retry_on``
      (default: any ``Exception``); 0 (the default) means no retry, because re-running work
      that is not idempotent must be a decision, not a default.
    * ``retry_backoff``: ``"exponential"`` (``retry_base_ms * 2**(attempt-1)``), ``"linear"``
      (``retry_base_ms * attempt``) or ``"fixed"`` (``retry_base_ms``), capped at
      ``retry_max_ms``; ``retry_jitter`` draws the wait uniformly in ``[0, backoff)`` ("full
      jitter"), on by default for exponential back-off only.
    * ``timeout_ms``: a thread task gets ``TaskTimeout`` raised inside it, an async task is
      cancelled, a process task's child is killed; the task ends TIMED_OUT (retried only with
      ``retry_on_timeout=True``). ``None``, ``inf`` or more than 100 years: no limit.
      NaN is refused for every time.
    * ``isolation="process"``: run in the engine's pool of child processes (hard timeouts,
      ``memory_limit_mb``, crashes contained). ``memory_limit_mb`` cannot be enforced for a
      task in a thread (threads share one address space), so it requires process isolation.
    * ``rate_limit`` (``"N/s"``, ``"N/m"``, ``"N/h"``, ``"N/10s"``): at most N starts per period
      per task name (or per ``rate_limit_key(*args, **kwargs)``, a str); ``concurrency_limit``:
      at most N running at once. A call over a limit waits (holding no worker) and is never
      dropped: per engine in-process (limits.py), cluster-wide on Redis (brokers/ratelimit.py).
    * ``queue``: a named queue (a bulkhead of ``BackgroundTasks(queues=...)`` in-process, its own
      streams on Redis); None or ``"default"``: the default one.
    * ``on_success(value)``, ``on_failure(exc)``, ``on_retry(attempt)``: called in the worker
      once the task's call has returned; ``timeout_ms`` does not cover them (they have no time
      limit of their own and hold the worker while they run: keep them short).
    """

    __slots__ = (
        "retry_backoff",
        "memory_limit_mb",
        "retry_on",
        "retry_jitter",
        "isolation",
        "_hooks",
        "_retry_ms",
        "rate_limit",
        "concurrency_limit",
        "rate_limit_key",
        "queue",
        "_rate",
        "_plain",
    )

    retry_backoff: RetryBackoff
    memory_limit_mb: float | None
    retry_on: tuple[type[BaseException], ...]
    retry_jitter: bool | None  # as given (None: on for exponential back-off only)
    isolation: Isolation
    _hooks: tuple[Any, Any, Any]  # (on_success, on_failure, on_retry)
    _retry_ms: tuple[float, float, bool]  # (retry_base_ms, retry_max_ms, retry_on_timeout)
    rate_limit: str | None
    concurrency_limit: int | None
    rate_limit_key: Any
    queue: str | None
    _rate: tuple[float, float] | None  # (tasks, per seconds) of rate_limit
    _plain: TaskConfig | None  # this config without limits and queue (what limits.py submits)

    def __init__(
        self,
        priority: TaskPriority | int | str = TaskPriority.NORMAL,
        delay_ms: float = 0,
        max_retries: int = 0,
        timeout_ms: float | None = None,
        retry_backoff: RetryBackoff = "exponential",
        memory_limit_mb: float | None = None,
        *,
        retry_base_ms: float = 100,
        retry_max_ms: float = 60_000,
        retry_jitter: bool | None = None,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        retry_on_timeout: bool = False,
        isolation: Isolation = "thread",
        on_success: Any = None,
        on_failure: Any = None,
        on_retry: Any = None,
        rate_limit: str | None = None,
        concurrency_limit: int | None = None,
        rate_limit_key: Any = None,
        queue: str | None = None,
    ) -> None:
        prio = _priority(priority)
        rate = parse_rate(rate_limit)
        if concurrency_limit is not None and (
            isinstance(concurrency_limit, bool)
            or not isinstance(concurrency_limit, numbers.Integral)
            or not 1 <= concurrency_limit <= 1_000_000
        ):
            raise ValueError(
                f"concurrency_limit: must be an integer from 1 to 1000000 or None, got {concurrency_limit!r}"
            )
        if rate_limit_key is not None:
            if not callable(rate_limit_key):
                raise ValueError(
                    f"rate_limit_key: expected a callable(*args, **kwargs) -> str, got {type(rate_limit_key).__name__}"
                )
            if rate is None and concurrency_limit is None:
                raise ValueError("rate_limit_key: needs a rate_limit or a concurrency_limit to key")
        if queue is not None and (not isinstance(queue, str) or not QUEUE_NAME.fullmatch(queue)):
            raise ValueError(f"queue: expected a name of letters, digits, '_', '-' and '.' (at most 64), got {queue!r}")
        if queue in RESERVED_QUEUE_NAMES:
            raise reserved_queue_error("queue", queue)
        delay = _time_ms("delay_ms", delay_ms)
        if (
            isinstance(max_retries, bool)
            or not isinstance(max_retries, numbers.Integral)
            or not 0 <= max_retries <= 200
        ):
            raise ValueError(f"max_retries: must be an integer from 0 to 200, got {max_retries!r}")
        timeout = _time_ms("timeout_ms", timeout_ms, allow_none=True, positive=True, limit=True)
        if retry_backoff not in _BACKOFFS:
            raise ValueError(f"retry_backoff: must be one of {', '.join(map(repr, _BACKOFFS))}, got {retry_backoff!r}")
        base = _time_ms("retry_base_ms", retry_base_ms)
        cap = _time_ms("retry_max_ms", retry_max_ms, limit=True)
        if cap < base:
            raise ValueError(f"retry_max_ms: must be >= retry_base_ms ({base}), got {cap!r}")
        if retry_jitter is not None and not isinstance(retry_jitter, bool):
            raise ValueError(f"retry_jitter: expected True, False or None, got {retry_jitter!r}")
        jitter = (retry_backoff == "exponential") if retry_jitter is None else retry_jitter
        kinds = _exception_kinds(retry_on)
        if isolation not in _ISOLATIONS:
            raise ValueError(f"isolation: must be 'thread' or 'process', got {isolation!r}")
        limit = _non_negative("memory_limit_mb", memory_limit_mb, allow_none=True, positive=True)
        if limit is not None and isolation != "process":
            raise ValueError(
                "memory_limit_mb: a task running in a thread shares the process's memory, so no limit can be "
                "enforced for it; use isolation='process' to run it in a child process with that limit"
            )
        self.memory_limit_mb = limit
        self.retry_backoff = retry_backoff
        self.retry_on = kinds
        self.retry_jitter = retry_jitter
        self.isolation = isolation
        self._hooks = (_hook("on_success", on_success), _hook("on_failure", on_failure), _hook("on_retry", on_retry))
        self._retry_ms = (base, cap, bool(retry_on_timeout))
        self.rate_limit = rate_limit if rate is not None else None
        self.concurrency_limit = None if concurrency_limit is None else int(concurrency_limit)
        self.rate_limit_key = rate_limit_key
        self.queue = queue
        self._rate = rate
        routed = rate is not None or concurrency_limit is not None or (queue is not None and queue != "default")
        self._plain = None
        super().__init__(
            priority=int(prio),
            delay_ms=float(delay),
            max_retries=int(max_retries),
            timeout_ms=float(timeout or 0),
            backoff=_BACKOFFS.index(retry_backoff),
            retry_base_ms=float(base),
            retry_max_ms=float(cap),
            jitter=jitter,
            retry_on_timeout=bool(retry_on_timeout),
            retry_on=kinds,
            on_success=on_success,
            on_failure=on_failure,
            on_retry=on_retry,
            isolation=isolation == "process",
            routed=routed,
        )
        if routed:  # what limits.py submits once a task is admitted: the same config, unrouted
            self._plain = self.replace(rate_limit=None, concurrency_limit=None, rate_limit_key=None, queue=None)

    @property
    def priority(self) -> TaskPriority:
        return TaskPriority(self._priority)

    @property
    def delay_ms(self) -> float:
        return self._delay_ns / 1e6

    @property
    def max_retries(self) -> int:
        return self._max_retries

    @property
    def timeout_ms(self) -> float | None:
        return self._timeout_ns / 1e6 or None

    @property
    def retry_base_ms(self) -> float:
        return self._retry_ms[0]

    @property
    def retry_max_ms(self) -> float:
        return self._retry_ms[1]

    @property
    def retry_on_timeout(self) -> bool:
        return self._retry_ms[2]

    def as_dict(self) -> dict[str, Any]:
        base, cap, on_timeout = self._retry_ms
        on_success, on_failure, on_retry = self._hooks
        return {
            "priority": self.priority,
            "delay_ms": self.delay_ms,
            "max_retries": self.max_retries,
            "timeout_ms": self.timeout_ms,
            "retry_backoff": self.retry_backoff,
            "memory_limit_mb": self.memory_limit_mb,
            "retry_base_ms": base,
            "retry_max_ms": cap,
            "retry_jitter": self.retry_jitter,
            "retry_on": self.retry_on,
            "retry_on_timeout": on_timeout,
            "isolation": self.isolation,
            "on_success": on_success,
            "on_failure": on_failure,
            "on_retry": on_retry,
            "rate_limit": self.rate_limit,
            "concurrency_limit": self.concurrency_limit,
            "rate_limit_key": self.rate_limit_key,
            "queue": self.queue,
        }

    def replace(self, **changes: Any) -> TaskConfig:
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
        return hash(tuple((k, v) for k, v in self.as_dict().items()))

    def __repr__(self) -> str:
        defaults = _defaults()
        inner = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items() if k == "priority" or v != defaults.get(k))
        return f"TaskConfig({inner})"


_DEFAULTS: dict[str, Any] | None = None


def _defaults() -> dict[str, Any]:
    global _DEFAULTS
    if _DEFAULTS is None:
        _DEFAULTS = TaskConfig().as_dict()
    return _DEFAULTS
