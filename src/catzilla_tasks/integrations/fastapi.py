"""FastAPI integration: Starlette's (``.starlette``) plus the route-parameter drop-in.

``from catzilla_tasks.integrations.fastapi import BackgroundTasks`` in place of
``from fastapi import BackgroundTasks``: a route declared ``def f(background_tasks: BackgroundTasks)``
gets an ``EngineBackgroundTasks`` bound to the app's engine (``lifespan(...)`` or ``install(app)``
must have put one in ``app.state``), whose ``add_task`` queues into the engine at once and
returns the ``TaskResult``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from .starlette import EngineBackgroundTasks, background_tasks, engine_of, install, lifespan, routes

__all__ = ["BackgroundTasks", "EngineBackgroundTasks", "background_tasks", "engine_of", "install", "lifespan", "routes"]

BackgroundTasks = Annotated[EngineBackgroundTasks, Depends(background_tasks)]
