"""A reviewer's attacks on issue 13, items 6, 7, 9 and 10 (idempotency claims, re-drives,
bounds): each test is a defect found by trying to break them. Against a real redis-server."""

from __future__ import annotations

import pytest
import redis_tasks as rt
from redis_helpers import prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)
from test_redis_broker import Cluster

from catzilla_tasks.brokers import RedisBroker


@pytest.fixture
def cluster(redis_url, prefix, monkeypatch):
    c = Cluster(redis_url, prefix, monkeypatch)
    yield c
    c.close()


# -- item 10: bounds ---------------------------------------------------------------------------
def test_dead_letter_maxlen_past_what_redis_takes_is_refused(redis_url):
    # XADD MAXLEN takes a signed 64-bit count: a larger one made every dead-letter XADD fail
    # ("value is not an integer or out of range"), so no task could ever be dead-lettered
    for bad in (2**63, 2**64, 10**30):
        with pytest.raises(ValueError, match="dead_letter_maxlen"):
            RedisBroker(redis_url, dead_letter_maxlen=bad)
    b = RedisBroker(redis_url, dead_letter_maxlen=2**63 - 1)  # the largest Redis takes
    b.close()


@pytest.mark.timeout(120)
def test_a_stopped_worker_leaves_no_consumer_behind(cluster):
    # every worker process is a consumer of the four groups under a fresh name; a worker that
    # stopped cleanly (nothing pending) must not leave it there, or each restart adds four
    # entries to Redis for ever
    b = cluster.broker
    for _ in range(3):
        w = cluster.worker(concurrency=2)
        assert cluster.producer.add_task(rt.add, 1, 1).wait(20) == 2
        cluster.stop_workers()
    for s in b.streams:
        for g in cluster.r.xinfo_groups(s):
            assert g["consumers"] == 0, (s, g)
    del w


@pytest.mark.timeout(120)
def test_a_stopping_worker_keeps_a_consumer_that_still_has_pending_entries(cluster):
    # only a consumer with nothing pending is removed (XGROUP DELCONSUMER drops its pending
    # entries: they would never be redelivered). Here an entry was delivered to the worker's
    # name but never seen by it (a reply lost with the connection) when it stops.
    b, r = cluster.broker, cluster.r
    started, gate = f"{cluster.prefix}:started", f"{cluster.prefix}:gate"
    w = cluster.worker(concurrency=1)
    held = cluster.producer.add_task(rt.held, started, gate, "a")
    assert r.blpop([started], timeout=20) == (started.encode(), b"a")  # full: it fetches no more
    r.xadd(b.streams[3], {"m": b"delivered, never seen"})
    assert r.xreadgroup("workers", w.consumer, {b.streams[3]: ">"}, count=1)
    w.stop()
    r.rpush(gate, 1)
    assert held.wait(20) == "a"
    cluster.stop_workers()
    pending = {c["name"]: c["pending"] for c in r.xinfo_consumers(b.streams[3], "workers")}
    assert pending.get(w.consumer.encode()) == 1  # still there: reclaimed by a worker after the lease
    for s in b.streams[:3]:  # the groups where it had nothing pending: gone
        assert r.xinfo_groups(s)[0]["consumers"] == 0


# -- item 9: re-drives -------------------------------------------------------------------------
def _dead_letter(b: RedisBroker, i: int, prio: object = 2) -> str:
    payload = b.serializer.dumps([f"t{i}", "redis_tasks.add", [i, "x"], {}, 0, None])
    return b.redis.xadd(b.dead_key, {"m": payload, "e": "TypeError: no", "n": "redis_tasks.add", "i": f"t{i}",
                                     "p": prio, "t": 0, "w": "w1"}).decode()


@pytest.mark.timeout(60)
def test_redrive_all_moves_only_what_was_dead_when_called(redis_url, prefix):
    # a worker that fails a re-driven task again dead-letters it anew, after the ones being
    # re-driven: redrive(None) read those too and sent them round again, for as long as the
    # worker kept up (a poison task and a slow link: it never returned)
    b = RedisBroker(redis_url, prefix=prefix)
    try:
        for i in range(3):
            _dead_letter(b, i)
        read = b.redis.xrange
        again = iter(range(100, 200))

        def xrange(*args, **kwargs):
            got = read(*args, **kwargs)
            _dead_letter(b, next(again))  # meanwhile, a worker dead-letters a task again
            return got

        b.redis.xrange = xrange
        assert b.redrive(None) == 3
        b.redis.xrange = read
        left = [d["task_id"] for d in b.dead_letters()]
        assert left and all(int(t[1:]) >= 100 for t in left)  # the newer ones stay, for the next call
    finally:
        b.close()


