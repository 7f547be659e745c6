"""The FastAPI / Starlette drop-ins under a demanding user: load, cancellation, fork, contexts.

Each test is a defect found by reviewing issue 15's drop-ins (or a behaviour the review checked
and pins down); the ones that failed on the first version say so in their docstring.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from catzilla_tasks import BackgroundTasks as Engine
from catzilla_tasks import task
from catzilla_tasks.integrations import starlette as st

pytestmark = pytest.mark.timeout(120)

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def wait_until(cond, timeout=30.0):
    """Wait for a condition another thread makes true (no fixed sleep: the machine is loaded)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def one_worker_engine(queue_size=1):
    return Engine(workers=1, min_workers=1, max_workers=1, queue_size=queue_size, enable_auto_scaling=False,
                  handle_sigterm=False)


# ------------------------------------------------------------ a full engine

@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_full_engine_makes_the_request_wait_for_room_instead_of_losing_the_task(backend):
    """Failed on the first version: QueueFull after the response was sent, and the task lost
    (FastAPI's and Starlette's own class never drop a task; the request waits for its tasks
    anyway, so waiting for room is the drop-in's backpressure)."""
    if backend == "trio":
        pytest.importorskip("trio")
    eng = one_worker_engine(queue_size=1)
    gate, busy = threading.Event(), threading.Event()
    ran = []
    try:
        def hold():
            busy.set()
            gate.wait(60)

        eng.add_task(hold)
        assert busy.wait(30)
        eng.add_task(ran.append, "filler")  # the queue is full now
        rejected_before = eng.stats()["rejected"]

        async def endpoint(request):
            return PlainTextResponse("ok", background=st.BackgroundTasks([st.BackgroundTask(ran.append, "mine")],
                                                                         engine=eng))

        outcome = {}

        def request():
            try:
                app = Starlette(routes=[Route("/", endpoint)])
                outcome["status"] = TestClient(app, backend=backend).get("/").status_code
            except BaseException as exc:  # the first version: QueueFull reached the client
                outcome["error"] = exc

        client = threading.Thread(target=request)
        client.start()
        # the drop-in met the full queue (the first version raised here) ...
        wait_until(lambda: eng.stats()["rejected"] > rejected_before or not client.is_alive())
        gate.set()  # ... and room comes once the running task ends
        client.join(60)
        assert not client.is_alive()
        assert outcome == {"status": 200}
        assert ran == ["filler", "mine"]
    finally:
        gate.set()
        eng.shutdown(wait_for_completion=False, timeout=10)


def test_a_request_waiting_for_room_gets_the_engines_error_when_it_shuts_down():
    """The wait for room ends when the engine stops: the request fails, it does not hang."""
    eng = one_worker_engine(queue_size=1)
    gate, busy = threading.Event(), threading.Event()
    try:
        def hold():
            busy.set()
            gate.wait(60)

        eng.add_task(hold)
        assert busy.wait(30)
        eng.add_task(len, "filler")
        rejected_before = eng.stats()["rejected"]

        async def endpoint(request):
            return PlainTextResponse("ok", background=st.BackgroundTasks([st.BackgroundTask(len, "x")], engine=eng))

        outcome = {}

        def request():
            try:
                TestClient(Starlette(routes=[Route("/", endpoint)])).get("/")
                outcome["ok"] = True
            except BaseException as exc:
                outcome["error"] = exc

        client = threading.Thread(target=request)
        client.start()
        wait_until(lambda: eng.stats()["rejected"] > rejected_before or not client.is_alive())
        stopper = threading.Thread(target=eng.shutdown, args=(False, 30))
        stopper.start()
        client.join(60)
        gate.set()
        stopper.join(60)
        assert not client.is_alive()
        assert isinstance(outcome.get("error"), RuntimeError) and "shut down" in str(outcome["error"])
    finally:
        gate.set()
        eng.shutdown(wait_for_completion=False, timeout=10)


# ------------------------------------------------------------ fork

