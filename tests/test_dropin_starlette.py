"""The Starlette drop-in: ``catzilla_tasks.integrations.starlette.BackgroundTask`` / ``BackgroundTasks``.

The first four tests check what Starlette's own ``tests/test_background.py`` checks, with only
the import changed, on both of Starlette's async backends. The rest check what the drop-in
adds: the tasks run on the engine's workers, after the response, in order, with the engine's
features, and on the right engine with or without a lifespan.
"""

from __future__ import annotations

import os
import threading

import pytest
from starlette import background as starlette_background
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from catzilla_tasks import BackgroundTasks as Engine
from catzilla_tasks import TaskPriority, TaskTimeout, current_task, task
from catzilla_tasks.integrations import starlette as st
from catzilla_tasks.integrations.starlette import BackgroundTask, BackgroundTasks

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["asyncio", "trio"])
def client_for(request):
    """A TestClient on each of Starlette's backends (no ``with``: no lifespan)."""
    if request.param == "trio":
        pytest.importorskip("trio")
    return lambda app, **kw: TestClient(app, backend=request.param, **kw)


def text_app(background):
    """An ASGI app answering "started" with ``background(scope)`` as the response's background."""

    async def app(scope, receive, send):
        response = Response("started", media_type="text/plain", background=background())
        await response(scope, receive, send)

    return app


# ------------------------------------------------------------ what Starlette's tests check

def test_an_async_task_has_run_when_the_client_returns(client_for):
    done = []

    async def job():
        done.append(True)

    client = client_for(text_app(lambda: BackgroundTask(job)))
    assert client.get("/").text == "started"
    assert done == [True]


def test_a_sync_task_has_run_when_the_client_returns(client_for):
    done = []

    def job():
        done.append(True)

    client = client_for(text_app(lambda: BackgroundTask(job)))
    assert client.get("/").text == "started"
    assert done == [True]


def test_several_tasks_all_run_in_the_order_added(client_for):
    seen = []

    def record(amount):
        seen.append(amount)

    def tasks():
        bg = BackgroundTasks()
        for n in (1, 2, 3):
            bg.add_task(record, amount=n)
        return bg

    client = client_for(text_app(tasks))
    assert client.get("/").text == "started"
    assert seen == [1, 2, 3]


def test_the_first_failure_stops_the_rest_and_reaches_the_client(client_for):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("task failed")

    def tasks():
        bg = BackgroundTasks()
        bg.add_task(flaky)
        bg.add_task(flaky)
        return bg

    client = client_for(text_app(tasks))
    with pytest.raises(RuntimeError, match="task failed"):
        client.get("/")
    assert calls == [1]
    # a server that does not re-raise has sent the response already
    assert client_for(text_app(tasks), raise_server_exceptions=False).get("/").text == "started"
    assert calls == [1, 1, 1]


# ------------------------------------------------------------ what the drop-in adds

def test_the_drop_in_is_starlettes_class():
    bg = BackgroundTasks()
    assert isinstance(bg, starlette_background.BackgroundTasks)
    assert isinstance(BackgroundTask(print, 1, sep=""), starlette_background.BackgroundTask)
    t = BackgroundTask(print, 1, sep="")
    assert (t.func, t.args, t.kwargs, t.is_async) == (print, (1,), {"sep": ""}, False)
    assert bg.add_task(print) is None and len(bg.tasks) == 1
    with pytest.raises(TypeError, match="engine"):
        BackgroundTasks(engine=object())


def test_tasks_run_on_the_engines_workers_after_the_body_is_sent(client_for):
    """The order of events seen by the app and a middleware: body sent, tasks one by one, then the call ends."""
    events = []
    server = {}

    def sync_job(n):
        events.append(("sync", n, current_task() is not None, threading.get_ident() != server["thread"]))

    async def async_job(n):
        # on the engine's event loop: another thread than the server's
        events.append(("async", n, current_task() is not None, threading.get_ident() != server["thread"]))

    async def app(scope, receive, send):
        server["thread"] = threading.get_ident()

        async def send_and_record(message):
            await send(message)
            if message["type"] == "http.response.body":
                events.append("body sent")

        bg = BackgroundTasks()
        bg.add_task(sync_job, 1)
        bg.add_task(async_job, 2)
        bg.add_task(sync_job, 3)
        await Response("ok", background=bg)(scope, receive, send_and_record)

    async def middleware(scope, receive, send):
        await app(scope, receive, send)
        events.append("call ended")

    assert client_for(middleware).get("/").text == "ok"
    assert events == ["body sent", ("sync", 1, True, True), ("async", 2, True, True), ("sync", 3, True, True),
                      "call ended"]


def test_one_task_starts_only_after_the_previous_one_ended():
    """With several workers, task 2 would start while task 1 still runs if they were queued together."""
    overlap = threading.Event()
    log = []

    def first():
        # task 2 sets `overlap` if it starts now; a sequential run waits the whole 0.3 s
        log.append(("first saw the second", overlap.wait(0.3)))

    def second():
        overlap.set()
        log.append("second")

    def tasks():
        bg = BackgroundTasks(engine=engine)
        bg.add_task(first)
        bg.add_task(second)
        return bg

    with Engine(workers=4, handle_sigterm=False) as engine:
        TestClient(text_app(tasks)).get("/")
        assert log == [("first saw the second", False), "second"]