@pytest.mark.timeout(60)
def test_a_dead_letter_with_a_bad_priority_or_time_field_neither_breaks_listing_nor_redrive(redis_url, prefix):
    # the priority field is read back from Redis: one that is not 0-3 made dead_letters() (and
    # `dead-letters list`) raise for the whole stream, and redrive() raise half-way
    b = RedisBroker(redis_url, prefix=prefix)
    try:
        for i, prio in enumerate([b"x", b"", b"9", b"-1", b"1"]):
            _dead_letter(b, i, prio)
        b.redis.xadd(b.dead_key, {"m": b"", "p": b"3", "t": b"soon"})  # nor a bad time
        got = b.dead_letters()
        assert [d["priority"] for d in got] == ["NORMAL", "NORMAL", "NORMAL", "NORMAL", "HIGH", "LOW"]
        assert got[-1]["at"] == 0.0
        assert b.redrive(None) == 6
        assert [b.redis.xlen(s) for s in b.streams] == [0, 1, 4, 1]
    finally:
        b.close()


# -- item 7: idempotency claims ----------------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_live_holder_takes_its_lapsed_claim_back(cluster):
    # the claim's lease ran out while its copy still ran (its worker stalled past the lease: a
    # task holding the GIL in C code for seconds, a Redis outage); nobody took the key
    # meanwhile. The heartbeat renewed only a claim still present, so the holder ran on with no
    # claim and a copy sent later ran alongside it: two effects with the holder alive
    w = cluster.worker(concurrency=4, visibility_timeout=1.0)
    p, r, b = cluster.producer, cluster.r, cluster.broker
    started, gate = f"{cluster.prefix}:started", f"{cluster.prefix}:gate"
    key = f"{cluster.prefix}-lapsed"
    first = p.options(idempotency_key=key).add_task(rt.held, started, gate, "a")
    assert r.blpop([started], timeout=20) == (started.encode(), b"a")
    token = r.get(b.claim_key(key))
    assert token is not None
    r.delete(b.claim_key(key))  # the lease ran out (what a stall past it does)
    wait_until(lambda: r.get(b.claim_key(key)) == token, 20, "the holder's heartbeat to take its claim back")
    assert 0 < r.pttl(b.claim_key(key)) <= 1000
    r.delete(b.dedup_key(key))  # a copy past submit-time deduplication (its record expired, say)
    second = p.options(idempotency_key=key).add_task(rt.held, started, gate, "b")
    wait_until(lambda: w.counts["deferred_idempotent"] >= 1, 20, "the second copy to wait")
    assert r.llen(started) == 0  # it did not run alongside the holder
    r.rpush(gate, 1)
    assert first.wait(20) == second.wait(20) == "a"
    assert r.llen(started) == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("lands", ["before the ack", "after the ack"])
def test_a_heartbeat_from_before_the_commit_does_not_bring_the_claim_back(cluster, lands):
    # a heartbeat takes its list of claims, then the copy's commit drops the claim, then the
    # heartbeat's renewal reaches Redis: it must not leave a claim for a copy that has ended
    # (that claim would make the key's next copy wait a whole lease). The commit stores the
    # outcome (and wakes the waiters) before the entry is acknowledged, in a second step: the
    # renewal can land in between, while the entry is still pending for this worker (under
    # load it did: got == [1], and the claim stayed for a lease). Both orders, made certain.
    import threading

    w = cluster.worker(concurrency=4, visibility_timeout=1.0)
    p, r, b = cluster.producer, cluster.r, cluster.broker
    started, gate = f"{cluster.prefix}:started", f"{cluster.prefix}:gate"
    key = f"{cluster.prefix}-stale"
    real, real_ack = w.session._idem_renew, w.session.ack
    in_renew, go, renewed, acked = threading.Event(), threading.Event(), threading.Event(), threading.Event()
    got = []

    def held_renew(keys, args, client=None):
        in_renew.set()
        assert go.wait(30)
        got.append(real(keys=keys, args=args))  # at once, after the commit (its reply is not used)
        renewed.set()
        w.session._idem_renew = real

    def held_ack(pending):
        if lands == "before the ack":
            assert renewed.wait(30)
        real_ack(pending)
        acked.set()

    first = p.options(idempotency_key=key).add_task(rt.held, started, gate, "a")
    assert r.blpop([started], timeout=20) == (started.encode(), b"a")
    w.session._idem_renew = held_renew
    w.session.ack = held_ack
    assert in_renew.wait(20)  # a heartbeat has its list of claims (the copy's among them)
    r.rpush(gate, 1)
    assert first.wait(20) == "a"  # committed: done, claim dropped
    assert not r.exists(b.claim_key(key))
    if lands == "after the ack":
        assert acked.wait(20)
    go.set()
    assert renewed.wait(20) and acked.wait(20)
    assert got == ([0] if lands == "after the ack" else [1])  # (before the ack it is still ours)
    assert not r.exists(b.claim_key(key)), r.pttl(b.claim_key(key))


