"""The wire protocol every broker and the worker share: one module, so that no broker reads
another module's private fields.

A **message** (one queued task) is a serialized list
``[task id, task name, args, kwargs, attempts, options]``; the last two are left out when
``attempts`` is 0 and there are no options (see the ``MSG_*`` indexes). ``options`` is a dict
of the :data:`TRAVELLING` config fields a call overrode (``options(...)``), plus ``"k"``: the
idempotency key, ``"w"``: ``[run id, step index, step id, workflow name]`` of a workflow step
``"f"``: which arguments of a step are filled from the values of the steps it depends on,
``"s"``: the name of the cluster-wide schedule whose run this is, and ``"L"``: the slot (server
ms) a rate-limited task was deferred to (see ratelimit.py).

An **outcome record** (a task's result) is ``[status code, value]`` with the codes of
:data:`STATUS_CODES`; for a task that did not succeed the value is its error as
:func:`encode_error` writes it, rebuilt by :func:`decode_error`. Workers append the task's
name as a third item (what ``catzilla-tasks inspect`` shows); readers take the first two.
"""

from __future__ import annotations

from typing import Any

from ..config import TaskConfig, TaskStatus

# the errors' one home is errors.py; re-exported here as part of the wire protocol
from ..errors import RemoteTaskError, WorkflowError, decode_error, encode_error
from .serialization import Serializer

__all__ = [
    "RemoteTaskError",
    "decode_error",
    "encode_error",
    "is_workflow_error",
    "message",
    "parse_result",
    "task_name",
]

CONFIG_ATTR = "__catzilla_task__"  # the attribute @task sets (engine.CONFIG_ATTR: the same name)
DEFAULT_CONFIG = TaskConfig()

# the fields of a message, by index
MSG_ID, MSG_NAME, MSG_ARGS, MSG_KWARGS, MSG_ATTEMPTS, MSG_OPTIONS = range(6)
# keys of a message's options dict that are not TaskConfig fields
OPT_IDEMPOTENCY_KEY = "k"
OPT_WORKFLOW = "w"
OPT_FILLS = "f"
OPT_SCHEDULE = "s"  # the run of a cluster-wide periodic task: its schedule's name (schedules.py)
OPT_RESERVED = "L"  # a rate-limited task deferred to the slot it reserved: it runs without asking again

# TaskConfig fields that travel with a task when options() overrides them (plain values only);
# delay_ms is applied by the producer and priority picks the stream.
TRAVELLING = (
    "max_retries",
    "timeout_ms",
    "retry_backoff",
    "retry_base_ms",
    "retry_max_ms",
    "retry_jitter",
    "retry_on_timeout",
    "isolation",
    "memory_limit_mb",
)
STATUS_CODES = {TaskStatus.SUCCEEDED: 0, TaskStatus.FAILED: 1, TaskStatus.TIMED_OUT: 2, TaskStatus.CANCELLED: 3}
CODE_STATUS = {v: k for k, v in STATUS_CODES.items()}


def task_name(func: Any) -> str:
    """The name a task travels by: ``module.qualname`` of the function (as ``@tasks.task``
    registers it), or the string itself."""
    if isinstance(func, str):
        if not func:
            raise ValueError("task name: must not be empty")
        return func
    if not callable(func):
        raise TypeError(f"add_task: expected a task function or its registered name, got {type(func).__name__}")
    mod = getattr(func, "__module__", None)
    qual = getattr(func, "__qualname__", None)
    if not mod or not qual or "<locals>" in qual or "<lambda>" in qual:
        raise TypeError(
            f"add_task: {func!r} has no importable name; tasks travel to workers by name, so define them "
            "at module level (def in a module the worker imports) and register them with @tasks.task"
        )
    if mod == "__main__":
        raise TypeError(
            f"add_task: {qual} is defined in __main__, which a worker cannot import; move it to a module "
            "that both the producer and `catzilla-tasks worker module:tasks` import"
        )
    return f"{mod}.{qual}"


def message(
    task_id: str,
    name: str,
    args: Any,
    kwargs: dict[str, Any] | None,
    options: dict[str, Any] | None = None,
    attempts: int = 0,
) -> list[Any]:
    """The list a message serializes (see the module docstring)."""
    msg: list[Any] = [task_id, name, list(args), kwargs or {}]
    if options or attempts:
        msg += [attempts, options or {}]
    return msg


class Overrides:
    """What of a per-call config travels with a message: the fields that differ from the
    function's decorator config, plain values only (hooks and ``retry_on`` cannot travel: the
    worker imports the same module, so they belong in the decorator). Cached per (config,
    decorator config) pair, so a reused ``options(...)`` costs one dict lookup."""

    __slots__ = ("_diffs",)

    def __init__(self) -> None:
        self._diffs: dict[tuple[int, int], tuple[TaskConfig, TaskConfig, dict[str, Any] | None]] = {}

    def __call__(self, func: Any, cfg: TaskConfig) -> dict[str, Any] | None:
        base = getattr(func, CONFIG_ATTR, None)
        if not isinstance(base, TaskConfig):
            base = DEFAULT_CONFIG
        if cfg is base:
            return None
        key = (id(cfg), id(base))
        hit = self._diffs.get(key)
        if hit is not None and hit[0] is cfg and hit[1] is base:
            return hit[2]
        mine, theirs = cfg.as_dict(), base.as_dict()
        diff: dict[str, Any] = {}
        for field, value in mine.items():
            if field in ("priority", "delay_ms", "queue") or value == theirs[field]:
                continue
            if field not in TRAVELLING:
                plain_option(field, object())  # raises: hooks and retry_on cannot travel
            diff[field] = plain_option(field, value)
        if len(self._diffs) > 256:
            self._diffs.clear()
        self._diffs[key] = (cfg, base, diff or None)
        return diff or None


def plain_option(field: str, value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"options(): {field}={value!r} cannot travel to a remote worker; set it in the task's decorator "
        "(the worker imports the same module) instead of per call"
    )


def is_workflow_error(exc: BaseException) -> bool:
    return isinstance(exc, WorkflowError)


def parse_result(serializer: Serializer, raw: bytes) -> tuple[TaskStatus, Any]:
    """An outcome record ``[status code, value or encoded error]`` as (status, value)."""
    rec = serializer.loads(raw)
    code = rec[0]
    status = CODE_STATUS.get(code, TaskStatus.FAILED)
    return status, rec[1]
