"""Distributed mode under attack (issue 13 review): each test reproduces a defect found by a
fresh-eyes review of the fault handling, through the public API against a real redis-server."""

from __future__ import annotations

import threading

import pytest
import redis_tasks as rt
from redis_helpers import prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)
from test_redis_worker_faults import FaultCluster, worker_log  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(redis_url, prefix, monkeypatch):
    c = FaultCluster(redis_url, prefix, monkeypatch)
    yield c
    c.close()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def test_one_unreadable_result_does_not_stop_the_other_callbacks(cluster):
    # the broker's one callback thread read every watched result with one pipeline: a result
    # key of the wrong type (WRONGTYPE) or a record it cannot decode raised out of its loop, and
    # the thread died: no add_callback of that broker ever ran again
    p = cluster.producer
    b = cluster.broker
    wrong_type = p.add_task(rt.add, 1, 1)
    b.redis.hset(b.result_key(wrong_type.task_id), "x", "1")
    garbage = p.add_task(rt.add, 1, 2)
    b.redis.rpush(b.result_key(garbage.task_id), b"mnot msgpack \xc1")
    got = []
    called = threading.Event()
    wrong_type.add_callback(got.append)
    garbage.add_callback(got.append)
    good = p.add_task(rt.add, 2, 3)

    def note(v):
        got.append(v)
        called.set()

    good.add_callback(note)
    cluster.worker(concurrency=4)
    assert called.wait(20), "the callback of a good result never ran"
    later = p.add_task(rt.add, 5, 5)
    again = threading.Event()
    later.add_callback(lambda v: again.set())
    assert again.wait(20), "the callback thread stopped"
    assert 5 in got


def test_a_commit_whose_reply_is_lost_does_not_dead_letter_the_task_twice(redis_url, prefix, monkeypatch):
    # the commit transaction was applied by Redis and its reply lost (connection reset): the
    # worker retried the whole commit, and the dead letter (and the failure record) was written
    # again: a redrive of the dead letters then ran the task twice
    from fault_proxy import FaultProxy

    with FaultProxy(_port(redis_url)) as proxy:
        c = FaultCluster(proxy.url, prefix, monkeypatch)
        try:
            b = c.broker
            lost = proxy.on_command(b.dead_key.encode(), "reset_after")
            r = c.producer.options(max_retries=0).add_task(rt.always_fails, 7)
            c.worker(concurrency=4)
            with pytest.raises(ValueError):
                r.wait(20)
            assert lost.fired.wait(20)
            wait_until(lambda: b.redis.xpending(b.streams[2], "workers")["pending"] == 0, 20, "the ack")
            c.stop_workers()
            assert b.dead_letter_count() == 1, b.dead_letters()
        finally:
            c.close()


def test_a_stopped_worker_leaves_no_commit_mark_behind(cluster):
    w = cluster.worker(concurrency=4)
    assert cluster.producer.add_task(rt.add, 1, 2).wait(20) == 3
    assert cluster.r.exists(cluster.broker.commit_mark_prefix + w.consumer)
    cluster.stop_workers()
    assert not cluster.r.exists(cluster.broker.commit_mark_prefix + w.consumer)


def test_stop_with_a_timeout_returns_by_then_while_redis_is_silent(redis_url, prefix, monkeypatch):
    # with the default socket timeout (30 s), a worker whose Redis went silent (no reset, no
    # reply: a dropped route) sat in its blocked read, then in the leave-the-groups call, for
    # a socket timeout each: stop(timeout=2) returned after 30-60 s instead of 2
    import time

    from fault_proxy import FaultProxy

    with FaultProxy(_port(redis_url)) as proxy:
        c = FaultCluster(redis_url, prefix, monkeypatch)
        try:
            eng = c.engine()
            eng.broker.__init__(proxy.url, prefix=prefix)  # the default socket_timeout
            w = c.worker(concurrency=4, engine=eng)
            assert c.producer.add_task(rt.add, 1, 1).wait(10) == 2
            proxy.blackhole(120.0)
            time.sleep(0.5)  # (the worker is now inside a silent read; not synchronisation of the outcome)
            t0 = time.monotonic()
            w.stop(timeout=2)
            c.workers[0][1].join(20)
            took = time.monotonic() - t0
            assert not c.workers[0][1].is_alive() and took < 10, took
            c.workers.clear()
        finally:
            proxy.blackhole(0)
            c.close()


def test_a_callback_that_raises_system_exit_does_not_stop_the_others(cluster):
    # callbacks run in the broker's one callback thread: one raising SystemExit (a BaseException,
    # e.g. sys.exit() in a callback) ended that thread silently, and no other callback ran again
    p = cluster.producer
    first = p.add_task(rt.add, 1, 1)

    def leave(_v):
        raise SystemExit(3)

    first.add_callback(leave)
    cluster.worker(concurrency=4)
    assert first.wait(20) == 2
    ran = threading.Event()
    second = p.add_task(rt.add, 2, 2)
    second.add_callback(lambda v: ran.set())
    assert ran.wait(20), "the callback thread stopped"


@pytest.mark.parametrize("which", ["done", "claim"])
def test_an_idempotency_key_of_the_wrong_type_fails_only_its_task(cluster, which):
    # the key claim script raised WRONGTYPE for the whole batch: the fetched tasks were released,
    # taken again from the worker's pending list, and the script raised again, forever: no task
    # fetched with it ever ran, and the worker spun on them
    p = cluster.producer
    b = cluster.broker
    key = f"{cluster.prefix}-wrong"
    b.redis.hset(b.done_key(key) if which == "done" else b.claim_key(key), "x", "1")
    with p.batch():
        goods = [p.add_task(rt.add, i, 1) for i in range(10)]
        bad = p.options(idempotency_key=key).add_task(rt.add, 100, 1)
        goods += [p.options(idempotency_key=f"{key}-ok{i}").add_task(rt.add, i, 2) for i in range(5)]
    cluster.worker(concurrency=32)
    assert [r.wait(20) for r in goods] == [i + 1 for i in range(10)] + [i + 2 for i in range(5)]
    with pytest.raises(Exception, match="WRONGTYPE|idempotency"):
        bad.wait(20)
    wait_until(lambda: b.redis.xpending(b.streams[2], "workers")["pending"] == 0, 20, "every entry acknowledged")
    assert b.dead_letter_count() == 1


def test_max_result_bytes_of_any_integer_type_is_taken_as_the_other_counts_are(redis_url):
    # dead_letter_maxlen and max_deliveries take numpy integers; max_result_bytes refused them
    # ("must be an integer")
    np = pytest.importorskip("numpy")
    from catzilla_tasks.brokers import RedisBroker

    b = RedisBroker(redis_url, max_result_bytes=np.int64(1 << 20))
    try:
        assert b.max_result_bytes == 1 << 20 and type(b.max_result_bytes) is int
    finally:
        b.close()
    for bad in (np.float64(4096), np.bool_(True), True, 1023, 0, -1, 4096.0, 2**40, np.int64(2**40)):
        with pytest.raises(ValueError, match="max_result_bytes"):
            RedisBroker(redis_url, max_result_bytes=bad)


def test_a_worker_stopped_while_redis_is_unreachable_at_start_returns_cleanly(prefix, worker_log):
    # SIGTERM (stop()) to a worker that had not reached Redis yet: run() raised ConnectionError
    # (the CLI ended with a traceback and exit status 1) instead of returning
    from redis_helpers import free_port

    from catzilla_tasks import BackgroundTasks
    from catzilla_tasks.brokers import RedisBroker, Worker

    eng = BackgroundTasks(workers=2, broker=RedisBroker(f"redis://127.0.0.1:{free_port()}/0", prefix=prefix))
    try:
        w = Worker(eng, concurrency=2)
        retrying = worker_log("broker is unavailable")
        raised = []

        def run():
            try:
                w.run()
            except BaseException as exc:  # noqa: BLE001 - whatever run() raises is the failure
                raised.append(exc)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        assert retrying.event.wait(20)
        w.stop()
        t.join(20)
        assert not t.is_alive() and raised == []
    finally:
        eng.shutdown(wait_for_completion=False, timeout=10)
        eng.broker.close()


