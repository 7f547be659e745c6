"""Starlette (and FastAPI) integration (the ``[fastapi]`` extra: starlette).

- ``lifespan(tasks=None, **config)``: the app's lifespan: at startup it creates the engine (or
  takes ``tasks``) and stores it as ``app.state.catzilla_tasks``; at shutdown it stops
  accepting tasks, runs what is queued (up to ``shutdown_timeout``, default the engine's
  ``exit_timeout``) and stops the workers. ``wrap=`` chains the app's own lifespan inside it.
- ``install(app, tasks=None, **config)``: the same lifespan wrapped around the one the app
  already has, plus ``routes()`` mounted at ``/tasks``; for apps built elsewhere.
- ``EngineBackgroundTasks``: ``add_task(func, *args, **kwargs)`` as Starlette's BackgroundTasks,
  but the call is queued into the engine at once (it runs on a worker thread, not after the
  response) and returns its ``TaskResult``. ``background_tasks(request)`` gives one bound to the
  app's engine; in FastAPI, ``catzilla_tasks.integrations.fastapi.BackgroundTasks`` is the
  route-parameter drop-in.
- ``routes(tasks=None)``: a Router with ``/stats``, ``/dashboard/``, ``/dashboard/stats.json``
  and ``/metrics``: ``app.mount("/tasks", routes())``. The routes are public: protect them with
  your own middleware on a server others can reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route, Router

from ..engine import BackgroundTasks
from ..results import TaskResult
from . import Reply, dashboard_response, metrics_response, normalise_prefix, stats_response

__all__ = ["EngineBackgroundTasks", "background_tasks", "engine_of", "install", "lifespan", "routes"]

STATE_KEY = "catzilla_tasks"

Lifespan = Callable[[Any], contextlib.AbstractAsyncContextManager[Any]]


class EngineBackgroundTasks:
    """Drop-in for Starlette's/FastAPI's ``BackgroundTasks`` that queues into the engine.

    ``add_task(func, *args, **kwargs)`` queues ``func(*args, **kwargs)`` now (priority and
    other options from its ``@task`` decorator) and returns the ``TaskResult``; a full engine
    raises ``QueueFull`` at once. ``results`` lists what this request queued. Passed as a
    response's ``background=``, it has nothing left to run (the tasks are already queued).
    """

    __slots__ = ("engine", "results")

    def __init__(self, engine: BackgroundTasks) -> None:
        if not isinstance(engine, BackgroundTasks):
            raise TypeError(f"engine: expected a catzilla_tasks.BackgroundTasks, got {type(engine).__name__}")
        self.engine = engine
        self.results: list[TaskResult] = []

    def add_task(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskResult:
        result = self.engine.add_task(func, *args, **kwargs)
        self.results.append(result)
        return result

    async def __call__(self) -> None:
        """Starlette runs a response's ``background`` after sending it: the tasks are queued already."""

    def __repr__(self) -> str:
        return f"<EngineBackgroundTasks {len(self.results)} queued into {self.engine!r}>"


def engine_of(request: Request) -> BackgroundTasks:
    """The engine the app's lifespan (or ``install``) stored in ``app.state``."""
    eng = getattr(request.app.state, STATE_KEY, None)
    if not isinstance(eng, BackgroundTasks):
        raise RuntimeError(
            "no catzilla_tasks engine on this app: create the app with lifespan=catzilla_tasks.integrations."
            "starlette.lifespan(...) or call install(app) (and run it under a server that runs the lifespan)"
        )
    return eng


def background_tasks(request: Request) -> EngineBackgroundTasks:
    """An ``EngineBackgroundTasks`` bound to the app's engine (a FastAPI dependency too)."""
    return EngineBackgroundTasks(engine_of(request))


