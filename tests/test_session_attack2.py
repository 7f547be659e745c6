"""Attacks on two changes of the session: a task without a context of its own runs in a new empty
one when its worker thread has a context (py_run.c run_attempt), and the cluster view's reads of
keys of another type under a queue's names (scan_stream.lua, scan_delayed.lua, ClusterView)."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import threading

import pytest
from redis_helpers import prefix, redis, redis_url  # noqa: F401  (fixtures)

from catzilla_tasks import TaskConfig, TaskTimeout
from catzilla_tasks.brokers import RedisBroker

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("test_session_attack2_var", default="unset")


def _empty_submit(tasks, fn, *args):
    """Submit from an empty context: nothing is kept, the task has no context of its own."""
    return contextvars.Context().run(tasks.add_task, fn, *args)


def _pollute(tasks) -> None:
    """The worker thread (of a one-worker engine) gets a context of its own, with a value in it."""

    def setter():
        VAR.set("polluted")
        return VAR.get()

    assert _empty_submit(tasks, setter).wait(10) == "polluted"


def _contexts() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is contextvars.Context)


# == A. the empty context of a task without one ================================================
@pytest.mark.timeout(120)
def test_an_inline_chain_40_deep_mixing_tasks_with_and_without_a_context(make_tasks):
    # one worker: each level waits for the next, which the waiting worker runs inline (help
    # while waiting); a level submitted with the waiter's value sees it, one submitted from an
    # empty context sees nothing; no level's value changes under it
    tasks = make_tasks(workers=1, enable_auto_scaling=False)
    _pollute(tasks)

    def level(n):
        seen = VAR.get()
        VAR.set(f"level {n}")
        if n == 0:
            return [seen]
        h = tasks.add_task(level, n - 1) if n % 2 else _empty_submit(tasks, level, n - 1)
        below = h.wait(60)
        assert VAR.get() == f"level {n}"
        return [*below, seen]

    got = _empty_submit(tasks, level, 40).wait(90)
    # level n (n < 40) was submitted by level n + 1: with a context when n + 1 is odd
    want = [f"level {n + 1}" if (n + 1) % 2 else "unset" for n in range(40)] + ["unset"]
    assert got == want
    assert _empty_submit(tasks, VAR.get).wait(10) == "unset"


@pytest.mark.timeout(60)
def test_an_async_task_without_a_context_starts_empty_and_keeps_what_it_sets(make_tasks):
    tasks = make_tasks(workers=1, enable_auto_scaling=False)
    _pollute(tasks)

    async def coro():
        seen = VAR.get()
        VAR.set("async")
        await asyncio.sleep(0)
        return seen, VAR.get()

    assert _empty_submit(tasks, coro).wait(10) == ("unset", "async")
    assert _empty_submit(tasks, VAR.get).wait(10) == "unset"


@pytest.mark.timeout(60)
def test_hooks_and_callbacks_of_a_task_without_a_context_see_what_it_set(make_tasks):
    tasks = make_tasks(workers=1, enable_auto_scaling=False)
    _pollute(tasks)
    seen: dict[str, str] = {}
    go = threading.Event()
    done = threading.Event()

    def on_success(value):
        seen["on_success"] = VAR.get()

    def job():
        assert go.wait(10)
        VAR.set("job")
        return 1

    def cb(value):
        seen["add_callback"] = VAR.get()

    def done_cb(handle):
        seen["done"] = VAR.get()
        done.set()

    h = contextvars.Context().run(tasks.options(config=TaskConfig(on_success=on_success)).add_task, job)
    h.add_callback(cb)
    h._on_done(done_cb)
    go.set()
    assert h.wait(10) == 1 and done.wait(10)
    assert seen == {"on_success": "job", "add_callback": "job", "done": "job"}
    assert _empty_submit(tasks, VAR.get).wait(10) == "unset"


@pytest.mark.timeout(60)
def test_a_timed_out_task_without_a_context_leaves_nothing_behind(make_tasks):
    tasks = make_tasks(workers=1, enable_auto_scaling=False)
    _pollute(tasks)

    def spin():
        VAR.set("timed out")
        while True:
            sum(range(100))

    for _ in range(5):
        h = contextvars.Context().run(tasks.options(config=TaskConfig(timeout_ms=50)).add_task, spin)
        with pytest.raises(TaskTimeout):
            h.wait(10)
        assert _empty_submit(tasks, VAR.get).wait(10) == "unset"


@pytest.mark.timeout(60)
def test_each_retry_of_a_task_without_a_context_starts_empty(make_tasks):
    tasks = make_tasks(workers=1, enable_auto_scaling=False)
    _pollute(tasks)
    seen = []

    def flaky():
        seen.append(VAR.get())
        VAR.set(f"attempt {len(seen)}")
        if len(seen) < 3:
            raise ValueError("again")
        return "ok"

    cfg = TaskConfig(max_retries=3, retry_base_ms=1)
    assert contextvars.Context().run(tasks.options(config=cfg).add_task, flaky).wait(10) == "ok"
    assert seen == ["unset"] * 3


@pytest.mark.timeout(60)
def test_a_task_that_runs_a_context_itself_and_an_event_loop(make_tasks):
    tasks = make_tasks(workers=1, enable_auto_scaling=False)
    _pollute(tasks)

    def job():
        VAR.set("outer")
        inner = contextvars.copy_context().run(lambda: (VAR.get(), VAR.set("inner"), VAR.get())[::2])

        async def co():
            VAR.set("loop")
            return VAR.get()

        return VAR.get(), inner, asyncio.run(co()), VAR.get()

    assert _empty_submit(tasks, job).wait(10) == ("outer", ("outer", "inner"), "loop", "outer")
    assert _empty_submit(tasks, VAR.get).wait(10) == "unset"


@pytest.mark.timeout(120)
def test_no_context_is_left_behind_by_many_tasks_without_one(make_tasks):
    tasks = make_tasks(workers=2, enable_auto_scaling=False)

    def job(i):
        VAR.set(str(i))

    for i in range(2000):  # both workers get a context of their own
        _empty_submit(tasks, job, i)
    assert all(h.wait(10) is None for h in [_empty_submit(tasks, job, i) for i in range(100)])
    gc.collect()
    before = _contexts()
    for _ in range(10):
        hs = [_empty_submit(tasks, job, i) for i in range(5000)]
        assert all(h.wait(30) is None for h in hs)
        del hs
    gc.collect()
    assert _contexts() <= before + 2


# == B. keys of another type under a queue's names =============================================
@pytest.mark.timeout(60)
def test_dead_letters_of_a_queue_whose_dead_key_is_of_another_type(redis_url, prefix):  # noqa: F811
    # queues() counts such a key as no dead letters: listing them (the dashboard's page of a
    # queue) reads none too, not a WRONGTYPE error (503), and a re-drive moves none
    import json

    from catzilla_tasks.brokers.cluster import ClusterView
    from catzilla_tasks.dashboard.cluster import ClusterDashboard

    b = RedisBroker(redis_url, prefix=prefix)
    try:
        r = b.redis
        r.xadd(f"{prefix}:aa:q0", {"x": "1"})
        r.set(f"{prefix}:aa:dead", "not a stream")
        with ClusterView(redis_url, prefix=prefix) as view:
            rows = {(x["queue"], x["priority"]): x for x in view.queues()}
            assert rows[("aa", "normal")]["dead_letters"] == 0
            assert view.dead_letters("aa") == []
            assert view.redrive("aa") == 0
            dash = ClusterDashboard(redis_url, token="t" * 20, prefix=prefix)
            try:
                auth = {"authorization": "Bearer " + "t" * 20}
                st, _, body, _ = dash.handle("GET", "/api/dead-letters.json", "queue=aa", auth, b"")
                assert st == 200 and json.loads(body)["dead_letters"] == [], body
            finally:
                dash.close()
        assert r.get(f"{prefix}:aa:dead") == b"not a stream"  # (not ours: left alone)
    finally:
        b.close()


@pytest.mark.timeout(60)
def test_a_redrive_into_a_stream_key_of_another_type_keeps_the_dead_letter(redis_url, prefix):  # noqa: F811
    # redrive.lua deleted the dead letter, then its XADD failed on the key of another type: a
    # script's writes before an error stay, the task was gone from both places
    from catzilla_tasks.brokers.cluster import ClusterView

    b = RedisBroker(redis_url, prefix=prefix)
    try:
        r = b.redis
        b.publish_raw(2, b.serializer.dumps(["t-1", "x", [], {}, 0]))  # (any payload)
        eid = r.xadd(b.dead_key, {"i": "t-1", "n": "x", "e": "ValueError: boom", "p": "2", "m": b"payload"})
        r.delete(b.streams[2])
        r.set(b.streams[2], "not a stream")
        with ClusterView(redis_url, prefix=prefix) as view:
            with pytest.raises(redis.ResponseError):
                view.redrive(b.queue)
            assert [x["id"] for x in view.dead_letters(b.queue)] == [eid.decode()]
        r.delete(b.streams[2])
        assert b.redrive() == 1 and r.xlen(b.streams[2]) == 1 and r.xlen(b.dead_key) == 0
    finally:
        b.close()