def test_two_connection_resets_do_not_shrink_the_result_cap_when_the_servers_limit_is_known(redis_url, prefix,
                                                                                           monkeypatch):
    # two commits in a row holding a record over 1 MiB lost their connection (a network flap) while
    # the server answered a PING: the worker took it as the server's proto-max-bulk-len, which it
    # had read with CONFIG GET (512 MiB), and from then on failed every result of that size
    import redis_fault_tasks as ft
    from fault_proxy import FaultProxy

    with FaultProxy(_port(redis_url)) as proxy:
        c = FaultCluster(proxy.url, prefix, monkeypatch)
        try:
            flap = proxy.on_command(b"EXEC", "reset_before", times=2)
            r = c.producer.add_task(ft.blob, 2 * 1024 * 1024)
            c.worker(concurrency=4)
            assert len(r.wait(30)) == 2 * 1024 * 1024
            assert flap.fired.is_set()
            again = c.producer.add_task(ft.blob, 2 * 1024 * 1024)
            assert len(again.wait(30)) == 2 * 1024 * 1024
        finally:
            c.close()


@pytest.mark.timeout(60)
def test_wait_with_a_timeout_returns_by_then_while_redis_is_silent(redis_url, prefix, monkeypatch):
    # waiters have their own connections, with no socket timeout (a blocking BLMOVE may last as
    # long as asked): on a Redis gone silent (a dropped route: no reset, no reply) wait(3) sat in
    # its read for good instead of raising TimeoutError after 3 s
    import time

    from fault_proxy import FaultProxy

    with FaultProxy(_port(redis_url)) as proxy:
        c = FaultCluster(redis_url, prefix, monkeypatch)
        try:
            p = c.engine()
            p.broker.__init__(proxy.url, prefix=prefix)
            r = p.add_task(rt.add, 1, 1)  # no worker: it stays pending
            with pytest.raises(TimeoutError):
                r.wait(0.5)  # (the waiters' connection is open)
            proxy.blackhole(120.0)
            out = []
            t = threading.Thread(target=lambda: out.append(pytest.raises(TimeoutError, r.wait, 3)), daemon=True)
            t0 = time.monotonic()
            t.start()
            t.join(20)
            assert not t.is_alive() and out, f"wait(3) still blocked after {time.monotonic() - t0:.0f} s"
        finally:
            proxy.blackhole(0)
            c.close()


@pytest.mark.parametrize("how", ["option", "url"])
def test_decode_responses_is_refused_at_the_call(redis_url, how):
    # a client that decodes replies to str (a common redis-py habit, also ?decode_responses=true
    # in the URL) was accepted: every task payload then came back as str, and every task was
    # dead-lettered ("empty or non-bytes payload"), results unreadable
    from catzilla_tasks.brokers import RedisBroker

    with pytest.raises(ValueError, match="decode_responses"):
        if how == "option":
            RedisBroker(redis_url, decode_responses=True)
        else:
            RedisBroker(redis_url + "?decode_responses=true")


def test_add_callback_after_the_broker_was_closed_still_runs(cluster):
    # close() stopped the broker's callback thread but kept it as the broker's: a result's
    # add_callback after that (the broker's clients reconnect on use) was never called
    p = cluster.producer
    first = p.add_task(rt.add, 1, 1)
    first.add_callback(lambda v: None)  # the callback thread starts
    cluster.broker.close()
    r = p.add_task(rt.add, 2, 2)
    ran = threading.Event()
    r.add_callback(lambda v: ran.set())
    cluster.worker(concurrency=4)
    assert ran.wait(20), "the callback never ran"
