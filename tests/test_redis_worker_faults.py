"""Distributed mode: one bad message, one Redis error or one bad outcome never stops a worker,
strands a task, or touches another task's outcome (issue 13, items 1-5 and 8)."""

from __future__ import annotations

import logging
import math
import threading

import pytest

from redis_helpers import redis, redis_url, prefix, wait_until  # noqa: F401  (fixtures)
from test_redis_broker import Cluster

import redis_tasks as rt
from catzilla_tasks import TaskStatus
from catzilla_tasks.brokers import RedisBroker, Worker

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(redis_url, prefix, monkeypatch):
    c = Cluster(redis_url, prefix, monkeypatch)
    yield c
    c.close()


def step_payload(broker: RedisBroker, tid: str, run_id: str, fills) -> bytes:
    opts = {"w": [run_id, 0, "s0", "wf"], "f": fills}
    return broker.serializer.dumps([tid, "redis_tasks.add", [None, 2], {}, 0, opts])


@pytest.mark.parametrize("fills", [[5], [[0]], [[0, 1, 2]], [[0, {"x": 1}]], "xy"])
def test_a_malformed_workflow_step_is_dead_lettered_and_the_worker_goes_on(cluster, fills):
    b = cluster.broker
    run_id = f"{cluster.prefix}run"
    b.redis.hset(b.workflow_key(run_id), mapping={"state": "run", "v:0": b.serializer.dumps(1)})
    b.publish_raw(2, step_payload(b, "bad-step", run_id, fills))
    w = cluster.worker(concurrency=4)
    wait_until(lambda: b.dead_letter_count() == 1, 20, "the bad step to be dead-lettered")
    assert b.dead_letters()[0]["task_id"] == "bad-step"
    assert "DecodeError" in b.dead_letters()[0]["error"]
    assert cluster.producer.add_task(rt.add, 2, 3).wait(20) == 5  # the worker goes on
    wait_until(lambda: w.stats()["in_flight"] == 0, 20, "nothing held")  # (released after the commit)
    cluster.stop_workers()  # returns: nothing is left counted in flight


def test_a_message_whose_decoding_raises_is_dead_lettered(cluster):
    b = cluster.broker
    # options whose values cannot be a TaskConfig key (a list is not hashable)
    b.publish_raw(2, b.serializer.dumps(["odd", "redis_tasks.add", [1, 2], {}, 0, {"max_retries": [1]}]))
    cluster.worker(concurrency=4)
    wait_until(lambda: b.dead_letter_count() == 1, 20, "the odd message to be dead-lettered")
    assert cluster.producer.add_task(rt.add, 1, 3).wait(20) == 4


class FailOnce:
    """Wraps a client method: the first ``n`` calls raise ConnectionError (a Redis restart)."""

    def __init__(self, fn, n: int = 1) -> None:
        self.fn = fn
        self.left = n
        self.hit = threading.Event()

    def __call__(self, *a, **kw):
        if self.left > 0:
            self.left -= 1
            self.hit.set()
            raise redis.ConnectionError("Connection reset by peer (injected)")
        return self.fn(*a, **kw)


def test_a_redis_error_at_the_idempotency_lookup_releases_the_held_tasks(cluster):
    eng = cluster.engine()
    w = Worker(eng, concurrency=8)
    w._r.mget = FailOnce(w._r.mget)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    p = cluster.producer
    rs = [p.options(idempotency_key=f"{cluster.prefix}-k{i}").add_task(rt.add, i, 1) for i in range(5)]
    assert [r.wait(20) for r in rs] == [i + 1 for i in range(5)]
    assert w._r.mget.hit.is_set()
    w.stop()
    t.join(30)
    assert not t.is_alive(), "stop() hung: tasks stranded as held"
    eng.shutdown(wait_for_completion=False)


def test_a_redis_error_at_the_workflow_step_lookup_releases_the_held_steps(cluster):
    from catzilla_tasks import TaskChain, result_of

    eng = cluster.engine()
    w = Worker(eng, concurrency=8)
    real = w._r.pipeline

    class Pipe:
        left = 1

    def pipeline(*a, **kw):
        pipe = real(*a, **kw)
        if kw.get("transaction") is False and Pipe.left:
            Pipe.left -= 1
            pipe.execute = FailOnce(pipe.execute)
        return pipe

    w._r.pipeline = pipeline
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    wf = TaskChain("two", tasks=cluster.producer)
    wf.step(rt.add, 1, 2, step_name="a")
    wf.step(rt.add, result_of("a"), 10, step_name="b")
    assert wf.execute().wait(20) == {"a": 3, "b": 13}
    assert Pipe.left == 0
    w.stop()
    t.join(30)
    assert not t.is_alive()
    eng.shutdown(wait_for_completion=False)
