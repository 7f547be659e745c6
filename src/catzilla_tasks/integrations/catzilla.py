"""Catzilla integration (the ``[catzilla]`` extra: ``catzilla==0.2.3``).

Two ways, both as in the seed:

1. Plain: ``app.tasks = BackgroundTasks(...)``, ``@app.tasks.task(...)`` and
   ``app.tasks.add_task(...)`` in routes. Nothing else is needed: the engine runs queued work
   at interpreter exit, and Catzilla's C core stops serving on SIGTERM/SIGINT and returns from
   ``app.listen()``, so the process exits normally and the queued tasks run first.
   ``mount_routes(app)`` adds the stats/dashboard routes.
2. ``enable_background_tasks(app, workers=..., **config)``: our engine behind Catzilla's own
   ``app.tasks``, ``app.add_task``, ``app.task`` and ``app.get_task_stats`` (replacing its
   built-in system, which is never started), plus the routes under ``/tasks``.

In ``async def`` handlers, ``await app.tasks.add_task_async(...)`` (or ``app.add_task_async``
after ``enable_background_tasks``): on a broker engine (``BackgroundTasks(broker=...)``) it
publishes without blocking the event loop; on the in-process engine it is ``add_task``.

Order: Catzilla's own ``app.add_task`` queues at once onto its workers and returns a
``TaskResult``; a request's tasks have no order between them and the response never waits for
them. Ours keeps exactly that (it is the detached mode of the Starlette/FastAPI drop-ins): there
is no per-request order in Catzilla's pattern to preserve.

Routes (see ``catzilla_tasks.integrations``): ``/tasks/stats``, ``/tasks/dashboard/``,
``/tasks/dashboard/stats.json``, ``/tasks/metrics``. They are public: put them behind your
own authentication middleware (or ``prefix=None``) on a server others can reach.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from ..config import TaskPriority
from ..engine import BackgroundTasks
from ..results import TaskResult
from . import Reply, dashboard_response, metrics_response, normalise_prefix, stats_response

__all__ = ["enable_background_tasks", "mount_routes"]

# Catzilla's add_task(func, *args, priority=, delay_ms=, max_retries=, timeout_ms=, compile_to_c=, **kwargs):
# these keywords are options there, not the task's arguments; app.add_task keeps that contract.
CATZILLA_OPTIONS = frozenset({"priority", "delay_ms", "max_retries", "timeout_ms", "compile_to_c"})


def _check_app(app: Any) -> None:
    if not (callable(getattr(app, "get", None)) and hasattr(app, "router") and hasattr(app, "server")):
        raise TypeError(
            f"expected a catzilla.Catzilla application, got {type(app).__name__}; "
            "create it with `from catzilla import Catzilla; app = Catzilla()`"
        )


def _priority(value: Any) -> Any:
    """Catzilla's own TaskPriority (a plain Enum with the same names) maps to ours by name."""
    if isinstance(value, enum.Enum) and not isinstance(value, TaskPriority) and value.name in TaskPriority.__members__:
        return TaskPriority[value.name]
    return value


def _reply(reply: Reply) -> Any:
    from catzilla import Response

    status, ctype, body, headers = reply
    return Response(status_code=status, content_type=ctype, body=body.decode("utf-8"), headers=headers)


def mount_routes(
    app: Any,
    tasks: BackgroundTasks | None = None,
    *,
    prefix: str = "/tasks",
    stats: bool = True,
    dashboard: bool = True,
    metrics: bool = True,
) -> list[str]:
    """Add ``<prefix>/stats`` (JSON), the dashboard and ``/metrics`` routes (each can be left out).

    ``tasks`` defaults to ``app.tasks`` as it is when a request comes (so the routes can be
    added before the engine). Returns the paths added. Call it before ``app.listen()``.
    """
    _check_app(app)
    if tasks is not None and not isinstance(tasks, BackgroundTasks):
        raise TypeError(f"tasks: expected a catzilla_tasks.BackgroundTasks, got {type(tasks).__name__}")
    base = normalise_prefix(prefix)

    def engine() -> Any:
        eng = tasks if tasks is not None else getattr(app, "tasks", None)
        if not isinstance(eng, BackgroundTasks):
            raise RuntimeError(
                "app.tasks is not a catzilla_tasks.BackgroundTasks: set app.tasks = BackgroundTasks(...) "
                "or call enable_background_tasks(app)"
            )
        return eng.monitor.get_stats()

    routes: dict[str, Callable[[Any], Any]] = {}
    if stats:
        routes[f"{base}/stats"] = lambda request: _reply(stats_response(engine))
    if dashboard:
        routes[f"{base}/dashboard/"] = lambda request: _reply(dashboard_response())
        routes[f"{base}/dashboard/stats.json"] = lambda request: _reply(stats_response(engine))
    if metrics:
        routes[f"{base}/metrics"] = lambda request: _reply(metrics_response(engine))
    for path, handler in routes.items():
        handler.__name__ = "catzilla_tasks_" + path.strip("/").replace("/", "_").replace(".", "_")
        app.get(path)(handler)
    return list(routes)


