"""What Redis keeps is bounded (issue 13, item 10): the dead-letter stream (``dead_letter_maxlen``),
idempotency keys (``idempotency_ttl`` > 0: every key expires) and workflow runs that never end
(``workflow_ttl``, restarted by each step that succeeds). Against a real redis-server."""

from __future__ import annotations

import pytest
import redis_tasks as rt
from redis_helpers import prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)
from test_redis_broker import Cluster

from catzilla_tasks import TaskChain
from catzilla_tasks.brokers import RedisBroker


@pytest.fixture
def cluster(redis_url, prefix, monkeypatch):
    c = Cluster(redis_url, prefix, monkeypatch)
    yield c
    c.close()


# -- dead letters ------------------------------------------------------------------------------
def test_dead_letter_maxlen_default_and_validation(redis_url):
    b = RedisBroker(redis_url)
    assert b.dead_letter_maxlen == 10_000
    b.close()
    for bad in (0, -1, 1.5, True, None, "10"):
        with pytest.raises(ValueError, match="dead_letter_maxlen"):
            RedisBroker(redis_url, dead_letter_maxlen=bad)


@pytest.mark.timeout(120)
def test_the_dead_letter_stream_keeps_the_newest_dead_letter_maxlen(cluster):
    w = cluster.worker(dead_letter_maxlen=5)
    b = cluster.broker
    for i in range(12):  # undecodable entries: each is dead-lettered at once, in this order
        b.publish_raw(2, b"m\xc1" + str(i).encode())
        wait_until(lambda i=i: w.counts["dead_lettered"] == i + 1, 20, f"garbage {i} to be dead-lettered")
    assert b.dead_letter_count() == 5
    kept = [d["payload"] for d in b.dead_letters()]
    assert kept == [b"m\xc1" + str(i).encode() for i in range(7, 12)]  # the oldest went


# -- idempotency keys --------------------------------------------------------------------------
def test_idempotency_ttl_must_be_positive(redis_url):
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="idempotency_ttl"):
            RedisBroker(redis_url, idempotency_ttl=bad)


def test_every_idempotency_key_expires(cluster):
    w = cluster.engine(idempotency_ttl=30)
    cluster.worker(engine=w)
    r = cluster.producer.options(idempotency_key=f"{cluster.prefix}-once").add_task(rt.add, 1, 2)
    assert r.wait(20) == 3
    done = cluster.broker.done_key(f"{cluster.prefix}-once")
    assert 0 < cluster.r.pttl(done) <= 30_000


# -- workflow runs -----------------------------------------------------------------------------
def test_workflow_ttl_validation(redis_url):
    assert RedisBroker(redis_url).workflow_ttl == 7 * 86400
    for bad in (0, -1, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="workflow_ttl"):
            RedisBroker(redis_url, workflow_ttl=bad)


def test_a_run_that_never_ends_expires(cluster):
    p = cluster.engine(workflow_ttl=600)
    wf = TaskChain("stuck", tasks=p)
    a = wf.step(rt.add, 1, 2)
    wf.step(rt.add, a, 1)
    r = wf.execute()  # no worker yet: nothing finishes
    assert 590_000 < cluster.r.pttl(p.broker.workflow_key(r.task_id)) <= 600_000
    # the longest step delay is added to the idle time allowed (a delayed step is not idle)
    wf = TaskChain("late", tasks=p)
    a = wf.step(rt.add, 1, 2)
    wf.step(rt.stamp_later, f"{cluster.prefix}:log", a)  # delay_ms=400 once released
    r = wf.execute()
    assert 600_000 < cluster.r.pttl(p.broker.workflow_key(r.task_id)) <= 600_400
    short = cluster.engine(workflow_ttl=0.2)
    wf = TaskChain("brief", tasks=short)
    wf.step(rt.add, 1, 2)
    r = wf.execute()
    wait_until(lambda: not cluster.r.exists(short.broker.workflow_key(r.task_id)), 20, "the idle run to expire")
    purge_others = [k for k in cluster.r.scan_iter(f"{cluster.prefix}:wf:*")]
    cluster.r.delete(*purge_others)  # the two runs above: the worker below sees only orphans
    # its queued steps are acknowledged without running once a worker sees their runs gone
    w = cluster.worker()
    wait_until(lambda: all(cluster.r.xlen(s) == 0 for s in short.broker.streams), 20, "the streams to empty")
    wait_until(lambda: w.counts["workflow_steps_skipped"] == 3, 20, "the three orphan steps to be skipped")
    assert w.counts["succeeded"] == 0


def test_a_step_that_succeeds_restarts_the_runs_countdown(cluster):
    p = cluster.engine(workflow_ttl=600)
    started, gate = f"{cluster.prefix}:started", f"{cluster.prefix}:gate"
    wf = TaskChain("slow", tasks=p)
    a = wf.step(rt.add, 1, 2, step_name="a")
    wf.step(rt.held, started, gate, a, step_name="b")
    r = wf.execute()
    key = p.broker.workflow_key(r.task_id)
    cluster.r.pexpire(key, 100_000)  # as if most of the run's idle time had passed
    cluster.worker()
    assert cluster.r.blpop([started], timeout=20) == (started.encode(), b"3")  # b runs: a succeeded
    assert cluster.r.pttl(key) > 500_000  # a's success restarted the countdown
    cluster.r.rpush(gate, 1)
    assert r.wait(20) == {"a": 3, "b": 3}
    # an ended run is kept result_ttl (not workflow_ttl)
    assert 0 < cluster.r.pttl(key) <= p.broker.result_ttl * 1000