def lifespan(
    tasks: BackgroundTasks | None = None,
    /,
    *,
    wrap: Lifespan | None = None,
    shutdown_timeout: float | None = None,
    **config: Any,
) -> Lifespan:
    """A lifespan for ``Starlette(lifespan=...)`` / ``FastAPI(lifespan=...)`` that starts and stops the engine.

    ``tasks``: an engine to use; else one is created at startup with ``BackgroundTasks(**config)``.
    ``wrap``: the app's own lifespan, entered after the engine started and left before it stops.
    """
    if tasks is not None and not isinstance(tasks, BackgroundTasks):
        raise TypeError(f"lifespan(): tasks must be a catzilla_tasks.BackgroundTasks, got {type(tasks).__name__}")
    if tasks is not None and config:
        raise TypeError("lifespan(): give an engine or its config, not both")
    if shutdown_timeout is not None and (not isinstance(shutdown_timeout, (int, float)) or shutdown_timeout < 0):
        raise ValueError(f"shutdown_timeout: expected seconds >= 0 (or None), got {shutdown_timeout!r}")
    if config:
        try:  # unknown keywords fail here, at the call site; values are checked when the engine starts
            inspect.signature(BackgroundTasks).bind(**config)
        except TypeError as exc:
            raise TypeError(f"lifespan(): {exc} (the engine's config is BackgroundTasks' keywords)") from None

    # the lifespan's shutdown drains the engine; the server (uvicorn) owns SIGTERM
    config.setdefault("handle_sigterm", False)

    @contextlib.asynccontextmanager
    async def _lifespan(app: Any) -> AsyncIterator[Any]:
        engine = tasks if tasks is not None else BackgroundTasks(**config)
        setattr(app.state, STATE_KEY, engine)
        try:
            if wrap is not None:
                async with wrap(app) as state:
                    yield state
            else:
                yield None
        finally:
            timeout = engine.exit_timeout if shutdown_timeout is None else shutdown_timeout
            await asyncio.to_thread(engine.shutdown, True, timeout)

    return _lifespan


def _response(reply: Reply) -> Response:
    status, ctype, body, headers = reply
    return Response(body, status_code=status, media_type=ctype, headers=headers)


def routes(tasks: BackgroundTasks | None = None, *, dashboard: bool = True, metrics: bool = True) -> Router:
    """The read-only stats routes as a Router: ``app.mount("/tasks", routes())``.

    ``tasks`` defaults to the app's engine (``app.state.catzilla_tasks``) at request time.
    """
    if tasks is not None and not isinstance(tasks, BackgroundTasks):
        raise TypeError(f"routes(): tasks must be a catzilla_tasks.BackgroundTasks, got {type(tasks).__name__}")

    def stats_source(request: Request) -> Callable[[], Any]:
        eng = tasks if tasks is not None else engine_of(request)
        return eng.monitor.get_stats  # type: ignore[no-any-return]

    async def stats(request: Request) -> Response:
        return _response(stats_response(stats_source(request)))

    async def page(request: Request) -> Response:
        return _response(dashboard_response())

    async def prometheus(request: Request) -> Response:
        return _response(metrics_response(stats_source(request)))

    table = [Route("/stats", stats, methods=["GET", "HEAD"])]
    if dashboard:
        table += [Route("/dashboard/", page, methods=["GET", "HEAD"]),
                  Route("/dashboard/stats.json", stats, methods=["GET", "HEAD"])]
    if metrics:
        table.append(Route("/metrics", prometheus, methods=["GET", "HEAD"]))
    return Router(routes=table)


def install(
    app: Any,
    tasks: BackgroundTasks | None = None,
    *,
    prefix: str | None = "/tasks",
    dashboard: bool = True,
    metrics: bool = True,
    shutdown_timeout: float | None = None,
    **config: Any,
) -> None:
    """Wrap ``app``'s lifespan with the engine's (see ``lifespan``) and mount ``routes()`` at ``prefix``.

    Call it before the server starts the app. ``prefix=None`` mounts no routes.
    """
    router = getattr(app, "router", None)
    if router is None or not hasattr(router, "lifespan_context"):
        raise TypeError(f"install(): expected a Starlette or FastAPI application, got {type(app).__name__}")
    router.lifespan_context = lifespan(tasks, wrap=router.lifespan_context, shutdown_timeout=shutdown_timeout, **config)
    if prefix is not None:
        base = normalise_prefix(prefix)
        if not base:
            raise ValueError("install(): prefix must not be the root: give a path such as '/tasks' (or None)")
        router.routes.append(Mount(base, app=routes(tasks, dashboard=dashboard, metrics=metrics)))
