"""The framework integrations in-process: wiring, bad input, lifespan (real servers: tests/integration/)."""

from __future__ import annotations

import threading

import pytest
from catzilla import Catzilla
from catzilla.background_tasks import TaskPriority as CatzillaPriority
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from catzilla_tasks import BackgroundTasks, TaskPriority, TaskResult, TaskStatus
from catzilla_tasks.integrations import catzilla as cz
from catzilla_tasks.integrations import fastapi as fa
from catzilla_tasks.integrations import normalise_prefix
from catzilla_tasks.integrations import starlette as st

ENGINE = dict(workers=2, handle_sigterm=False)


def new_app() -> Catzilla:
    return Catzilla(production=True, show_banner=False, log_requests=False)


def add(x: int, y: int = 0) -> int:
    return x + y


# ---------------------------------------------------------------- Catzilla

def test_enable_background_tasks_replaces_catzillas_methods():
    app = new_app()
    tasks = cz.enable_background_tasks(app, **ENGINE)
    try:
        assert app.tasks is tasks and isinstance(tasks, BackgroundTasks)
        # Catzilla's signature: priority= is an option, y= goes to the task; wait() completes
        r = app.add_task(add, 1, y=2, priority=CatzillaPriority.LOW, max_retries=1)
        assert isinstance(r, TaskResult) and r.wait(10) == 3
        assert r.get_stats()["priority"] is TaskPriority.LOW
        assert app.add_task(add, 5).wait(10) == 5   # no option keywords: the C fast path

        @app.task(priority=CatzillaPriority.HIGH)
        def job() -> str:
            return "ran"

        r = app.add_task(job)
        assert r.wait(10) == "ran" and r.get_stats()["priority"] is TaskPriority.HIGH
        assert job in tasks.registered_tasks.values()
        stats = app.get_task_stats()
        assert stats["totals"]["succeeded"] == 3 and "queue_metrics" in stats
        paths = {r["path"] for r in app.routes()}
        assert {"/tasks/stats", "/tasks/dashboard/", "/tasks/dashboard/stats.json", "/tasks/metrics"} <= paths
    finally:
        tasks.shutdown()


def test_enable_background_tasks_uses_the_plain_patterns_engine():
    app = new_app()
    app.tasks = BackgroundTasks(**ENGINE)
    try:
        assert cz.enable_background_tasks(app, prefix=None) is app.tasks
        with pytest.raises(ValueError, match="already a catzilla_tasks engine"):
            cz.enable_background_tasks(app, workers=4)
    finally:
        app.tasks.shutdown()


def test_enable_background_tasks_bad_input():
    with pytest.raises(TypeError, match="catzilla.Catzilla"):
        cz.enable_background_tasks(object())
    app = new_app()
    app.enable_background_tasks(workers=1)  # Catzilla's own system
    try:
        with pytest.raises(RuntimeError, match="built-in background tasks are already enabled"):
            cz.enable_background_tasks(app)
    finally:
        app.tasks.shutdown(wait_for_completion=False, timeout=5)
    with pytest.raises(TypeError, match="enable_background_tasks\\(\\).*bogus"):
        cz.enable_background_tasks(new_app(), bogus=1)
    app = new_app()
    tasks = cz.enable_background_tasks(app, prefix=None, **ENGINE)
    try:
        with pytest.raises(ValueError, match="priority"):
            app.add_task(add, 1, priority="URGENT")
    finally:
        tasks.shutdown()


def test_mount_routes_checks_its_input():
    with pytest.raises(TypeError, match="BackgroundTasks"):
        cz.mount_routes(new_app(), tasks=object())
    assert cz.mount_routes(new_app(), prefix="jobs/", dashboard=False, metrics=False) == ["/jobs/stats"]
    assert normalise_prefix("/") == "" and normalise_prefix("/a/b/") == "/a/b"
    with pytest.raises(TypeError, match="prefix"):
        normalise_prefix(None)


# ---------------------------------------------------------------- Starlette / FastAPI

