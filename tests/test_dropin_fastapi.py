"""The FastAPI drop-in: ``from catzilla_tasks.integrations.fastapi import BackgroundTasks``.

The tutorial tests check what FastAPI's own ``tests/test_tutorial/test_background_tasks``
(``test_tutorial001.py``, ``test_tutorial002.py``) check, on apps written like
``docs_src/background_tasks/tutorial001.py`` and ``tutorial002_an.py`` with only the import
changed, and, like them, with a ``TestClient`` built without ``with`` (no lifespan). The rest:
order against a slow first task, failures, repeated lifespans, mixing with FastAPI's own class,
and the detached mode.
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations, some of them local
import threading
from pathlib import Path
from typing import Annotated

import fastapi
import pytest
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from catzilla_tasks import BackgroundTasks as Engine
from catzilla_tasks import TaskResult, current_task
from catzilla_tasks.integrations import fastapi as fa
from catzilla_tasks.integrations import starlette as st
from catzilla_tasks.integrations.fastapi import BackgroundTasks

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    """The tutorials write ./log.txt: each test in its own directory."""
    monkeypatch.chdir(tmp_path)


# ------------------------------------------------------------ the tutorial apps, import swapped

def tutorial001_app() -> FastAPI:
    app = FastAPI()

    def write_notification(email: str, message=""):
        with open("log.txt", mode="w") as email_file:
            email_file.write(f"notification for {email}: {message}")

    @app.post("/send-notification/{email}")
    async def send_notification(email: str, background_tasks: BackgroundTasks):
        background_tasks.add_task(write_notification, email, message="some notification")
        return {"message": "Notification sent in the background"}

    return app


def tutorial002_app(lifespan=None) -> FastAPI:
    app = FastAPI(lifespan=lifespan)

    def write_log(message: str):
        with open("log.txt", mode="a") as log:
            log.write(message)

    def get_query(background_tasks: BackgroundTasks, q: str | None = None):
        if q:
            background_tasks.add_task(write_log, f"found query: {q}\n")
        return q

    @app.post("/send-notification/{email}")
    async def send_notification(email: str, background_tasks: BackgroundTasks, q: Annotated[str, Depends(get_query)]):
        background_tasks.add_task(write_log, f"message to {email}\n")
        return {"message": "Message sent"}

    return app


def test_tutorial001():
    client = TestClient(tutorial001_app())
    response = client.post("/send-notification/foo@example.com")
    assert response.status_code == 200
    assert response.json() == {"message": "Notification sent in the background"}
    assert "notification for foo@example.com: some notification" in Path("log.txt").read_text()


@pytest.mark.parametrize("rounds", [1, 25])
def test_tutorial002(rounds):
    client = TestClient(tutorial002_app())
    for i in range(rounds):
        Path("log.txt").unlink(missing_ok=True)
        response = client.post(f"/send-notification/foo{i}@example.com?q=some-query")
        assert response.status_code == 200, response.text
        assert response.json() == {"message": "Message sent"}
        assert f"found query: some-query\nmessage to foo{i}@example.com" in Path("log.txt").read_text()


# ------------------------------------------------------------ semantics

def test_the_dependencys_task_ends_before_the_routes_starts():
    overlap = threading.Event()
    log = []

    def first():
        log.append(("first saw the second", overlap.wait(0.3)))   # a sequential run waits the whole 0.3 s

    def second():
        overlap.set()
        log.append(("second", current_task() is not None))

    def dep(background_tasks: BackgroundTasks):
        background_tasks.add_task(first)

    app = FastAPI()

    @app.get("/", dependencies=[Depends(dep)])
    def route(background_tasks: BackgroundTasks):
        background_tasks.add_task(second)
        return "ok"

    assert TestClient(app).get("/").json() == "ok"
    assert log == [("first saw the second", False), ("second", True)]


def test_route_and_dependencies_share_one_list_with_fastapis_own_class():
    order = []
    seen = {}

    def plain_dep(tasks: fastapi.BackgroundTasks):   # FastAPI's own class, in the same request
        tasks.add_task(order.append, "fastapi's")

    def our_dep(tasks: BackgroundTasks):
        seen["dep"] = tasks
        tasks.add_task(order.append, "dependency's")

    app = FastAPI()

    @app.get("/", dependencies=[Depends(plain_dep), Depends(our_dep)])
    def route(tasks: BackgroundTasks):
        assert tasks is seen["dep"] and isinstance(tasks, st.BackgroundTasks)
        tasks.add_task(order.append, "route's")
        return "ok"

    TestClient(app).get("/")
    assert order == ["fastapi's", "dependency's", "route's"]


def test_a_failure_stops_the_rest_and_propagates():
    ran = []

    def boom():
        raise ValueError("background failure")

    app = FastAPI()

    @app.get("/")
    def route(background_tasks: BackgroundTasks):
        background_tasks.add_task(boom)
        background_tasks.add_task(ran.append, "after")
        return "ok"

    with pytest.raises(ValueError, match="background failure"):
        TestClient(app).get("/")
    assert TestClient(app, raise_server_exceptions=False).get("/").json() == "ok"   # sent before the tasks ran
    assert ran == []


def test_a_response_with_its_own_background_built_from_the_drop_in():
    ran = []
    app = FastAPI()

    @app.get("/")
    def route():
        tasks = BackgroundTasks()   # the alias constructs our class, as fastapi.BackgroundTasks() does FastAPI's
        tasks.add_task(lambda: ran.append(current_task() is not None))
        return JSONResponse("ok", background=tasks)

    assert TestClient(app).get("/").json() == "ok"
    assert ran == [True]


def submitted(engine: Engine) -> int:
    return engine.monitor.get_stats()["totals"]["submitted"]


def test_repeated_lifespans_each_get_a_working_engine_then_the_default_one():
    app = tutorial002_app(fa.lifespan(workers=2))
    engines = []
    for i in range(3):
        with TestClient(app) as client:
            Path("log.txt").unlink(missing_ok=True)
            assert client.post(f"/send-notification/u{i}@example.com?q=x").status_code == 200
            assert Path("log.txt").read_text() == f"found query: x\nmessage to u{i}@example.com\n"
            engine = app.state.catzilla_tasks
            assert submitted(engine) == 2
        assert engine.is_shutdown
        engines.append(engine)
    assert len(set(map(id, engines))) == 3
    default = st.default_engine()
    before = submitted(default)
    Path("log.txt").unlink()
    assert TestClient(app).post("/send-notification/late@example.com?q=y").status_code == 200   # no `with`
    assert Path("log.txt").read_text() == "found query: y\nmessage to late@example.com\n"
    assert submitted(default) == before + 2


def test_a_given_engine_serves_every_lifespan():
    engine = Engine(workers=2, handle_sigterm=False)
    app = tutorial002_app(fa.lifespan(engine))
    try:
        for n in (1, 2):
            with TestClient(app) as client:
                assert client.post("/send-notification/a@example.com?q=z").status_code == 200
            assert not engine.is_shutdown and submitted(engine) == 2 * n
    finally:
        engine.shutdown()


# ------------------------------------------------------------ detached mode

def test_detached_mode_returns_the_result_and_does_not_wait():
    release = threading.Event()
    results = []
    engine = Engine(workers=2, handle_sigterm=False)
    app = FastAPI(lifespan=fa.lifespan(engine))

    def slow(x):
        release.wait(30)
        return x * 2

    @app.get("/{x}")
    def route(x: int, background_tasks: fa.DetachedBackgroundTasks):
        r = background_tasks.add_task(slow, x)
        results.append(r)
        assert isinstance(background_tasks, st.DetachedBackgroundTasks) and background_tasks.engine is engine
        return {"task_id": r.task_id}

    try:
        with TestClient(app) as client:
            body = client.get("/21").json()   # returns while the task is still blocked
            (r,) = results
            assert isinstance(r, TaskResult) and body == {"task_id": r.task_id} and not r.is_ready()
            release.set()
            assert r.wait(30) == 42
    finally:
        release.set()
        engine.shutdown()


def test_detached_mode_without_a_lifespan_uses_the_default_engine():
    app = FastAPI()

    @app.get("/")
    def route(background_tasks: fa.DetachedBackgroundTasks):
        return {"default": background_tasks.engine is st.default_engine()}

    assert TestClient(app).get("/").json() == {"default": True}


def test_the_examples_drop_in_route_runs_its_tasks_in_order():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "fastapi_app.py"
    spec = importlib.util.spec_from_file_location("fastapi_example_app", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    client = TestClient(example.app)   # no lifespan: the default engine
    assert client.post("/users/7/welcome?q=docs").json() == {"status": "sent"}
    assert client.get("/users/7/notifications").json()["messages"] == ["found query: docs", "welcome"]
