"""``catzilla-tasks workers|queues|tasks|inspect`` against a real redis-server: the JSON contract
for scripts, readable tables, every queue found (not only "default")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import redis_tasks as rt
from redis_helpers import prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)

from catzilla_tasks import BackgroundTasks, TaskPriority
from catzilla_tasks.brokers import RedisBroker, Worker
from catzilla_tasks.brokers.cluster import ClusterView
from catzilla_tasks.cli import main

TESTS = os.path.dirname(os.path.abspath(__file__))


def cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().out


@pytest.fixture
def cluster(redis_url, prefix):
    """One in-process worker on queue "default", and a producer. (Heartbeat 0.25 s: shown lost
    after 3 silent intervals, and a loaded machine can hold this process's threads back for
    longer than the 0.15 s that a 0.05 s heartbeat gave.)"""
    os.environ["CT_TEST_REDIS_URL"] = redis_url
    b = RedisBroker(redis_url, prefix=prefix)
    eng = BackgroundTasks(workers=2, broker=b)
    rt.register(eng)
    w = Worker(eng, concurrency=4, heartbeat_interval=0.25)
    t = threading.Thread(target=w.run)
    t.start()
    w.ready.wait(10)
    p = BackgroundTasks(workers=2, broker=RedisBroker(redis_url, prefix=prefix))
    try:
        yield w, p
    finally:
        w.stop()
        t.join(20)
        eng.shutdown(wait_for_completion=False)
        p.shutdown(wait_for_completion=False)


@pytest.mark.timeout(60)
def test_workers_json_contract_and_table(cluster, redis_url, prefix, capsys):
    w, p = cluster
    ok = [p.add_task(rt.add, i, i) for i in range(5)]
    bad = p.add_task(rt.always_fails, 1)
    for r in ok:
        r.wait(10)
    with pytest.raises(Exception, match="bad value"):
        bad.wait(10)

    def listed():
        rc, out = cli(capsys, "workers", "--broker", redis_url, "--prefix", prefix, "--json")
        assert rc == 0
        return json.loads(out)

    seen = {}

    def figures_in():
        # a beat can hold the figures of the last task and still count it in flight (given
        # back a moment later); one whose beats were 3 intervals late reads as lost: the
        # snapshot checked is one past both
        (seen["item"],) = listed()
        return seen["item"]["processed"] == 6 and seen["item"]["in_flight"] == 0 and seen["item"]["state"] == "alive"

    wait_until(figures_in, 10, "the worker's figures")
    item = seen["item"]
    required = {"id", "host", "pid", "queues", "concurrency", "in_flight", "processed", "failed", "last_seen", "state"}
    assert required <= item.keys()
    assert item["id"] == w.consumer and item["pid"] == os.getpid() and item["queues"] == ["default"]
    assert (item["concurrency"], item["in_flight"], item["processed"], item["failed"]) == (4, 0, 6, 1)
    assert item["state"] == "alive" and isinstance(item["last_seen"], float)
    rc, out = cli(capsys, "workers", "--broker", redis_url, "--prefix", prefix)
    assert rc == 0
    assert "1 worker(s): 1 alive, 0 lost" in out
    assert "PROCESSED" in out and w.consumer in out and "alive" in out

    rc, out = cli(capsys, "tasks", "--broker", redis_url, "--prefix", prefix, "--json")
    names = {t["name"]: t for t in json.loads(out)}
    assert names["redis_tasks.add"]["processed"] == 5
    assert names["redis_tasks.always_fails"]["failed"] == 1 and names["redis_tasks.always_fails"]["retried"] == 2
    rc, out = cli(capsys, "tasks", "--broker", redis_url, "--prefix", prefix)
    assert rc == 0 and "RUN P95" in out and "latest failure of redis_tasks.always_fails" in out
    assert "ValueError: bad value 1" in out


@pytest.mark.timeout(60)
def test_queues_lists_every_queue_with_its_depths(cluster, redis_url, prefix, capsys):
    w, p = cluster
    # a queue no worker serves: found by its keys
    other = BackgroundTasks(workers=1, broker=RedisBroker(redis_url, prefix=prefix, queue="emails"))
    try:
        for _ in range(3):
            other.options(priority=TaskPriority.HIGH).add_task(rt.add, 1, 2)
        other.options(delay_ms=60_000, priority=TaskPriority.LOW).add_task(rt.add, 1, 2)
        other.options(delay_ms=60_000).add_task(rt.add, 1, 2)
        other.broker.redis.xadd(other.broker.dead_key, {"m": b"x", "e": "E: x", "n": "t", "i": "1", "p": 0})
        rc, out = cli(capsys, "queues", "--broker", redis_url, "--prefix", prefix, "--json")
        assert rc == 0
        rows = json.loads(out)
        assert {r["queue"] for r in rows} == {"default", "emails"}
        assert all(set(r) == {"queue", "priority", "queued", "delayed", "in_flight", "dead_letters"} for r in rows)
        emails = {r["priority"]: r for r in rows if r["queue"] == "emails"}
        assert list(emails) == ["critical", "high", "normal", "low"]
        assert emails["high"]["queued"] == 3 and emails["low"]["delayed"] == 1 and emails["normal"]["delayed"] == 1
        assert emails["critical"]["dead_letters"] == 1
        assert sum(r["in_flight"] for r in rows) == 0
        rc, out = cli(capsys, "queues", "--broker", redis_url, "--prefix", prefix)
        assert "DEAD LETTERS" in out and "emails" in out and "default" in out
        other.broker.redis.xadd(other.broker.dead_key, {"m": b"y", "e": "E: see redis://:pw@h:1/0", "n": "u", "p": 1})
        with ClusterView(redis_url, prefix=prefix) as view:
            newest, oldest = view.dead_letters("emails")
        assert (newest["name"], newest["priority"]) == ("u", "high")
        assert (oldest["name"], oldest["priority"]) == ("t", "critical")
        assert "pw" not in newest["error"] and "***" in newest["error"]
        with ClusterView(redis_url, prefix=prefix) as view:
            assert view.redrive("emails", [newest["id"]]) == 1
            assert [d["id"] for d in view.dead_letters("emails")] == [oldest["id"]]
    finally:
        other.shutdown(wait_for_completion=False)


@pytest.mark.timeout(60)
def test_inspect_json_for_each_status(cluster, redis_url, prefix, capsys):
    w, p = cluster

    def inspect(tid: str) -> tuple[int, dict]:
        rc, out = cli(capsys, "inspect", tid, "--broker", redis_url, "--prefix", prefix, "--json")
        return rc, json.loads(out)

    r = p.add_task(rt.add, 2, 3)
    assert r.wait(10) == 5
    rc, info = inspect(r.task_id)
    assert rc == 0 and info == {"task_id": r.task_id, "name": "redis_tasks.add", "status": "succeeded", "result": 5}

    f = p.add_task(rt.always_fails, "x")
    with pytest.raises(Exception, match="bad value"):
        f.wait(10)
    rc, info = inspect(f.task_id)
    assert info["status"] == "failed" and info["name"] == "redis_tasks.always_fails"
    assert info["error"]["type"] == "ValueError" and info["error"]["message"] == "bad value x"
    assert "Traceback" in info["error"]["traceback"]

    d = p.options(delay_ms=60_000).add_task(rt.add, 1, 1)
    rc, info = inspect(d.task_id)
    assert info["status"] == "delayed" and info["name"] == "redis_tasks.add" and info["queue"] == "default"

    started, gate = f"{prefix}:started", f"{prefix}:gate"
    h = p.add_task(rt.held, started, gate, 7)
    wait_until(lambda: p.broker.redis.llen(started) == 1, 10, "held task started")
    rc, info = inspect(h.task_id)
    assert info["status"] == "in_flight" and info["worker"] == w.consumer and info["name"] == "redis_tasks.held"
    p.broker.redis.rpush(gate, 1)
    assert h.wait(10) == 7

    rc, info = inspect("no-such-task")
    assert rc == 1 and info["status"] == "unknown"
    rc, out = cli(capsys, "inspect", r.task_id, "--broker", redis_url, "--prefix", prefix)
    assert rc == 0 and "status:     succeeded" in out and "result:     5" in out


def test_usage_errors(capsys, monkeypatch):
    monkeypatch.delenv("CATZILLA_TASKS_BROKER", raising=False)
    assert main(["workers"]) == 2
    assert "--broker" in capsys.readouterr().err
    assert main(["queues", "--broker", "http://x"]) == 2
    assert "broker URL" in capsys.readouterr().err
    for bad in (["--heartbeat", "-1"], ["--heartbeat", "0.001"], ["--heartbeat", "nan"], ["--metrics-port", "70000"],
                ["--heartbeat", "0", "--metrics-port", "9100"]):
        assert main(["worker", "no_such_module:tasks", *bad]) == 2
        err = capsys.readouterr().err
        assert "--heartbeat" in err or "--metrics-port" in err


@pytest.mark.timeout(60)
def test_cli_as_a_process_reaches_redis(redis_url, prefix):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "catzilla_tasks.cli", "workers", "--broker", redis_url, "--prefix",
                          prefix, "--json"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []
