"""A web app for the integration tests, run as a real server in a subprocess:

    python tests/integration/server_app.py MODE PORT OUT_FILE

MODE: ``catzilla_plain`` (the seed's ``app.tasks = BackgroundTasks(...)``), ``catzilla_enable``
(``enable_background_tasks(app)``), ``fastapi`` (lifespan + the ``BackgroundTasks`` route
parameter, on uvicorn), ``fastapi_plain`` (a module-level engine, no lifespan, on uvicorn).
One worker, no auto-scaling and no ageing, so the order in which queued tasks run is the
priority order. Routes:

- ``POST /jobs/{priority}/{key}``: queue ``record(priority, key)`` with that priority; it
  appends ``"<priority> <key>"`` to OUT_FILE (one line, one write).
- ``POST /block?s=S``: queue a task that runs until ``POST /release``, until the engine stops
  accepting tasks (its shutdown began) or for S seconds; it holds the only worker, so what is
  queued after it stays queued until then.
- ``/tasks/stats`` etc.: the integration's routes.
"""

import os
import sys
import threading
import time

from catzilla_tasks import BackgroundTasks, TaskPriority, task

MODE, PORT, OUT = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ENGINE = dict(workers=1, min_workers=1, max_workers=1, enable_auto_scaling=False, aging_ms=600_000.0)
gate = threading.Event()
engines = []  # the engine in use, set by the /block route


def record(priority: str, key: str) -> str:
    fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{priority} {key}\n".encode())
    finally:
        os.close(fd)
    return key


# one recorder per priority, each with its @task decorator: what FastAPI's add_task(func, ...) reads
RECORDERS = {}
for _p in TaskPriority:
    def _recorder(priority: str, key: str) -> str:
        return record(priority, key)

    RECORDERS[_p.name.lower()] = task(priority=_p)(_recorder)


def block(seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not gate.wait(0.005):  # the task's own work: checking whether it should stop
        if not engines[0].stats()["accepting"] or time.monotonic() > deadline:
            return False
    return True


@task(priority=TaskPriority.CRITICAL)
def critical_block(seconds: float) -> bool:
    return block(seconds)


def prio(name: str) -> TaskPriority:
    return TaskPriority[name.upper()]


if MODE.startswith("catzilla"):
    from catzilla import Catzilla, Path, Query, Request

    app = Catzilla(production=True, show_banner=False, log_requests=False)
    if MODE == "catzilla_plain":
        from catzilla_tasks.integrations.catzilla import mount_routes

        app.tasks = BackgroundTasks(**ENGINE)  # the seed's section 4.1

        def queue(func, *args, priority="normal"):
            return app.tasks.options(priority=prio(priority)).add_task(func, *args)

        mount_routes(app)
    elif MODE == "catzilla_enable":
        from catzilla_tasks.integrations.catzilla import enable_background_tasks

        enable_background_tasks(app, **ENGINE)

        def queue(func, *args, priority="normal"):
            return app.add_task(func, *args, priority=prio(priority))  # Catzilla's own signature
    else:
        raise SystemExit(f"unknown mode {MODE}")

    @app.post("/jobs/{priority}/{key}")
    def jobs(request: Request, priority: str = Path(...), key: str = Path(...)):
        r = queue(record, priority, key, priority=priority)
        return {"task_id": r.task_id, "status": "queued"}

    @app.post("/block")
    def blocker(request: Request, s: float = Query(5.0)):
        engines[:] = [app.tasks]
        return {"task_id": queue(block, s, priority="critical").task_id}

    @app.post("/release")
    def release(request: Request):
        gate.set()
        return {"released": True}

    app.listen(PORT, "127.0.0.1")
    print("server stopped", flush=True)

elif MODE in ("fastapi", "fastapi_plain"):
    import uvicorn
    from fastapi import Depends, FastAPI

    from catzilla_tasks.integrations.fastapi import (
        DetachedBackgroundTasks as RouteTasks,  # queued at once: priority order
    )
    from catzilla_tasks.integrations.fastapi import EngineBackgroundTasks, lifespan, routes

    if MODE == "fastapi":  # the lifespan starts the engine and drains it at shutdown
        app = FastAPI(lifespan=lifespan(**ENGINE))
        app.mount("/tasks", routes())
    else:  # no lifespan: a module-level engine; uvicorn re-raises SIGTERM after its shutdown
        from typing import Annotated

        module_engine = BackgroundTasks(**ENGINE)
        app = FastAPI()
        app.mount("/tasks", routes(module_engine))
        RouteTasks = Annotated[EngineBackgroundTasks, Depends(lambda: EngineBackgroundTasks(module_engine))]

    @app.post("/jobs/{priority}/{key}")
    def jobs(priority: str, key: str, background_tasks: RouteTasks):
        r = background_tasks.add_task(RECORDERS[priority], priority, key)
        return {"task_id": r.task_id, "status": "queued"}

    @app.post("/block")
    def blocker(background_tasks: RouteTasks, s: float = 5.0):
        engines[:] = [background_tasks.engine]
        return {"task_id": background_tasks.add_task(critical_block, s).task_id}

    @app.post("/release")
    def release():
        gate.set()
        return {"released": True}

    uvicorn.run(app, host="127.0.0.1", port=PORT, log_level="warning")
    print("server stopped", flush=True)
else:
    raise SystemExit(f"unknown mode {MODE}")
