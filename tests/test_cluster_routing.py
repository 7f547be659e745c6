"""The cluster view with issue 19's named queues, limits and progress (issue 20 merged with them):
a worker of several named queues registers once with its queues and weights, ``queues`` lists
every named queue (and nothing that only looks like one), ``inspect`` shows a task's progress,
and the key kinds of the prefix cannot be queue names."""

from __future__ import annotations

import json
import os
import threading

import limit_tasks as lt
import pytest
import redis_tasks as rt
from redis_helpers import prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)

from catzilla_tasks import BackgroundTasks, TaskPriority
from catzilla_tasks.brokers import RedisBroker, Worker
from catzilla_tasks.brokers.cluster import ClusterView
from catzilla_tasks.brokers.routing import MultiQueueWorker, parse_queues
from catzilla_tasks.cli import main
from catzilla_tasks.config import TaskConfig


def cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().out


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


@pytest.mark.timeout(90)
def test_a_worker_of_two_named_queues_registers_once_and_queues_lists_them(env, redis_url, prefix, capsys):
    engine, start = env
    p = engine()
    log = f"{prefix}:log"
    # (a 0.25 s heartbeat: shown lost after 3 silent intervals, and a loaded machine can hold
    # this process's threads back for longer than the 0.15 s that 0.05 s gave)
    w = MultiQueueWorker(engine(), {"emails": 1, "reports": 3}, concurrency=8, heartbeat_interval=0.25)
    start(w)
    emails = [p.add_task(lt.email, log, i) for i in range(3)]
    reports = [p.options(queue="reports").add_task(lt.default_job, log, i) for i in range(4)]
    assert [h.wait(20) for h in emails] == ["emails"] * 3
    assert [h.wait(20) for h in reports] == ["default"] * 4
    # a named queue no worker serves, with a delayed and a high-priority task: found by its keys
    audit = p.options(queue="audit", delay_ms=60_000).add_task(lt.default_job, log, 9)
    p.options(queue="audit", priority=TaskPriority.HIGH).add_task(lt.default_job, log, 10)
    # keys of limits that end like a queue's ("delayed" as a limit key / task name): not queues
    r = p.broker.redis
    r.zadd(f"{prefix}:cc:jobs.t:delayed", {"lease": 1})
    r.zadd(f"{prefix}:emails:cp:delayed", {"parked": 1})
    r.zadd(f"{prefix}:emails:cp:jobs.t:delayed", {"parked": 1})

    def listed() -> list[dict]:
        rc, out = cli(capsys, "workers", "--broker", redis_url, "--prefix", prefix, "--json")
        assert rc == 0
        return json.loads(out)

    seen = {}

    def figures_in():  # (a beat can hold the last task's figures and still count it in flight)
        got = listed()
        seen["item"] = got[0] if len(got) == 1 else None
        return seen["item"] is not None and seen["item"]["processed"] == 7 and seen["item"]["in_flight"] == 0 \
            and seen["item"]["state"] == "alive"

    wait_until(figures_in, 10, "one entry, both queues' tasks")
    item = seen["item"]
    assert item["id"] == w.consumer and item["pid"] == os.getpid()
    assert item["queues"] == ["emails", "reports"] and item["weights"] == {"emails": 1, "reports": 3}
    assert item["concurrency"] == 8 and item["in_flight"] == 0 and item["state"] == "alive"
    assert set(item["tasks"]) == {"limit_tasks.email", "limit_tasks.default_job"}
    rc, out = cli(capsys, "workers", "--broker", redis_url, "--prefix", prefix)
    assert "emails:1,reports:3" in out

    rc, out = cli(capsys, "queues", "--broker", redis_url, "--prefix", prefix, "--json")
    assert rc == 0
    rows = json.loads(out)
    names = {row["queue"] for row in rows}
    assert {"emails", "reports", "audit"} <= names
    assert not {n for n in names if ":" in n or n in ("cc", "rl", "p")}, names
    by = {(row["queue"], row["priority"]): row for row in rows}
    assert by[("audit", "normal")]["delayed"] == 1 and by[("audit", "high")]["queued"] == 1
    assert by[("emails", "normal")]["queued"] == 0 and by[("reports", "normal")]["queued"] == 0

    rc, out = cli(capsys, "inspect", audit.task_id, "--broker", redis_url, "--prefix", prefix, "--json")
    info = json.loads(out)
    assert info["status"] == "delayed" and info["queue"] == "audit" and info["name"] == "limit_tasks.default_job"

    with ClusterView(redis_url, prefix=prefix) as view:
        assert {"emails", "reports", "audit"} <= set(view.queue_names())
        assert view.workers()[0]["weights"] == {"emails": 1, "reports": 3}


