"""Progress: current_task().set_progress(fraction, message) inside a task, result.progress
from any process (in-process and on Redis)."""

from __future__ import annotations

import threading

import limit_tasks as lt
import pytest
import redis_tasks as rt
from redis_helpers import prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)

from catzilla_tasks import BackgroundTasks, TaskResult, current_task
from catzilla_tasks.brokers import RedisBroker, Worker
from catzilla_tasks.progress import Progress


@pytest.mark.timeout(30)
def test_progress_in_process_while_running_and_after(make_tasks):
    tasks = make_tasks(workers=2)
    reached, go = threading.Event(), threading.Event()

    def job():
        t = current_task()
        t.set_progress(0.5, "half way")
        reached.set()
        go.wait(10)
        t.set_progress(1)
        return "ok"

    h = tasks.add_task(job)
    assert h.progress is None or h.progress == Progress(0.5, "half way")
    assert reached.wait(10)
    assert h.progress == Progress(0.5, "half way")
    assert h.progress.fraction == 0.5 and h.progress.message == "half way"
    assert TaskResult(h.task_id).progress == Progress(0.5, "half way")  # any handle of the task
    go.set()
    assert h.wait(10) == "ok"
    assert h.progress == (1.0, None)


@pytest.mark.timeout(30)
def test_progress_of_async_and_limited_tasks(make_tasks):
    tasks = make_tasks(workers=2)

    async def job():
        current_task().set_progress(0.75, "async")

    h = tasks.add_task(job)
    h.wait(10)
    assert h.progress == Progress(0.75, "async")

    @tasks.task(concurrency_limit=1)
    def limited():
        current_task().set_progress(0.3)

    h2 = tasks.add_task(limited)
    h2.wait(10)
    assert h2.progress == Progress(0.3, None)


def test_bad_progress_is_refused_in_the_task(make_tasks):
    tasks = make_tasks(workers=1)

    def job(v, msg=None):
        current_task().set_progress(v, msg)

    for bad, exc in (
        (1.5, ValueError),
        (-0.1, ValueError),
        (float("nan"), ValueError),
        ("x", TypeError),
        (True, TypeError),
    ):
        with pytest.raises(exc, match="set_progress"):
            tasks.add_task(job, bad).wait(5)
    with pytest.raises(TypeError, match="message"):
        tasks.add_task(job, 0.5, 3).wait(5)
    h = tasks.add_task(lambda: None)
    h.wait(5)
    assert h.progress is None


def test_progress_is_dropped_with_the_task_record(make_tasks):
    from catzilla_tasks import _engine

    tasks = make_tasks(workers=1)

    def job():
        current_task().set_progress(0.1)

    before = _engine._registered_ids()
    h = tasks.add_task(job)
    h.wait(5)
    assert h.progress == (0.1, None)
    del h
    import gc

    gc.collect()
    # the record (and its progress, held with its registration) is freed once nothing refers to it
    wait_until(lambda: _engine._registered_ids() <= before, 5, "the record to be freed")


@pytest.mark.timeout(60)
def test_progress_across_processes_on_redis(redis_url, prefix, monkeypatch):
    monkeypatch.setenv("CT_TEST_REDIS_URL", redis_url)
    prod = BackgroundTasks(workers=2, broker=RedisBroker(redis_url, prefix=prefix))
    weng = BackgroundTasks(workers=2, broker=RedisBroker(redis_url, prefix=prefix))
    for e in (prod, weng):
        rt.register(e)
        lt.register(e)
    w = Worker(weng, concurrency=4)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        assert w.ready.wait(10)
        gate = f"{prefix}:gate"
        h = prod.add_task(lt.reports, gate)
        assert h.progress is None or h.progress == Progress(0.25, "a quarter")
        wait_until(lambda: h.progress is not None, 10, "the first report")
        assert h.progress == Progress(0.25, "a quarter")
        other = RedisBroker(redis_url, prefix=prefix)  # another process's view: by id
        assert other.result(h.task_id).progress == Progress(0.25, "a quarter")
        other.close()
        prod.broker.redis.rpush(gate, "go")
        h.wait(10)
        assert h.progress == Progress(1.0, "done")
        ttl = prod.broker.redis.pttl(prod.broker.progress_key(h.task_id))
        assert 0 < ttl <= prod.broker.result_ttl * 1000
    finally:
        w.stop()
        t.join(30)
        for e in (prod, weng):
            e.shutdown(wait_for_completion=False, timeout=10)
            e.broker.close()
