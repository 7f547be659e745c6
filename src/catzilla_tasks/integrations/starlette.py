"""Starlette (and FastAPI) integration (the ``[fastapi]`` extra: starlette).

``BackgroundTask`` / ``BackgroundTasks`` (drop-ins for Starlette's), ``DetachedBackgroundTasks``,
``lifespan``, ``install`` and ``routes``: their semantics, which engine a drop-in uses and the
routes' paths are in docs/integrations.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import os
import threading
import types
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import anyio.to_thread
from starlette import background as _starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Mount, Route, Router

from .._engine import QueueFull
from ..engine import CONFIG_ATTR
from ..engine import BackgroundTasks as Engine
from ..results import TaskResult
from . import Reply, dashboard_response, metrics_response, normalise_prefix, stats_response

__all__ = [
    "BackgroundTask",
    "BackgroundTasks",
    "DetachedBackgroundTasks",
    "current_engine",
    "default_engine",
    "detached_background_tasks",
    "engine_of",
    "install",
    "lifespan",
    "request_background_tasks",
    "routes",
]

STATE_KEY = "catzilla_tasks"

Lifespan = Callable[[Any], contextlib.AbstractAsyncContextManager[Any]]


# --------------------------------------------------------------------------- which engine

_lifespan_engines: list[Engine] = []  # the engines of the lifespans running now, newest last
_default: Engine | None = None
_default_lock = threading.Lock()


def default_engine() -> Engine:
    """The process-wide engine of the drop-ins when no lifespan runs one.

    Created on first use (``BackgroundTasks(name="catzilla-tasks-default", handle_sigterm=False)``:
    the server owns SIGTERM) and, like every engine, drained at interpreter exit. Created again
    if someone shut it down, and in a forked child (the parent's has no workers there).
    """
    global _default
    eng = _default
    if eng is None or eng.is_shutdown:
        with _default_lock:
            if _default is None or _default.is_shutdown:
                _default = Engine(name="catzilla-tasks-default", handle_sigterm=False)
            eng = _default
    return eng


def _forget_parents_engines() -> None:
    """In a forked child (a pre-fork server's worker): the parent's engines have no worker threads
    here, so the drop-ins must not pick them; the child's first use creates its own default engine."""
    global _default, _default_lock
    _default = None
    _default_lock = threading.Lock()  # another thread may have held it at the fork
    _lifespan_engines.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parents_engines)


def current_engine() -> Engine:
    """The engine a drop-in without its own uses now: the newest running lifespan's, else ``default_engine()``."""
    if _lifespan_engines:
        for eng in reversed(_lifespan_engines[:]):
            if not eng.is_shutdown:
                return eng
    return default_engine()


def _app_engine(conn: HTTPConnection) -> Engine | None:
    """The app's own engine (its lifespan's), if it has one running."""
    eng = getattr(conn.app.state, STATE_KEY, None)
    return eng if isinstance(eng, Engine) and not eng.is_shutdown else None


def _check_engine(engine: Any) -> Engine | None:
    if engine is not None and not isinstance(engine, Engine):
        raise TypeError(f"engine: expected a catzilla_tasks.BackgroundTasks (or None), got {type(engine).__name__}")
    return engine


# --------------------------------------------------------------------------- compatible mode


async def _outcome(result: TaskResult) -> Any:
    """Wait for the task without blocking the server's event loop or using its threads."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # not asyncio: Starlette (anyio) on trio
        return await _outcome_trio(result)
    return await result


async def _outcome_trio(result: TaskResult) -> Any:
    import trio

    if not result.is_ready():
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake(_: TaskResult) -> None:  # in the worker thread that ended the task
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        # the engine's completion hook (what ``await result`` uses on asyncio)
        result._on_done(wake)
        await done.wait()
    return result.wait(0)


def _in_request_context(eng: Engine, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` called in a copy of the current (the request's) context, as Starlette calls a
    task: a sync one through ``run_in_threadpool`` (which copies the context), an async one
    awaited in the request's task. Request ids, tracing spans and logging contexts kept in
    contextvars reach the task. To the engine it looks like ``func`` (its ``@task`` config, its
    name). Not when the task leaves the process (process isolation, a broker): neither a context
    nor a closure can go there."""
    cfg = getattr(func, CONFIG_ATTR, None)
    if eng.broker is not None or getattr(cfg, "isolation", None) == "process":
        return func
    context = contextvars.copy_context()

    def in_context(*args: Any, **kwargs: Any) -> Any:
        # a copy per attempt: a retry (or an attempt left running past its timeout) never
        # shares it, and one Context cannot be entered by two threads at once
        result = context.copy().run(func, *args, **kwargs)
        if type(result) is types.CoroutineType:
            # the engine runs it in a task of its own loop: that task gets the request's values
            return _with_values(context, result)
        return result

    in_context.__qualname__ = getattr(func, "__qualname__", None) or repr(func)  # the monitor's name
    if cfg is not None:
        setattr(in_context, CONFIG_ATTR, cfg)
    return in_context


async def _with_values(context: contextvars.Context, coro: Coroutine[Any, Any, Any]) -> Any:
    for var, value in context.items():
        var.set(value)
    return await coro


async def _run(engine: Engine | None, func: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    eng = engine if engine is not None and not engine.is_shutdown else current_engine()
    func = _in_request_context(eng, func)
    if eng.broker is not None:
        result = await _publish(eng, func, args, kwargs)
    else:
        try:
            result = eng.add_task(func, *args, **kwargs)
        except QueueFull:
            result = await _add_when_room(eng, func, args, kwargs)
    await _outcome(result)


async def _publish(eng: Engine, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """A broker engine's publish from a request: ``add_task_async`` on asyncio (the event loop
    goes on while Redis answers); on trio, ``add_task`` in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # not asyncio: Starlette (anyio) on trio
        return await anyio.to_thread.run_sync(functools.partial(eng.add_task, func, *args, **kwargs))
    return await eng.add_task_async(func, *args, **kwargs)


async def _add_when_room(eng: Engine, func: Callable[..., Any], args: tuple, kwargs: dict) -> TaskResult:
    """A full engine: wait for room rather than lose the task (Starlette's class never drops one;
    the request waits for its tasks anyway, so this is its backpressure). The blocking add runs in
    a thread so the event loop goes on serving; it ends with the engine's error if it shuts down."""
    add = eng.options(block_timeout=-1).add_task
    return await anyio.to_thread.run_sync(functools.partial(add, func, *args, **kwargs))


class BackgroundTask(_starlette.BackgroundTask):
    """Starlette's ``BackgroundTask(func, *args, **kwargs)``, run on the engine.

    Awaiting it (Starlette does, after sending the response it is the ``background`` of) queues
    ``func(*args, **kwargs)`` into the engine and waits for it to end without blocking the event
    loop; its exception, if any, is raised here. A full engine makes it wait for room (never
    ``QueueFull``: Starlette's class never drops a task).
    ``engine``: the engine to use (None: the ``current_engine()`` when it runs). A ``func`` that
    is not callable, or a process-isolated call that cannot be pickled, is refused here
    (``TypeError``), not after the response.
    """

    engine: Engine | None = None

    def __init__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if not callable(func):
            # here, in the route, rather than after the response (where Starlette's class fails)
            raise TypeError(
                f"a background task needs a callable, got {type(func).__name__} {func!r}: pass the function "
                "itself, add_task(send_email, user_id), not add_task(send_email(user_id))"
            )
        if getattr(getattr(func, CONFIG_ATTR, None), "isolation", None) == "process":
            # a process-isolated task is pickled when it is queued, after the response: check now
            from .. import isolation

            isolation.check_picklable(func, args, kwargs)
        super().__init__(func, *args, **kwargs)

    async def __call__(self) -> None:
        await _run(self.engine, self.func, self.args, self.kwargs)


class BackgroundTasks(_starlette.BackgroundTasks):
    """Starlette's ``BackgroundTasks(tasks=None)``, run on the engine, in order.

    ``add_task(func, *args, **kwargs)`` adds a task (nothing runs yet). Awaiting the collection
    (Starlette does, after sending the response) runs the tasks one after the other, each on the
    engine, and stops at the first failure, raising it. A plain ``starlette.background.BackgroundTask``
    in ``tasks`` runs on the engine too. ``engine=`` (keyword only): the engine to use (None: the
    ``current_engine()`` when they run).
    """

    def __init__(self, tasks: Sequence[_starlette.BackgroundTask] | None = None, *, engine: Engine | None = None):
        super().__init__(tasks)
        self.engine = _check_engine(engine)

    # func is positional-only (Starlette's is not), so a task's own keyword `func` reaches the task.
    def add_task(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        task = BackgroundTask(func, *args, **kwargs)
        task.engine = self.engine
        self.tasks.append(task)

    async def __call__(self) -> None:
        for task in self.tasks:
            # Starlette's own task, or ours with no engine of its own: on this collection's engine
            if type(task) is _starlette.BackgroundTask or (type(task) is BackgroundTask and task.engine is None):
                await _run(self.engine, task.func, task.args, task.kwargs)
            else:
                await task()


# --------------------------------------------------------------------------- detached mode


class DetachedBackgroundTasks:
    """Detached mode: ``add_task(func, *args, **kwargs)`` queues into the engine now and returns the ``TaskResult``.

    Not Starlette's semantics: the task starts at once (it may run before the response is
    sent), tasks of one request run concurrently in priority order, the request never waits
    for them and their failures never reach it (see the ``TaskResult``, the engine's monitor).
    A full engine raises ``QueueFull`` at once. ``results`` lists what this object queued.
    ``engine``: the engine (None: the ``current_engine()`` now). As a response's ``background``
    it has nothing left to run.
    """

    __slots__ = ("engine", "results")

    def __init__(self, engine: Engine | None = None) -> None:
        self.engine: Engine = _check_engine(engine) or current_engine()
        self.results: list[TaskResult] = []

    def add_task(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskResult:
        result = self.engine.add_task(func, *args, **kwargs)
        self.results.append(result)
        return result

    async def add_task_async(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskResult:
        """``add_task`` for an ``async def`` route: on a broker engine (``BackgroundTasks(broker=...)``)
        it publishes without blocking the event loop (``add_task`` would hold it for the round
        trip to Redis); on the in-process engine it is ``add_task``."""
        if self.engine.broker is not None:
            result = await _publish(self.engine, func, args, kwargs)
        else:
            result = self.engine.add_task(func, *args, **kwargs)
        self.results.append(result)
        return result

    async def __call__(self) -> None:
        """Starlette runs a response's ``background`` after sending it: the tasks are queued already."""

    def __repr__(self) -> str:
        return f"<DetachedBackgroundTasks {len(self.results)} queued into {self.engine!r}>"


def engine_of(request: HTTPConnection) -> Engine:
    """The engine the app's lifespan (or ``install``) stored in ``app.state``."""
    eng = getattr(request.app.state, STATE_KEY, None)
    if not isinstance(eng, Engine):
        raise RuntimeError(
            "no catzilla_tasks engine on this app: create the app with lifespan=catzilla_tasks.integrations."
            "starlette.lifespan(...) or call install(app) (and run it under a server that runs the lifespan)"
        )
    return eng


def detached_background_tasks(request: HTTPConnection) -> DetachedBackgroundTasks:
    """A ``DetachedBackgroundTasks`` on the app's engine (``current_engine()`` without one).

    A FastAPI dependency too."""
    return DetachedBackgroundTasks(_app_engine(request))


async def request_background_tasks(
    connection: HTTPConnection, collected: _starlette.BackgroundTasks
) -> BackgroundTasks:
    """The request's tasks as our ``BackgroundTasks``, adding to ``collected``: FastAPI's dependency
    behind its ``BackgroundTasks`` drop-in (``collected`` is FastAPI's per-request instance, the one
    it runs after the response). On the app's engine (``current_engine()`` when they run, without one).
    ``async`` so that FastAPI calls it on the event loop, not through its thread pool."""
    tasks = BackgroundTasks(engine=_app_engine(connection))
    tasks.tasks = collected.tasks  # one list: what is added here runs in order with what FastAPI's own adds
    return tasks


# the names of the detached mode before it had one
EngineBackgroundTasks = DetachedBackgroundTasks
background_tasks = detached_background_tasks


def lifespan(
    tasks: Engine | None = None,
    /,
    *,
    wrap: Lifespan | None = None,
    shutdown_timeout: float | None = None,
    **config: Any,
) -> Lifespan:
    """A lifespan for ``Starlette(lifespan=...)`` / ``FastAPI(lifespan=...)`` that runs the app's engine.

    ``tasks``: an engine to use; else a new one is created at each startup with
    ``BackgroundTasks(**config)``. At shutdown, what is queued runs (up to ``shutdown_timeout``
    seconds, default the engine's ``exit_timeout``); then an engine the lifespan created is shut
    down, while a given one stays usable for the next startup (it is drained again at exit).
    ``wrap``: the app's own lifespan, entered after the engine started and left before it stops.
    """
    if tasks is not None and not isinstance(tasks, Engine):
        raise TypeError(f"lifespan(): tasks must be a catzilla_tasks.BackgroundTasks, got {type(tasks).__name__}")
    if tasks is not None and config:
        raise TypeError("lifespan(): give an engine or its config, not both")
    if shutdown_timeout is not None and (not isinstance(shutdown_timeout, (int, float)) or shutdown_timeout < 0):
        raise ValueError(f"shutdown_timeout: expected seconds >= 0 (or None), got {shutdown_timeout!r}")
    if config:
        try:  # unknown keywords fail here, at the call site; values are checked when the engine starts
            inspect.signature(Engine).bind(**config)
        except TypeError as exc:
            raise TypeError(f"lifespan(): {exc} (the engine's config is BackgroundTasks' keywords)") from None

    # the lifespan's shutdown drains the engine; the server (uvicorn) owns SIGTERM
    config.setdefault("handle_sigterm", False)

    @contextlib.asynccontextmanager
    async def _lifespan(app: Any) -> AsyncIterator[Any]:
        if tasks is not None and tasks.is_shutdown:
            raise RuntimeError(
                f"lifespan(): the engine given to it ({tasks!r}) was shut down; give lifespan() the engine's "
                "config instead to get a new engine at each startup"
            )
        engine = tasks if tasks is not None else Engine(**config)
        setattr(app.state, STATE_KEY, engine)
        _lifespan_engines.append(engine)
        try:
            if wrap is not None:
                async with wrap(app) as state:
                    yield state
            else:
                yield None
        finally:
            # from now on the drop-ins use the next running lifespan's engine, or the default one
            _lifespan_engines.remove(engine)
            if getattr(app.state, STATE_KEY, None) is engine:
                delattr(app.state, STATE_KEY)
            timeout = engine.exit_timeout if shutdown_timeout is None else shutdown_timeout
            if tasks is None:
                await anyio.to_thread.run_sync(engine.shutdown, True, timeout)
            else:
                await anyio.to_thread.run_sync(engine.join, timeout)

    return _lifespan


def _response(reply: Reply) -> Response:
    status, ctype, body, headers = reply
    return Response(body, status_code=status, media_type=ctype, headers=headers)


def routes(tasks: Engine | None = None, *, dashboard: bool = True, metrics: bool = True) -> Router:
    """The read-only stats routes as a Router: ``app.mount("/tasks", routes())``.

    ``tasks`` defaults to the app's engine (``app.state.catzilla_tasks``) at request time.
    """
    if tasks is not None and not isinstance(tasks, Engine):
        raise TypeError(f"routes(): tasks must be a catzilla_tasks.BackgroundTasks, got {type(tasks).__name__}")

    def stats_source(request: Request) -> Callable[[], Any]:
        eng = tasks if tasks is not None else engine_of(request)
        return eng.monitor.get_stats

    async def stats(request: Request) -> Response:
        return _response(stats_response(stats_source(request)))

    async def page(request: Request) -> Response:
        return _response(dashboard_response())

    async def prometheus(request: Request) -> Response:
        return _response(metrics_response(stats_source(request)))

    table = [Route("/stats", stats, methods=["GET", "HEAD"])]
    if dashboard:
        table += [
            Route("/dashboard/", page, methods=["GET", "HEAD"]),
            Route("/dashboard/stats.json", stats, methods=["GET", "HEAD"]),
        ]
    if metrics:
        table.append(Route("/metrics", prometheus, methods=["GET", "HEAD"]))
    return Router(routes=table)


def install(
    app: Any,
    tasks: Engine | None = None,
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
