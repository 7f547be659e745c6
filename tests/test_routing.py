"""Named queues: in-process bulkheads (BackgroundTasks(queues=...)) and queues on Redis
(@tasks.task(queue=...), options(queue=...), workers consuming some queues)."""

from __future__ import annotations

import signal
import threading
import time

import limit_tasks as lt
import pytest
import redis_tasks as rt
from redis_helpers import prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)

from catzilla_tasks import BackgroundTasks, TaskPriority
from catzilla_tasks.brokers import RedisBroker, Worker
from catzilla_tasks.brokers.routing import MultiQueueWorker, broker_for_queue, parse_queues, split_concurrency
from catzilla_tasks.cli import main as cli_main


# -- in-process: a named queue is a bulkhead ----------------------------------------------------
@pytest.mark.timeout(60)
def test_slow_email_tasks_never_starve_the_default_queue(make_tasks):
    tasks = make_tasks(workers=2, enable_auto_scaling=False, queues={"emails": 1})
    hold = threading.Event()

    @tasks.task(queue="emails")
    def slow_email(i):
        hold.wait(10)
        return i

    @tasks.task
    def quick(i):
        return i

    emails = [tasks.add_task(slow_email, i) for i in range(20)]
    t0 = time.monotonic()
    assert [tasks.add_task(quick, i).wait(2) for i in range(50)] == list(range(50))
    assert time.monotonic() - t0 < 2
    # the emails queue has its one worker: one email runs, the rest wait there
    sub = tasks._queue_engines["emails"]
    assert sub.stats()["running"] == 1 and sub.stats()["queued_total"] == 19
    hold.set()
    assert [h.wait(10) for h in emails] == list(range(20))


@pytest.mark.timeout(60)
def test_options_queue_routes_one_call_and_unknown_queues_are_refused(make_tasks):
    tasks = make_tasks(workers=2, queues={"reports": 1})
    names: list[str] = []

    def where():
        names.append(threading.current_thread().name)

    tasks.options(queue="reports").add_task(where).wait(5)
    tasks.options(queue="default").add_task(where).wait(5)
    with pytest.raises(ValueError, match="no such queue"):
        tasks.options(queue="emails").add_task(where)
    with pytest.raises(ValueError, match="queues"):
        BackgroundTasks(queues={"default": 2})
    with pytest.raises(ValueError, match="workers"):
        BackgroundTasks(queues={"emails": 0})
    with pytest.raises(TypeError, match="queues"):
        BackgroundTasks(queues=["emails"])


def test_a_named_queue_shuts_down_and_joins_with_its_engine():
    tasks = BackgroundTasks(workers=1, queues={"q": 1})
    sub = tasks._queue_engines["q"]
    done = []
    tasks.options(queue="q").add_task(lambda: (time.sleep(0.1), done.append(1)))
    tasks.join(5)
    assert done == [1]
    tasks.shutdown()
    assert sub.is_shutdown


def test_queue_specs():
    assert parse_queues("emails,default") == {"emails": 1, "default": 1}
    assert parse_queues("emails:1, default:3") == {"emails": 1, "default": 3}
    for bad in ("", "a b", "a:0", "a:x", "a,a"):
        with pytest.raises(ValueError):
            parse_queues(bad)
    assert split_concurrency(16, {"a": 1, "b": 1}) == {"a": 8, "b": 8}
    assert split_concurrency(16, {"a": 1, "b": 3}) == {"a": 4, "b": 12}
    assert split_concurrency(3, {"a": 1, "b": 100}) == {"a": 1, "b": 2}
    with pytest.raises(ValueError):
        split_concurrency(1, {"a": 1, "b": 1})


# -- Redis ---------------------------------------------------------------------------------------
@pytest.fixture
def env(redis_url, prefix, monkeypatch):
    monkeypatch.setenv("CT_TEST_REDIS_URL", redis_url)
    made: list[BackgroundTasks] = []
    runners: list[tuple[object, threading.Thread]] = []

    def engine() -> BackgroundTasks:
        eng = BackgroundTasks(workers=4, broker=RedisBroker(redis_url, prefix=prefix))
        rt.register(eng)
        lt.register(eng)
        made.append(eng)
        return eng

    def start(w) -> None:
        t = threading.Thread(target=w.run, daemon=True)
        t.start()
        assert w.ready.wait(10)
        runners.append((w, t))

    yield engine, start
    for w, _ in runners:
        w.stop()  # type: ignore[attr-defined]
    for _, t in runners:
        t.join(30)
    for eng in made:
        eng.shutdown(wait_for_completion=False, timeout=10)
        eng.broker.close()


