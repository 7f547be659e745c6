"""Idempotency keys hold for copies running at once (issue 13, item 7): a copy runs only after
claiming its key (one Lua script), a lease its worker renews while it runs; a second copy waits
and adopts the first one's outcome; a killed holder's lease runs out and one copy takes over.
Against a real redis-server.

Since issue 19 a second add_task with a key returns the first task (submit-time deduplication,
test_redis_dedup.py); the copies here are published as if the key's submit record had expired
(``copy``): what keeps them from running twice is the worker-side claim tested here."""

from __future__ import annotations

import collections
import os
import signal
import time

import pytest
import redis_tasks as rt
from redis_helpers import prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)
from test_redis_broker import Cluster
from test_redis_faults import start_worker


def copy(c, key, func, *args):
    """Publish a copy of a keyed task that submit-time deduplication does not see (its record
    gone, as after its TTL): the worker-side claim is what keeps it from running twice."""
    res = c.producer.options(idempotency_key=key).add_task(func, *args)
    c.r.delete(c.broker.dedup_key(key))
    return res


@pytest.fixture
def cluster(redis_url, prefix, monkeypatch):
    c = Cluster(redis_url, prefix, monkeypatch)
    yield c
    c.close()


@pytest.mark.timeout(120)
def test_two_copies_fetched_together_by_one_worker_run_once(cluster):
    r = cluster.r
    started, gate = f"{cluster.prefix}:started", f"{cluster.prefix}:gate"
    key = f"{cluster.prefix}-order-1"
    # both queued before the worker starts: one fetch takes them together
    first = copy(cluster, key, rt.held, started, gate, "a")
    second = copy(cluster, key, rt.held, started, gate, "b")
    w = cluster.worker(concurrency=4)
    _, ran = r.blpop([started], timeout=20)
    # the other copy found the key claimed: it waits (in the delayed set), it does not run
    wait_until(lambda: w.counts["deferred_idempotent"] >= 2, 20, "the second copy to wait twice")
    assert r.llen(started) == 0
    assert r.get(cluster.broker.claim_key(key)) is not None
    r.rpush(gate, 1)
    assert first.wait(20) == second.wait(20) == ran.decode()  # the waiting copy adopts the outcome
    assert r.llen(started) == 0
    wait_until(lambda: w.counts["skipped_idempotent"] == 1, 20, "the worker to count the adopted outcome")
    assert not r.exists(cluster.broker.claim_key(key))  # the claim went with the commit
    assert r.get(cluster.broker.done_key(key)) in (first.task_id.encode(), second.task_id.encode())


@pytest.mark.timeout(180)
def test_many_copies_on_two_workers_one_effect_per_key(cluster):
    r = cluster.r
    log = f"{cluster.prefix}:log"
    results = collections.defaultdict(list)
    for n in range(6):
        for k in range(8):
            results[k].append(copy(cluster, f"{cluster.prefix}-k{k}", rt.record_slow, log, f"{k}:{n}", 0.05))
    cluster.worker(concurrency=8)
    cluster.worker(concurrency=8)
    for _k, rs in results.items():
        values = {res.wait(60) for res in rs}
        assert len(values) == 1, values  # every copy of a key: the one outcome
    runs = collections.Counter(x.decode().split(":")[0] for x in r.lrange(log, 0, -1))
    assert runs == {str(k): 1 for k in range(8)}  # one effect per key


@pytest.mark.timeout(120)
def test_the_claim_is_renewed_while_a_long_copy_runs(cluster):
    # visibility timeout (and lease) 1 s; the first copy runs until the gate opens
    w = cluster.worker(concurrency=4, visibility_timeout=1.0)
    r = cluster.r
    started, gate = f"{cluster.prefix}:started", f"{cluster.prefix}:gate"
    key = f"{cluster.prefix}-long"
    first = copy(cluster, key, rt.held, started, gate, "a")
    assert r.blpop([started], timeout=20) == (started.encode(), b"a")
    second = copy(cluster, key, rt.held, started, gate, "b")
    t0 = time.monotonic()
    # the passage of time is what is tested here: many leases long, the first copy still holds it
    wait_until(lambda: time.monotonic() - t0 > 4.0 and w.counts["deferred_idempotent"] >= 3, 30,
               "several leases to pass with the second copy waiting")
    assert r.lrange(started, 0, -1) == []  # the second copy never ran
    r.rpush(gate, 1)
    assert first.wait(20) == second.wait(20) == "a"
    assert r.llen(started) == 0


@pytest.mark.timeout(120)
def test_a_copy_that_fails_gives_the_key_back(cluster):
    w = cluster.worker(concurrency=4)
    r = cluster.r
    key = f"{cluster.prefix}-fails"
    with pytest.raises(ValueError):
        copy(cluster, key, rt.always_fails, 1).wait(20)
    assert not r.exists(cluster.broker.claim_key(key)) and not r.exists(cluster.broker.done_key(key))
    # a later copy runs (the failure recorded no effect)
    assert copy(cluster, key, rt.add, 1, 2).wait(20) == 3
    assert w.counts["skipped_idempotent"] == 0


@pytest.mark.timeout(180)
def test_a_killed_holder_loses_its_claim_after_the_lease_and_one_copy_takes_over(redis_url, prefix, monkeypatch):
    c = Cluster(redis_url, prefix, monkeypatch)
    try:
        r, b = c.r, c.broker
        started, gate = f"{prefix}:started", f"{prefix}:gate"
        key = f"{prefix}-killed"
        first = copy(c, key, rt.held, started, gate, "a")
        a = start_worker(redis_url, prefix, concurrency=4, vt=1.0)
        try:
            assert r.blpop([started], timeout=30) == (started.encode(), b"a")
            claim = r.get(b.claim_key(key))
            assert claim is not None
            os.kill(a.pid, signal.SIGKILL)
            a.wait(10)
        finally:
            a.kill()
            a.wait(10)
        second = copy(c, key, rt.held, started, gate, "b")
        r.rpush(gate, *([1] * 4))  # what runs from now on finishes at once
        w = c.worker(concurrency=4, visibility_timeout=1.0)
        out1, out2 = first.wait(30), second.wait(30)
        # the dead worker's copy (reclaimed after 1 s) and the second copy: one ran, the other adopted
        assert out1 == out2 and out1 in ("a", "b")
        assert r.llen(started) == 1 and r.lindex(started, 0) == out1.encode()
        # counted once the transaction that woke the waiters is applied
        wait_until(lambda: w.counts["skipped_idempotent"] == 1, 20, "the worker to count the adopted outcome")
        assert not r.exists(b.claim_key(key))
    finally:
        c.close()