FORK_CHILD = textwrap.dedent("""
    import os, sys
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient
    from catzilla_tasks.integrations import starlette as st

    parent = st.default_engine()
    assert parent.add_task(int, "1").wait(30) == 1
    ran = []

    async def endpoint(request):
        return PlainTextResponse("ok", background=st.BackgroundTask(ran.append, os.getpid()))

    pid = os.fork()
    if pid == 0:  # a server's worker forked from a parent that used the default engine
        code = 1
        try:
            child = st.default_engine()
            assert child is not parent, "the child got the parent's engine, whose workers it has not got"
            assert child.add_task(int, "2").wait(20) == 2
            assert TestClient(Starlette(routes=[Route("/", endpoint)])).get("/").status_code == 200
            assert ran == [os.getpid()]
            code = 0
        except BaseException as exc:
            print("child:", type(exc).__name__, exc, flush=True)
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert parent.add_task(int, "3").wait(30) == 3  # the parent's engine is untouched
    print("child exit status", os.waitstatus_to_exitcode(status), flush=True)
    sys.exit(os.waitstatus_to_exitcode(status))
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_the_default_engine_after_fork_is_a_new_one_in_the_child(tmp_path):
    """Failed on the first version: the child kept the parent's default engine, whose worker
    threads did not survive the fork, so a drop-in task waited for ever (the request hung)."""
    script = tmp_path / "fork_child.py"
    script.write_text(FORK_CHILD)
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------ the request's context

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="unset")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_tasks_see_the_requests_context_variables_as_with_starlettes_class(backend):
    """Failed on the first version: a request id (or a tracing span, a structlog context) that a
    middleware set in a contextvar was "unset" in the tasks. Starlette runs a sync task with
    ``run_in_threadpool`` (a copy of the request's context) and awaits an async one in the
    request's task, so both see it."""
    if backend == "trio":
        pytest.importorskip("trio")
    seen = []

    def sync_task(tag):
        seen.append((tag, request_id.get()))

    async def async_task(tag):
        await asyncio.sleep(0)
        seen.append((tag, request_id.get()))

    async def endpoint(request):
        tasks = st.BackgroundTasks()
        tasks.add_task(sync_task, "sync")
        tasks.add_task(async_task, "async")
        return PlainTextResponse("ok", background=tasks)

    def with_request_id(app):
        async def middleware(scope, receive, send):
            request_id.set("req-42")
            await app(scope, receive, send)
        return middleware

    client = TestClient(with_request_id(Starlette(routes=[Route("/", endpoint)])), backend=backend)
    assert client.get("/").status_code == 200
    assert seen == [("sync", "req-42"), ("async", "req-42")]


def test_the_fastapi_drop_in_tasks_see_what_a_middleware_set():
    """The same through FastAPI's ``@app.middleware("http")`` (BaseHTTPMiddleware)."""
    from typing import Annotated  # noqa: F401  (FastAPI reads the annotations below at runtime)

    from fastapi import FastAPI

    from catzilla_tasks.integrations.fastapi import BackgroundTasks

    seen = []
    app = FastAPI()

    @app.middleware("http")
    async def set_request_id(request, call_next):
        request_id.set("req-7")
        return await call_next(request)

    def record():
        seen.append(request_id.get())

    async def route(background_tasks):
        background_tasks.add_task(record)
        return {"ok": True}

    route.__annotations__["background_tasks"] = BackgroundTasks
    app.post("/")(route)
    assert TestClient(app).post("/").json() == {"ok": True}
    assert seen == ["req-7"]


def named_failure():
    raise ValueError("named")


def test_tasks_keep_their_name_and_config_in_the_engine():
    """The context is carried without hiding the task from the engine: its ``@task`` priority
    applies, and the monitor names a failure after the function."""
    from catzilla_tasks import TaskPriority, current_task

    eng = Engine(workers=2, handle_sigterm=False)
    priorities = []

    @task(priority=TaskPriority.HIGH)
    def high():
        priorities.append(current_task().priority)

    try:
        async def endpoint(request):
            tasks = st.BackgroundTasks(engine=eng)
            tasks.add_task(high)
            tasks.add_task(named_failure)
            return PlainTextResponse("ok", background=tasks)

        client = TestClient(Starlette(routes=[Route("/", endpoint)]), raise_server_exceptions=False)
        client.get("/")
        assert priorities == [TaskPriority.HIGH]
        failures = eng.monitor.get_stats()["recent_failures"]
        assert [f["name"] for f in failures] == ["named_failure"]
    finally:
        eng.shutdown()


# ------------------------------------------------------------ cancellation

def test_a_request_cancelled_while_its_task_runs_leaves_no_error_behind(caplog):
    """Failed on the first version: the server cancels a request (shutdown, a timeout
    middleware) while its task runs, its loop ends, then the task ends: the engine logged
    "callback raised RuntimeError: Event loop is closed" (the wake-up of the awaiting loop).
    The task itself runs to its end, as Starlette's thread-pool task does; the tasks after it
    in the request do not run."""
    eng = one_worker_engine(queue_size=10)
    started, release = threading.Event(), threading.Event()
    ran = []

    def slow():
        started.set()
        release.wait(60)
        ran.append("slow")

    async def endpoint(request):
        tasks = st.BackgroundTasks(engine=eng)
        tasks.add_task(slow)
        tasks.add_task(ran.append, "after")
        return PlainTextResponse("ok", background=tasks)

    app = Starlette(routes=[Route("/", endpoint)])
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": "/", "raw_path": b"/", "query_string": b"",
             "headers": [], "server": ("test", 80), "client": ("test", 1), "root_path": ""}

    async def serve_then_cancel():
        async def receive():
            await asyncio.Event().wait()

        sent = []

        async def send(message):
            sent.append(message["type"])

        call = asyncio.create_task(app(scope, receive, send))
        while not started.is_set():  # the response is sent, the first task runs
            await asyncio.sleep(0.005)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        return sent

    try:
        with caplog.at_level(logging.WARNING, logger="catzilla_tasks"):
            assert asyncio.run(serve_then_cancel()) == ["http.response.start", "http.response.body"]
            release.set()  # the task ends after the request's loop closed
            eng.shutdown(wait_for_completion=True, timeout=30)
        assert ran == ["slow"]
        assert [r.getMessage() for r in caplog.records if r.name.startswith("catzilla_tasks")] == []
    finally:
        release.set()
        eng.shutdown(wait_for_completion=False, timeout=10)


# ------------------------------------------------------------ bad input

def send_email(user_id):
    return None


@pytest.mark.parametrize("make", [
    lambda: st.BackgroundTasks().add_task(send_email(1), 1),   # the classic slip: the call, not the function
    lambda: st.BackgroundTask(42),
    lambda: st.BackgroundTasks([st.BackgroundTask("not callable")]),
], ids=["add_task", "BackgroundTask", "in_the_list"])
def test_a_non_callable_task_is_refused_where_it_is_added(make):
    """Failed on the first version: accepted, then a TypeError after the response was sent, far
    from the line that made the mistake (Starlette's own class fails late too; ours can say where)."""
    with pytest.raises(TypeError, match="callable"):
        make()


def test_the_fastapi_drop_in_refuses_a_non_callable_in_the_route():
    from fastapi import FastAPI

    from catzilla_tasks.integrations.fastapi import BackgroundTasks

    app = FastAPI()

    async def route(background_tasks):
        background_tasks.add_task(send_email(1))
        return {"ok": True}

    route.__annotations__["background_tasks"] = BackgroundTasks
    app.post("/")(route)
    # in the route: a 500 instead of a 200 followed by an error nobody sees
    assert TestClient(app, raise_server_exceptions=False).post("/").status_code == 500


# ------------------------------------------------------------ behaviours checked and pinned

EXIT_WITH_PENDING = textwrap.dedent("""
    import os, threading, time
    from catzilla_tasks.integrations import starlette as st

    started = threading.Event()

    def slow(i):
        started.set()
        time.sleep(0.05)
        os.write(1, f"ran {i}\\n".encode())  # one write per line: the workers run at once

    detached = st.DetachedBackgroundTasks()   # no lifespan: the default engine
    for i in range(5):
        detached.add_task(slow, i)
    started.wait(30)
    print("exiting", flush=True)
""")


def test_tasks_pending_at_interpreter_exit_run_on_the_default_engine(tmp_path):
    script = tmp_path / "exit_pending.py"
    script.write_text(EXIT_WITH_PENDING)
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "exiting" in proc.stdout
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("ran")) == [f"ran {i}" for i in range(5)]