@pytest.mark.timeout(120)
def test_two_queues_two_workers_each_runs_only_its_queue(env, prefix):
    engine, start = env
    p = engine()
    r = p.broker.redis
    log = f"{prefix}:log"
    with p.batch():
        emails = [p.add_task(lt.email, log, i) for i in range(10)]
        defaults = [p.add_task(lt.default_job, log, i) for i in range(10)]
        routed = [p.options(queue="emails").add_task(lt.default_job, log, 100 + i) for i in range(5)]
    streams, _ = p.broker.queue_keys("emails")
    assert r.xlen(streams[TaskPriority.NORMAL]) == 15
    assert r.xlen(p.broker.streams[TaskPriority.NORMAL]) == 10
    we = engine()
    w_emails = Worker(we, broker_for_queue(we.broker, "emails"), concurrency=4)
    w_default = Worker(engine(), concurrency=4)
    start(w_emails)
    start(w_default)
    assert [h.wait(30) for h in emails] == ["emails"] * 10
    assert [h.wait(30) for h in defaults] == ["default"] * 10
    assert [h.wait(30) for h in routed] == ["default"] * 5
    wait_until(lambda: w_emails.counts["succeeded"] + w_default.counts["succeeded"] == 25, 10, "all committed")
    assert w_emails.counts["succeeded"] == 15 and w_default.counts["succeeded"] == 10


@pytest.mark.timeout(120)
def test_one_worker_consumes_two_queues_and_a_slow_queue_starves_nothing(env, prefix):
    engine, start = env
    p = engine()
    log = f"{prefix}:log"
    with p.batch():
        slow = [p.add_task(lt.email, log, i, 0.5) for i in range(20)]  # 10 s of email work
        quick = [p.add_task(lt.default_job, log, i) for i in range(30)]
    w = MultiQueueWorker(engine(), {"emails": 1, "default": 1}, concurrency=4)
    assert {q: x.concurrency for q, x in w.workers.items()} == {"emails": 2, "default": 2}
    start(w)
    t0 = time.monotonic()
    assert [h.wait(10) for h in quick] == ["default"] * 30
    assert time.monotonic() - t0 < 4  # while the emails queue is busy for ~5 s
    assert not all(h.is_ready() for h in slow)
    assert [h.wait(30) for h in slow] == ["emails"] * 20


def test_cli_worker_queues_option(env, prefix, capsys, monkeypatch):
    engine, _start = env
    p = engine()
    import limit_app

    limit_app.reset(p.broker.url, prefix)
    h = p.add_task(lt.email, f"{prefix}:log", 1)
    stopper = threading.Timer(3.0, lambda: limit_app.stop())
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}  # the worker installs its own
    stopper.start()
    try:
        rc = cli_main(["worker", "limit_app:tasks", "--queues", "emails:1,default:1", "--concurrency", "4"])
    finally:
        stopper.cancel()
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert rc == 0
    out = capsys.readouterr().out
    assert "queues 'emails' (2), 'default' (2)" in out
    assert h.wait(5) == "emails"
    assert cli_main(["worker", "limit_app:tasks", "--queues", "a b"]) == 2


def test_memory_broker_runs_named_queue_and_limited_tasks():
    from catzilla_tasks.brokers import Consumer, MemoryBroker

    broker = MemoryBroker()
    tasks = BackgroundTasks(workers=2, broker=broker)
    lt.register(tasks)
    c = Consumer(tasks, broker)
    c.start()
    try:
        assert tasks.add_task(lt.queued_echo, 7).wait(10) == 7  # one queue in memory: run, not refused
        assert tasks.add_task(lt.rated_far, 3).wait(10) == 3
    finally:
        c.stop()
        tasks.shutdown(wait_for_completion=False, timeout=10)


def test_keyed_tasks_go_to_their_named_queue_once(env, prefix):
    engine, _start = env
    p = engine()
    r = p.broker.redis
    streams, _ = p.broker.queue_keys("emails")
    a = p.options(queue="emails", idempotency_key="k1").add_task(lt.default_job, "x", 1)
    b = p.options(queue="emails", idempotency_key="k1").add_task(lt.default_job, "x", 1)
    with p.batch():
        c = p.options(queue="emails", idempotency_key="k2").add_task(lt.default_job, "x", 2)
        d = p.options(queue="emails").add_task(lt.default_job, "x", 3)
    assert a.task_id == b.task_id and c.task_id != d.task_id
    assert r.xlen(streams[TaskPriority.NORMAL]) == 3
    assert r.xlen(p.broker.streams[TaskPriority.NORMAL]) == 0
