"""``idempotency_key`` deduplicates at submit (issue 19, part 3): a second add_task with a key
whose task is queued, running or finished within its TTL returns a handle to the first task
(same task_id, same outcome), atomically in Redis (one Lua script). Against a real redis-server."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis_tasks as rt
from redis_helpers import prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)
from test_redis_broker import Cluster

TESTS = os.path.dirname(os.path.abspath(__file__))

# one process of the concurrency test: 25 threads wait on a gate in Redis, then each submits
# add(1, 2) with one key; prints the task ids it got
_SUBMITTER = """
import os, sys, threading
import redis
from catzilla_tasks import BackgroundTasks
from catzilla_tasks.brokers import RedisBroker
import redis_tasks as rt
url, prefix, key = sys.argv[1:4]
eng = BackgroundTasks(workers=1, broker=RedisBroker(url, prefix=prefix))
ids, ready = [], threading.Barrier(26)
r = redis.Redis.from_url(url)
def submit():
    ready.wait()
    ids.append(eng.options(idempotency_key=key).add_task(rt.add, 1, 2).task_id)
threads = [threading.Thread(target=submit) for _ in range(25)]
for t in threads: t.start()
r.rpush(prefix + ":ready", 1)
r.blpop([prefix + ":go"], timeout=60)
ready.wait()
for t in threads: t.join()
print(" ".join(ids))
"""


@pytest.fixture
def cluster(redis_url, prefix, monkeypatch):
    c = Cluster(redis_url, prefix, monkeypatch)
    yield c
    c.close()


def queued(c) -> int:
    q = c.broker.queued()
    return sum(q[p] for p in ("CRITICAL", "HIGH", "NORMAL", "LOW", "delayed"))


@pytest.mark.timeout(180)
def test_100_concurrent_add_tasks_with_one_key_from_4_processes_queue_one_task(cluster):
    r, prefix = cluster.r, cluster.prefix
    key = f"{prefix}-once"
    env = dict(os.environ, CT_TEST_REDIS_URL=cluster.url,
               PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", _SUBMITTER, cluster.url, prefix, key], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        wait_until(lambda: r.llen(f"{prefix}:ready") == 4, 60, "four processes with 25 threads each ready")
        r.rpush(f"{prefix}:go", *([1] * 4))
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    ids = [i for out, err in outs for i in out.split()]
    assert len(ids) == 100, outs
    assert len(set(ids)) == 1                      # every add_task: the first task's handle
    assert queued(cluster) == 1                    # one task queued
    assert r.get(cluster.broker.dedup_key(key)).decode() == ids[0]
    cluster.worker()
    assert cluster.producer.result(ids[0]).wait(20) == 3


@pytest.mark.timeout(120)
def test_a_second_add_task_gets_the_first_task_when_queued_running_or_finished(cluster):
    p, r = cluster.producer, cluster.r
    started, gate = f"{cluster.prefix}:started", f"{cluster.prefix}:gate"
    key = f"{cluster.prefix}-k"
    first = p.options(idempotency_key=key).add_task(rt.held, started, gate, "a")
    queued_copy = p.options(idempotency_key=key).add_task(rt.held, started, gate, "b")
    assert queued_copy.task_id == first.task_id and queued(cluster) == 1
    cluster.worker()
    assert r.blpop([started], timeout=20) == (started.encode(), b"a")
    running_copy = p.options(idempotency_key=key).add_task(rt.held, started, gate, "c")
    assert running_copy.task_id == first.task_id
    r.rpush(gate, 1)
    assert first.wait(20) == "a"
    finished_copy = p.options(idempotency_key=key).add_task(rt.held, started, gate, "d")
    assert finished_copy.task_id == first.task_id and finished_copy.wait(5) == "a"
    assert r.llen(started) == 0                    # nothing ran again
    # another key is another task
    other = p.options(idempotency_key=key + "-2").add_task(rt.add, 2, 2)
    assert other.task_id != first.task_id and other.wait(20) == 4


@pytest.mark.timeout(120)
def test_the_same_outcome_for_a_failure_and_a_new_task_once_the_key_expires(cluster):
    p = cluster.engine(idempotency_ttl=3)
    cluster.worker()
    key = f"{cluster.prefix}-fails"
    first = p.options(idempotency_key=key).add_task(rt.always_fails, 1)
    with pytest.raises(ValueError):
        first.wait(20)
    again = p.options(idempotency_key=key).add_task(rt.add, 1, 2)
    assert again.task_id == first.task_id
    with pytest.raises(ValueError):
        again.wait(5)                             # same outcome
    wait_until(lambda: not cluster.r.exists(p.broker.dedup_key(key)), 10, "the key to expire")
    later = p.options(idempotency_key=key).add_task(rt.add, 1, 2)
    assert later.task_id != first.task_id and later.wait(20) == 3


@pytest.mark.timeout(120)
def test_a_finished_task_is_remembered_no_longer_than_its_result(cluster):
    p = cluster.engine(result_ttl=2, idempotency_ttl=3600)
    cluster.worker(result_ttl=2)  # (the worker stores the result: its broker's TTL)
    key = f"{cluster.prefix}-short"
    assert p.options(idempotency_key=key).add_task(rt.add, 1, 1).wait(20) == 2
    wait_until(lambda: 0 < cluster.r.pttl(p.broker.dedup_key(key)) <= 2000, 10, "the key's TTL to be the result's")


@pytest.mark.timeout(120)
def test_keyed_tasks_in_a_batch_and_delayed_ones_are_deduplicated(cluster):
    p = cluster.producer
    key = f"{cluster.prefix}-batch"
    with p.batch():
        a = p.options(idempotency_key=key).add_task(rt.add, 1, 1)
        b = p.options(idempotency_key=key).add_task(rt.add, 5, 5)
        c = p.add_task(rt.add, 2, 2)
    assert a.task_id == b.task_id != c.task_id
    assert queued(cluster) == 2
    d1 = p.options(idempotency_key=key + "-d", delay_ms=300).add_task(rt.add, 3, 3)
    d2 = p.options(idempotency_key=key + "-d", delay_ms=300).add_task(rt.add, 4, 4)
    assert d1.task_id == d2.task_id and cluster.broker.queued()["delayed"] == 1
    cluster.worker()
    assert a.wait(20) == b.wait(20) == 2 and c.wait(20) == 4 and d2.wait(20) == 6


def test_a_bad_key_is_refused_at_the_call_site(cluster):
    for bad in ("", 3, b"k"):
        with pytest.raises(ValueError, match="idempotency_key"):
            cluster.producer.options(idempotency_key=bad).add_task(rt.add, 1, 1)
