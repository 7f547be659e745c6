"""Cancel of single remote tasks (issue 19, part 4): ``RemoteResult.cancel()`` and
``catzilla-tasks cancel TASK_ID``. Queued or delayed: it never runs; running: its worker sets
``cancel_requested`` (an async task is cancelled); waiters get TaskCancelled. Against a real
redis-server."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis_tasks as rt
from redis_helpers import prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)
from test_redis_broker import Cluster

from catzilla_tasks import TaskCancelled, TaskStatus

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def cluster(redis_url, prefix, monkeypatch):
    c = Cluster(redis_url, prefix, monkeypatch)
    yield c
    c.close()


def log(c):
    return [x.decode() for x in c.r.lrange(f"{c.prefix}:log", 0, -1)]


@pytest.mark.timeout(120)
def test_a_queued_task_cancelled_never_runs(cluster):
    p = cluster.producer
    res = p.add_task(rt.record, f"{cluster.prefix}:log", "x")
    other = p.add_task(rt.record, f"{cluster.prefix}:log", "y")
    assert res.cancel() is True
    assert res.status is TaskStatus.CANCELLED          # at once, no worker needed
    with pytest.raises(TaskCancelled):
        p.result(res.task_id).wait(5)                   # any process's handle
    assert res.cancel() is False                        # once
    w = cluster.worker()                                # started after the cancel: it knows
    assert other.wait(20) == "y"
    wait_until(lambda: w.counts["cancelled"] == 1, 20, "the worker to drop the cancelled one")
    assert log(cluster) == ["y"]
    assert cluster.broker.dead_letter_count() == 0


@pytest.mark.timeout(120)
def test_a_task_queued_while_a_worker_is_busy_is_dropped_when_fetched(cluster):
    p = cluster.producer
    started, gate = f"{cluster.prefix}:started", f"{cluster.prefix}:gate"
    w = cluster.worker(concurrency=1)
    busy = p.add_task(rt.held, started, gate, "busy")
    assert cluster.r.blpop([started], timeout=20)
    res = p.add_task(rt.record, f"{cluster.prefix}:log", "x")   # waits behind it
    assert res.cancel() is True
    cluster.r.rpush(gate, 1)
    assert busy.wait(20) == "busy"
    wait_until(lambda: w.counts["cancelled"] == 1, 20, "the worker to drop it")
    assert log(cluster) == []


@pytest.mark.timeout(120)
def test_a_delayed_task_cancelled_leaves_the_delayed_set_and_never_runs(cluster):
    p = cluster.producer
    w = cluster.worker()
    res = p.options(delay_ms=1500).add_task(rt.record, f"{cluster.prefix}:log", "x")
    keep = p.options(delay_ms=1500).add_task(rt.record, f"{cluster.prefix}:log", "y")
    assert cluster.broker.queued()["delayed"] == 2
    assert res.cancel() is True
    assert cluster.broker.queued()["delayed"] == 1
    with pytest.raises(TaskCancelled):
        res.wait(5)
    assert keep.wait(20) == "y"
    assert log(cluster) == ["y"] and w.counts["cancelled"] == 0


@pytest.mark.timeout(120)
def test_a_running_task_sees_cancel_requested_and_is_not_retried(cluster):
    p = cluster.producer
    w = cluster.worker()
    res = p.add_task(rt.until_cancelled, f"{cluster.prefix}:log", "x")
    wait_until(lambda: log(cluster) == ["started:x"], 20, "the task to start")
    assert res.cancel() is True
    wait_until(lambda: "stopped:x" in log(cluster), 20, "the task to see cancel_requested")
    with pytest.raises(TaskCancelled):
        res.wait(5)
    wait_until(lambda: w.counts["cancelled"] == 1, 20, "the worker to commit it")
    assert log(cluster) == ["started:x", "stopped:x"]         # raised, yet not retried
    assert w.counts["retried"] == 0 and cluster.broker.dead_letter_count() == 0


@pytest.mark.timeout(120)
def test_a_running_async_task_is_cancelled(cluster):
    p = cluster.producer
    cluster.worker()
    res = p.add_task(rt.async_until_cancelled, f"{cluster.prefix}:log", "x")
    wait_until(lambda: log(cluster) == ["started:x"], 20, "the task to start")
    assert res.cancel() is True
    wait_until(lambda: "cancelled:x" in log(cluster), 20, "the coroutine to be cancelled")
    with pytest.raises(TaskCancelled):
        res.wait(5)


@pytest.mark.timeout(120)
def test_a_finished_task_is_not_cancelled(cluster):
    cluster.worker()
    res = cluster.producer.add_task(rt.add, 1, 2)
    assert res.wait(20) == 3
    assert cluster.producer.result(res.task_id).cancel() is False
    assert res.wait(1) == 3


@pytest.mark.timeout(120)
def test_the_cancel_command(cluster):
    res = cluster.producer.add_task(rt.add, 1, 2)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "catzilla_tasks.cli", "cancel", res.task_id, "--broker", cluster.url,
           "--prefix", cluster.prefix]
    got = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == f"{res.task_id}: cancelled"
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "not cancelled" in again.stdout
    with pytest.raises(TaskCancelled):
        res.wait(5)