@pytest.mark.timeout(120)
def test_consumers_of_killed_workers_are_removed_once_nothing_is_pending(cluster):
    # a worker killed with kill -9 never removes its consumer; once its entries are reclaimed
    # (nothing pending) and it has been idle for ten visibility timeouts, a live worker does
    b, r = cluster.broker, cluster.r
    for s in b.streams:
        r.xgroup_create(s, "workers", id="0", mkstream=True)
        r.xgroup_createconsumer(s, "workers", "killed-1")  # nothing pending
    r.xadd(b.streams[2], {"m": b.serializer.dumps(["t1", "redis_tasks.add", [1, 2], {}])})
    r.xgroup_createconsumer(b.streams[2], "workers", "killed-2")
    assert r.xreadgroup("workers", "killed-2", {b.streams[2]: ">"}, count=1)  # killed holding t1
    w = cluster.worker(concurrency=4, visibility_timeout=0.3)
    assert b.result("t1").wait(30) == 3  # reclaimed from killed-2 and run

    def names():
        return {c["name"] for s in b.streams for c in r.xinfo_consumers(s, "workers")}

    wait_until(lambda: not names() & {b"killed-1", b"killed-2"}, 30, "the dead consumers to be removed")
    assert w.consumer.encode() in names()


def test_queue_names_that_share_the_keys_of_results_and_idempotency_are_refused(redis_url):
    # P:<queue>:q0 is also P:done:<key> for queue "done" and key "q0": an idempotency key (a
    # value users often take from a request) could name a stream, and the claim script's GET
    # of it failed (WRONGTYPE) with the task counted in flight: the worker hung for good
    for queue in ("done", "claim", "r", "wf"):
        with pytest.raises(ValueError, match="queue"):
            RedisBroker(redis_url, queue=queue)
    RedisBroker(redis_url, queue="done-jobs").close()


def test_broker_numbers_of_any_real_type_are_taken_as_task_options_are(redis_url):
    # TaskConfig takes any real number (numpy, Fraction); the broker refused numpy.float32 and
    # numpy.int64 ("must be a number"), and NaN of those types must still be refused
    np = pytest.importorskip("numpy")
    from fractions import Fraction

    b = RedisBroker(redis_url, result_ttl=np.float32(5.5), visibility_timeout=np.int64(30),
                    idempotency_ttl=Fraction(1, 2), workflow_ttl=np.float16(60), dead_letter_maxlen=np.int64(7),
                    max_deliveries=np.int32(3))
    try:
        assert (b.result_ttl, b.visibility_timeout, b.idempotency_ttl, b.workflow_ttl) == (5.5, 30.0, 0.5, 60.0)
        assert (b.dead_letter_maxlen, b.max_deliveries) == (7, 3)
        assert all(type(v) is float for v in (b.result_ttl, b.visibility_timeout, b.idempotency_ttl, b.workflow_ttl))
        assert type(b.dead_letter_maxlen) is int and type(b.max_deliveries) is int
    finally:
        b.close()
    for field in ("result_ttl", "visibility_timeout", "idempotency_ttl", "workflow_ttl"):
        for bad in (np.float32("nan"), np.float64("inf"), np.bool_(True), True):
            with pytest.raises(ValueError, match=field):
                RedisBroker(redis_url, **{field: bad})
    for field in ("dead_letter_maxlen", "max_deliveries"):
        for bad in (np.float64(3), np.bool_(True), np.int64(0)):
            with pytest.raises(ValueError, match=field):
                RedisBroker(redis_url, **{field: bad})


@pytest.mark.timeout(120)
def test_a_redriven_tasks_new_outcome_is_what_its_waiters_get(cluster):
    # the dead-lettered task's failure stayed in its result list, and the re-run's outcome was
    # pushed behind it: status stayed FAILED and wait() raised the old error until result_ttl
    w = cluster.worker(concurrency=4)
    b = cluster.broker
    res = cluster.producer.add_task(rt.flaky, cluster.prefix, 4)  # fails 4 times: all its attempts
    with pytest.raises(ConnectionError, match="attempt 4"):
        res.wait(20)
    wait_until(lambda: b.dead_letter_count() == 1, 20, "the dead letter")
    assert b.redrive(None) == 1
    again = b.result(res.task_id)
    assert again.wait(20) == 5  # the fifth attempt succeeds
    assert again.status.name == "SUCCEEDED"
    assert cluster.r.llen(b.result_key(res.task_id)) == 1
    wait_until(lambda: w.counts["succeeded"] == 1, 20, "the worker to count it (after its transaction)")
