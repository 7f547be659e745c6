"""FastAPI integration: Starlette's (``.starlette``) plus the route-parameter drop-ins.

``from catzilla_tasks.integrations.fastapi import BackgroundTasks`` in place of
``from fastapi import BackgroundTasks``, nothing else changed: the tasks a request's route and
dependencies add run after the response, in the order added, each on the engine's workers, and
the request ends when they have run (the first failure stops the rest and propagates), as with
FastAPI's class. No lifespan is needed: the app's engine (``lifespan(...)`` / ``install(app)``)
is used while it runs, else the process-wide ``default_engine()``.

``DetachedBackgroundTasks`` is the opt-in detached mode: ``add_task`` queues into the engine at
once and returns the ``TaskResult``; the response does not wait (see ``.starlette``).

FastAPI gives a parameter annotated with a ``starlette.background.BackgroundTasks`` subclass its
own ``fastapi.BackgroundTasks`` instance, whatever the subclass: so the drop-in is a dependency
(``Annotated[..., Depends(...)]``) that adds to that very instance, the one FastAPI attaches to
the response. Tasks added through FastAPI's own class in the same request keep their place in
the order.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from . import starlette as _st
from .starlette import (
    DetachedBackgroundTasks as _Detached,
)
from .starlette import (
    current_engine,
    default_engine,
    detached_background_tasks,
    engine_of,
    install,
    lifespan,
    request_background_tasks,
    routes,
)

__all__ = [
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


async def _detached(connection: HTTPConnection) -> _Detached:
    # async: FastAPI calls it on the event loop, not through its thread pool
    return detached_background_tasks(connection)


BackgroundTasks = Annotated[_st.BackgroundTasks, Depends(request_background_tasks)]
"""The route-parameter drop-in for ``fastapi.BackgroundTasks`` (FastAPI's semantics, our engine)."""

DetachedBackgroundTasks = Annotated[_Detached, Depends(_detached)]
"""The detached mode as a route parameter: ``add_task`` returns the ``TaskResult``, the response does not wait."""

# the detached class under its earlier name
EngineBackgroundTasks = _Detached
background_tasks = detached_background_tasks