def enable_background_tasks(
    app: Any,
    workers: int | None = None,
    *,
    prefix: str | None = "/tasks",
    dashboard: bool = True,
    metrics: bool = True,
    **config: Any,
) -> BackgroundTasks:
    """Put a catzilla_tasks engine behind ``app.tasks``, ``app.add_task``, ``app.task`` and
    ``app.get_task_stats``, and mount the stats routes under ``prefix`` (None: no routes).

    ``config`` goes to ``BackgroundTasks`` (``min_workers``, ``max_workers``, ``queue_size``,
    ``enable_auto_scaling``, ``memory_pool_mb``, ``exit_timeout``, ...). If ``app.tasks`` is
    already a ``BackgroundTasks`` (the plain pattern), that engine is used (give no config then).

    - ``app.add_task(func, *args, priority=, delay_ms=, max_retries=, timeout_ms=, **kwargs)``:
      Catzilla's signature: those keywords are options (``compile_to_c`` per call is accepted and
      ignored: a task is compiled or not by its ``@task(compile_to_c=...)``), every other keyword
      goes to ``func``. Returns our ``TaskResult``.
    - ``await app.add_task_async(...)``: the same from an ``async def`` handler; on a broker
      engine (``BackgroundTasks(broker=...)``) it publishes without blocking the event loop.
    - ``app.task(priority=..., **config)``: ``tasks.task``; Catzilla's TaskPriority works too.
    - ``app.get_task_stats()``: ``tasks.monitor.get_stats()`` (a dict, not Catzilla's EngineStats).

    Shutdown: at normal exit, and on SIGTERM/SIGINT (Catzilla's C core stops serving and
    ``app.listen()`` returns), the engine stops accepting tasks, runs what is queued (up to
    its ``exit_timeout``), then the process exits.
    """
    _check_app(app)
    current = getattr(app, "tasks", None)
    if isinstance(current, BackgroundTasks):
        if workers is not None or config:
            raise ValueError(
                "app.tasks is already a catzilla_tasks engine: enable_background_tasks(app) uses it as it is; "
                "pass workers/config to BackgroundTasks(...) instead, or do not set app.tasks first"
            )
        tasks = current
    elif current is not None or getattr(app, "_task_system_enabled", False):
        raise RuntimeError(
            "Catzilla's built-in background tasks are already enabled on this app (app.enable_background_tasks() "
            "was called): use catzilla_tasks' enable_background_tasks(app) instead of it, not both"
        )
    else:
        try:
            tasks = BackgroundTasks(workers=workers, **config)
        except TypeError as exc:
            raise TypeError(f"enable_background_tasks(): {exc}") from None
    app.tasks = tasks
    app._task_system_enabled = True  # Catzilla's own methods see an enabled system

    def submitter(kwargs: dict[str, Any]) -> Any:
        """``tasks``, or ``tasks.options(...)`` for Catzilla's option keywords (taken out of ``kwargs``)."""
        if kwargs and not CATZILLA_OPTIONS.isdisjoint(kwargs):
            opts = {k: kwargs.pop(k) for k in CATZILLA_OPTIONS.intersection(kwargs)}
            opts.pop("compile_to_c", None)
            if "priority" in opts:
                opts["priority"] = _priority(opts["priority"])
            if opts:
                return tasks.options(**opts)
        return tasks

    def add_task(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskResult:
        """Catzilla's ``app.add_task``: ``priority=``, ``delay_ms=``, ``max_retries=``, ``timeout_ms=``
        (and ``compile_to_c=``) are options; every other keyword goes to ``func``."""
        return submitter(kwargs).add_task(func, *args, **kwargs)

    async def add_task_async(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskResult:
        """``app.add_task`` for ``async def`` handlers (same keywords): on a broker engine it
        publishes without blocking the event loop; on the in-process engine it is ``add_task``."""
        return await submitter(kwargs).add_task_async(func, *args, **kwargs)

    def task(func: Any = None, /, *, priority: Any = TaskPriority.NORMAL, **task_config: Any) -> Any:
        """Catzilla's ``@app.task(priority=...)``: ``tasks.task``, Catzilla's TaskPriority accepted."""
        return tasks.task(func, priority=_priority(priority), **task_config)

    app.add_task = add_task
    app.add_task_async = add_task_async
    app.task = task
    app.get_task_stats = tasks.monitor.get_stats
    if prefix is not None:
        mount_routes(app, tasks, prefix=prefix, dashboard=dashboard, metrics=metrics)
    return tasks