@pytest.mark.timeout(60)
def test_a_plain_worker_lists_its_own_queue_without_weights(env, redis_url, prefix, capsys):
    engine, start = env
    w = Worker(engine(), concurrency=2, heartbeat_interval=0.05)
    start(w)
    with ClusterView(redis_url, prefix=prefix) as view:
        wait_until(lambda: len(view.workers()) == 1, 10, "registered")
        (item,) = view.workers()
    assert item["queues"] == ["default"] and item["weights"] == {}


@pytest.mark.timeout(60)
def test_inspect_shows_the_progress_a_task_reported(env, redis_url, prefix, capsys):
    engine, start = env
    p = engine()
    w = Worker(engine(), concurrency=2, heartbeat_interval=0.05)
    start(w)

    def inspect() -> dict:
        rc, out = cli(capsys, "inspect", h.task_id, "--broker", redis_url, "--prefix", prefix, "--json")
        assert rc == 0
        return json.loads(out)

    gate = f"{prefix}:gate"
    h = p.add_task(lt.reports, gate)
    wait_until(lambda: h.progress is not None, 10, "the first report")
    info = inspect()
    assert info["status"] == "in_flight" and info["worker"] == w.consumer
    assert info["progress"] == {"fraction": 0.25, "message": "a quarter"}
    rc, out = cli(capsys, "inspect", h.task_id, "--broker", redis_url, "--prefix", prefix)
    assert rc == 0 and "progress:   25% a quarter" in out
    p.broker.redis.rpush(gate, "go")
    h.wait(10)
    info = inspect()
    assert info["status"] == "succeeded" and info["name"] == "limit_tasks.reports"
    assert info["progress"] == {"fraction": 1.0, "message": "done"}
    # a task that reported nothing has no progress
    r = p.add_task(rt.add, 1, 2)
    assert r.wait(10) == 3
    rc, out = cli(capsys, "inspect", r.task_id, "--broker", redis_url, "--prefix", prefix, "--json")
    assert "progress" not in json.loads(out)


@pytest.mark.parametrize("name", ["cluster", "idem", "p", "rl", "cc", "r", "done"])
def test_key_kinds_of_the_prefix_are_not_queue_names(name, redis_url, prefix):
    with pytest.raises(ValueError, match=f"--queues: {name!r} is reserved"):
        parse_queues(f"emails,{name}")
    with pytest.raises(ValueError, match=f"queue: {name!r} is reserved"):
        TaskConfig(queue=name)
    with pytest.raises(ValueError, match=f"queues: {name!r} is reserved"):
        BackgroundTasks(workers=1, queues={name: 1})
    with pytest.raises(ValueError, match=f"queue: {name!r} is reserved"):
        RedisBroker(redis_url, prefix=prefix, queue=name)


def test_cli_worker_refuses_a_reserved_queue(redis_url, prefix, capsys, monkeypatch):
    monkeypatch.setenv("CT_TEST_REDIS_URL", redis_url)
    import limit_app

    limit_app.reset(redis_url, prefix)
    try:
        assert main(["worker", "limit_app:tasks", "--queues", "emails,cluster"]) == 2
    finally:
        limit_app.tasks.shutdown(wait_for_completion=False, timeout=10)
        limit_app.tasks.broker.close()
    err = capsys.readouterr().err
    assert "'cluster' is reserved" in err


def test_task_ids_never_start_with_a_dash_so_the_cli_takes_them(redis_url, prefix, monkeypatch, capsys):
    # a producer's random id base whose base64 starts with "-" (6 bits of 62): its ids would read
    # as options to `catzilla-tasks inspect ID` / `cancel ID`
    import catzilla_tasks.brokers.redis as redis_mod

    monkeypatch.setattr(redis_mod.os, "urandom", lambda n: b"\xf8" + b"\x01" * (n - 1))
    b = RedisBroker(redis_url, prefix=prefix)
    monkeypatch.undo()
    try:
        tid = b._new_id()
        assert not tid.startswith("-"), tid
        rc, out = cli(capsys, "inspect", tid, "--broker", redis_url, "--prefix", prefix, "--json")
        assert rc == 1 and json.loads(out)["status"] == "unknown"
        # an id from before (or anyone's): after "--"
        rc, out = cli(capsys, "inspect", "--broker", redis_url, "--prefix", prefix, "--json", "--", "-" + tid[1:])
        assert rc == 1 and json.loads(out)["task_id"] == "-" + tid[1:]
    finally:
        b.close()