def test_lifespan_starts_the_engine_and_runs_what_is_queued_at_shutdown():
    gate = threading.Event()
    ran = []

    def slow(i: int) -> None:
        gate.wait(10)
        ran.append(i)

    async def enqueue(request):
        bg = st.detached_background_tasks(request)
        r = bg.add_task(slow, int(request.path_params["i"]))
        return JSONResponse({"task_id": r.task_id, "queued": len(bg.results)})

    app = Starlette(routes=[Route("/enqueue/{i}", enqueue, methods=["POST"])],
                    lifespan=st.lifespan(workers=1, min_workers=1, enable_auto_scaling=False))
    app.mount("/tasks", st.routes())
    with TestClient(app) as client:
        engine = app.state.catzilla_tasks
        assert isinstance(engine, BackgroundTasks) and not engine.is_shutdown
        for i in range(4):
            assert client.post(f"/enqueue/{i}").json()["queued"] == 1
        s = client.get("/tasks/stats").json()
        assert s["totals"]["submitted"] == 4 and ran == []
        assert client.get("/tasks/dashboard/").headers["content-type"].startswith("text/html")
        assert "catzilla_tasks_tasks_submitted_total" in client.get("/tasks/metrics").text
        gate.set()  # the lifespan's shutdown (leaving the block) must wait for all four
    assert engine.is_shutdown and sorted(ran) == [0, 1, 2, 3]


def test_fastapi_detached_route_parameter_queues_into_the_apps_engine():
    engine = BackgroundTasks(**ENGINE)
    seen = {}
    app = FastAPI(lifespan=fa.lifespan(engine))

    @app.post("/add/{x}")
    def route(x: int, background_tasks: fa.DetachedBackgroundTasks):
        seen["bg"] = background_tasks
        r = background_tasks.add_task(add, x, y=1)
        return {"task_id": r.task_id}

    try:
        with TestClient(app) as client:
            task_id = client.post("/add/41").json()["task_id"]
            bg = seen["bg"]
            assert isinstance(bg, st.DetachedBackgroundTasks) and bg.engine is engine
            assert [r.task_id for r in bg.results] == [task_id] and bg.results[0].wait(10) == 42
        # an engine given to the lifespan is drained at its end, not shut down (the next one uses it)
        assert not engine.is_shutdown and bg.results[0].status is TaskStatus.SUCCEEDED
        assert st.EngineBackgroundTasks is st.DetachedBackgroundTasks   # the earlier name
    finally:
        engine.shutdown()


def test_install_wraps_the_apps_own_lifespan():
    import contextlib

    events = []

    @contextlib.asynccontextmanager
    async def own(app):
        events.append("own start")
        yield
        events.append("own stop")

    app = FastAPI(lifespan=own)
    st.install(app, **ENGINE)
    with TestClient(app) as client:
        assert events == ["own start"]
        assert client.get("/tasks/stats").json()["worker_metrics"]["total_workers"] == 2
    assert events == ["own start", "own stop"]


def test_starlette_bad_input():
    with pytest.raises(TypeError, match="bogus"):
        st.lifespan(bogus=1)
    engine = BackgroundTasks(**ENGINE)
    try:
        with pytest.raises(TypeError, match="not both"):
            st.lifespan(engine, workers=2)
    finally:
        engine.shutdown()
    with pytest.raises(TypeError, match="BackgroundTasks"):
        st.lifespan(object())
    with pytest.raises(ValueError, match="shutdown_timeout"):
        st.lifespan(shutdown_timeout=-1)
    with pytest.raises(TypeError, match="BackgroundTasks"):
        st.DetachedBackgroundTasks(object())
    with pytest.raises(TypeError, match="Starlette or FastAPI"):
        st.install(object())
    with pytest.raises(ValueError, match="root"):
        st.install(FastAPI(), prefix="/")

    app = Starlette(routes=[Route("/x", lambda request: JSONResponse(st.engine_of(request).stats()))])
    with TestClient(app) as client, pytest.raises(RuntimeError, match="lifespan"):
        client.get("/x")