def test_the_fastapi_alias_builds_a_collection_when_called_but_is_no_class():
    """``integrations.fastapi.BackgroundTasks`` is an ``Annotated`` alias (FastAPI ignores the class
    of a BackgroundTasks parameter). Called, it builds our collection, which runs its tasks on the
    engine as a response's ``background``; ``isinstance`` needs the class behind it."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from catzilla_tasks.integrations import fastapi as fa

    ran = []
    app = FastAPI()

    @app.get("/")
    async def route():
        tasks = fa.BackgroundTasks()
        tasks.add_task(ran.append, "built by the user")
        assert isinstance(tasks, st.BackgroundTasks)
        return JSONResponse({"ok": True}, background=tasks)

    assert TestClient(app).get("/").json() == {"ok": True}
    assert ran == ["built by the user"]
    with pytest.raises(TypeError):
        isinstance(object(), fa.BackgroundTasks)


@task(isolation="process", compile_to_c=False)
def isolated_square(x):
    return x * x


def test_a_process_isolated_task_with_an_unpicklable_argument_is_refused_where_it_is_added():
    """Failed on the first version: accepted, then the pickling TypeError after the response
    was sent. The check pickles once more, only for process-isolated tasks (which pay a
    process hop anyway)."""
    isolated = isolated_square
    tasks = st.BackgroundTasks()
    with pytest.raises(TypeError, match="pickle"):
        tasks.add_task(isolated, lambda: 2)
    assert tasks.tasks == []  # nothing half-added
    tasks.add_task(isolated, 3)  # a picklable call is fine (it is not run here)
    assert len(tasks.tasks) == 1


@task(max_retries=1, retry_base_ms=1, compile_to_c=False)
def changes_the_context_then_fails(seen):
    seen.append(request_id.get())
    request_id.set("changed by attempt 1")
    if len(seen) == 1:
        raise ValueError("first attempt")


def test_each_attempt_of_a_retried_task_starts_from_the_requests_context():
    """Each attempt gets its own copy of the request's context: what a failed attempt set does
    not leak into the retry (and no Context is entered by two threads at once)."""
    seen = []

    async def endpoint(request):
        request_id.set("req-9")
        return PlainTextResponse("ok", background=st.BackgroundTask(changes_the_context_then_fails, seen))

    assert TestClient(Starlette(routes=[Route("/", endpoint)])).get("/").status_code == 200
    assert seen == ["req-9", "req-9"]