def test_a_plain_starlette_task_in_the_list_runs_on_the_engine_too(client_for):
    ran = []

    def job(tag):
        ran.append((tag, current_task() is not None))

    def tasks():
        return BackgroundTasks([starlette_background.BackgroundTask(job, "given")])

    client_for(text_app(tasks)).get("/")
    assert ran == [("given", True)]


@task(priority=TaskPriority.HIGH, max_retries=2, retry_base_ms=1, retry_backoff="fixed")
def flaky_high(attempts):
    attempts.append(current_task().priority)
    if len(attempts) < 3:
        raise ConnectionError("try again")


def test_the_engines_features_apply_priority_retries_monitor(client_for):
    attempts = []
    engine = Engine(workers=2, handle_sigterm=False)
    try:
        def tasks():
            bg = BackgroundTasks(engine=engine)
            bg.add_task(flaky_high, attempts)
            return bg

        assert client_for(text_app(tasks)).get("/").text == "started"
        assert attempts == [TaskPriority.HIGH] * 3   # two retries, then success, before the client returned
        totals = engine.monitor.get_stats()["totals"]
        assert totals["submitted"] == 1 and totals["succeeded"] == 1
    finally:
        engine.shutdown()


@task(timeout_ms=200)
def stuck(release: threading.Event):
    while not release.wait(0.02):  # short waits: the engine's TaskTimeout is raised between them
        pass


def test_a_task_timeout_fails_the_request_like_an_exception(client_for):
    release = threading.Event()
    after = []

    def tasks():
        bg = BackgroundTasks()
        bg.add_task(stuck, release)
        bg.add_task(after.append, "ran")
        return bg

    try:
        with pytest.raises(TaskTimeout):
            client_for(text_app(tasks)).get("/")
        assert after == []
    finally:
        release.set()


@task(isolation="process")
def write_pid(path):  # module level: process isolation pickles it
    with open(path, "w") as f:
        f.write(str(os.getpid()))


@pytest.mark.timeout(300)
def test_process_isolation_applies(tmp_path):
    out = tmp_path / "pid"
    engine = Engine(workers=2, handle_sigterm=False)
    try:
        def tasks():
            bg = BackgroundTasks(engine=engine)
            bg.add_task(write_pid, str(out))
            return bg

        TestClient(text_app(tasks)).get("/")
        assert int(out.read_text()) != os.getpid()   # written by a child process, before the client returned
        assert engine.monitor.get_stats()["totals"]["succeeded"] == 1
    finally:
        engine.shutdown()


# ------------------------------------------------------------ which engine

def counting_app(lifespan=None):
    def endpoint(request):
        bg = BackgroundTasks()
        bg.add_task(lambda: None)
        return PlainTextResponse("ok", background=bg)

    return Starlette(routes=[Route("/", endpoint)], lifespan=lifespan)


def submitted(engine: Engine) -> int:
    return engine.monitor.get_stats()["totals"]["submitted"]


def test_without_a_lifespan_the_default_engine_runs_them():
    default = st.default_engine()
    assert st.current_engine() is default and not default.is_shutdown
    before = submitted(default)
    assert TestClient(counting_app()).get("/").text == "ok"
    assert submitted(default) == before + 1
    assert st.default_engine() is default       # one per process


def test_the_default_engine_is_created_again_after_a_shutdown():
    old = st.default_engine()
    old.shutdown()
    new = st.default_engine()
    assert new is not old and not new.is_shutdown
    before = submitted(new)
    TestClient(counting_app()).get("/")
    assert submitted(new) == before + 1


def test_each_lifespan_gets_a_working_engine_and_the_default_one_after_it():
    app = counting_app(st.lifespan(workers=2))
    engines = []
    for _ in range(3):   # one `with TestClient(app)` per test, in one process
        with TestClient(app) as client:
            engine = st.current_engine()
            assert engine is app.state.catzilla_tasks and engine is not st.default_engine()
            assert client.get("/").text == "ok"
            assert submitted(engine) == 1
        assert engine.is_shutdown and st.current_engine() is st.default_engine()
        engines.append(engine)
    assert len(set(map(id, engines))) == 3
    before = submitted(st.default_engine())
    assert TestClient(counting_app(st.lifespan(workers=2))).get("/").text == "ok"   # no `with`: no lifespan
    assert submitted(st.default_engine()) == before + 1


def test_a_given_engine_stays_usable_across_lifespans():
    engine = Engine(workers=2, handle_sigterm=False)
    app = counting_app(st.lifespan(engine))
    try:
        for n in (1, 2):
            with TestClient(app) as client:
                assert client.get("/").text == "ok"
            assert not engine.is_shutdown and submitted(engine) == n
    finally:
        engine.shutdown()
    with pytest.raises(RuntimeError, match="was shut down"), TestClient(app):
        pass


def test_a_collections_engine_runs_the_tasks_given_to_it():
    engine = Engine(workers=2, handle_sigterm=False)
    try:
        def tasks():
            return BackgroundTasks([BackgroundTask(lambda: None), starlette_background.BackgroundTask(lambda: None)],
                                   engine=engine)

        TestClient(text_app(tasks)).get("/")
        assert submitted(engine) == 2
    finally:
        engine.shutdown()
