"""Distributed mode under faults: kill -9 of a worker with hundreds of tasks in flight
(10,000 tasks), a Redis restart with append-only persistence, graceful SIGTERM."""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import threading

import redis_tasks as rt
from redis_helpers import RedisServer, prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)

from catzilla_tasks import BackgroundTasks
from catzilla_tasks.brokers import RedisBroker, Worker

TESTS = os.path.dirname(os.path.abspath(__file__))


def start_worker(url: str, prefix: str, concurrency: int, vt: float = 60.0) -> subprocess.Popen:
    env = dict(os.environ, CT_TEST_REDIS_URL=url, CT_TEST_PREFIX=prefix, CT_TEST_VT=str(vt),
               PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [sys.executable, "-m", "catzilla_tasks.cli", "worker", "redis_tasks:tasks", "--concurrency", str(concurrency)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def producer(url: str, prefix: str, **kw) -> BackgroundTasks:
    return BackgroundTasks(workers=2, broker=RedisBroker(url, prefix=prefix, **kw))


def count_results(broker: RedisBroker, ids: list[str]) -> int:
    pipe = broker.redis.pipeline(transaction=False)
    for t in ids:
        pipe.exists(broker.result_key(t))
    return sum(pipe.execute())


def test_kill_9_worker_with_hundreds_in_flight_nothing_lost(redis_url, prefix):
    n = 10_000
    p = producer(redis_url, prefix)
    b = p.broker
    log = f"{prefix}:runs"
    rnd = random.Random(8)
    keyed = {}
    results = []
    with p.batch():
        for i in range(n):
            secs = rnd.uniform(0.02, 0.15)
            if i % 10 == 0:
                keyed[i] = secs
                results.append(p.options(idempotency_key=f"{prefix}-k{i}").add_task(rt.run_once, log, i, secs))
            else:
                results.append(p.add_task(rt.run_once, log, i, secs))
    ids = [r.task_id for r in results]
    a = start_worker(redis_url, prefix, concurrency=400, vt=1.0)
    try:
        wait_until(lambda: b.redis.llen(log) >= 3000, 60, "worker A to run 3000 tasks")
        os.kill(a.pid, signal.SIGKILL)
        a.wait(10)
    finally:
        a.kill()
    # what A held, unacknowledged, when it died
    pending = b.redis.xpending_range(b.streams[2], "workers", min="-", max="+", count=10_000)
    assert 100 <= len(pending) <= 400, len(pending)  # hundreds in flight, never more than its capacity
    held = set()
    for entry in pending:
        (_, fields), = b.redis.xrange(b.streams[2], min=entry["message_id"], max=entry["message_id"])
        held.add(b.serializer.loads(fields[b"m"])[2][1])
    ran_before = collections.Counter(int(x) for x in b.redis.lrange(log, 0, -1))
    assert all(c == 1 for c in ran_before.values())
    c = start_worker(redis_url, prefix, concurrency=400, vt=1.0)  # reclaims A's tasks after 1 s
    try:
        wait_until(lambda: count_results(b, ids) == n, 120, "all 10,000 results")
        runs = collections.Counter(int(x) for x in b.redis.lrange(log, 0, -1))
        assert set(runs) == set(range(n))  # every task ran: none lost
        dups = {i for i, k in runs.items() if k > 1}
        assert dups <= held  # duplicates only among the unacknowledged
        assert all(runs[i] == 1 for i in keyed if i not in held)
        assert [r.wait(0) for r in results[:50]] == list(range(50))
        # a producer that re-sends its keyed tasks (it did not see them acknowledged, say):
        # those already finished are no-ops with the first run's result
        with p.batch():
            again = [
                p.options(idempotency_key=f"{prefix}-k{i}").add_task(rt.run_once, log, i, s) for i, s in keyed.items()
            ]
        assert [r.wait(30) for r in again] == list(keyed)
        after = collections.Counter(int(x) for x in b.redis.lrange(log, 0, -1))
        assert after == runs  # none of them ran again
        # a result is stored before its entry is acknowledged: wait for the last ack
        wait_until(lambda: b.redis.xpending(b.streams[2], "workers")["pending"] == 0, 30, "every entry acknowledged")
        assert b.redis.xlen(b.streams[2]) == 0  # acknowledged entries are deleted
        c.send_signal(signal.SIGTERM)
        out, _ = c.communicate(timeout=30)
        assert c.returncode == 0, out
        assert "reclaimed" in out
    finally:
        c.kill()
        p.shutdown(wait_for_completion=False)


def test_sigterm_stops_fetching_finishes_in_flight_and_acknowledges(redis_url, prefix):
    p = producer(redis_url, prefix)
    b = p.broker
    log = f"{prefix}:slow"
    with p.batch():
        # 1.5 s each: the SIGTERM reaches the worker while its first 8 run, however slow the
        # machine (with 0.3 s, a signal late by that much let the worker start a second round)
        rs = [p.add_task(rt.record_slow, log, i, 1.5) for i in range(40)]
    w = start_worker(redis_url, prefix, concurrency=8)
    try:
        wait_until(lambda: b.redis.llen(log) >= 4, 30, "tasks to start")
        w.send_signal(signal.SIGTERM)
        out, _ = w.communicate(timeout=30)
    finally:
        w.kill()
    assert w.returncode == 0, out
    assert "worker stopped" in out
    started = [int(x) for x in b.redis.lrange(log, 0, -1)]
    assert 4 <= len(started) <= 8
    assert b.redis.xpending(b.streams[2], "workers")["pending"] == 0  # all it held: finished and acked
    assert all(rs[i].wait(0) == i for i in started)  # every started task finished, with its result
    assert b.redis.xlen(b.streams[2]) == 40 - len(started)  # the rest wait for another worker
    p.shutdown(wait_for_completion=False)


def test_redis_restart_with_append_only_persistence_keeps_queued_tasks(prefix, monkeypatch):
    srv = RedisServer(appendonly=True)
    monkeypatch.setenv("CT_TEST_REDIS_URL", srv.url)
    try:
        p = producer(srv.url, prefix)
        b = p.broker
        log = f"{prefix}:aof"
        with p.batch():
            rs = [p.add_task(rt.record, log, i) for i in range(500)]
            rs += [p.options(delay_ms=200).add_task(rt.record, log, 500 + i) for i in range(20)]
        srv.kill()  # kill -9: only what the append-only file holds survives
        srv.start()
        assert b.queued()["NORMAL"] == 500 and b.queued()["delayed"] == 20
        eng = BackgroundTasks(workers=4, broker=RedisBroker(srv.url, prefix=prefix))
        rt.register(eng)
        w = Worker(eng, concurrency=50)
        t = threading.Thread(target=w.run, daemon=True)
        t.start()
        assert [r.wait(30) for r in rs] == list(range(520))
        # and a restart while the worker runs: it reconnects, what it held is still pending
        with p.batch():
            rs2 = [p.add_task(rt.record_slow_retrying, log, 1000 + i, 0.05) for i in range(200)]
        wait_until(lambda: b.redis.llen(log) >= 560, 30, "the second batch to start")
        srv.kill()
        srv.start()
        assert [r.wait(60) for r in rs2] == [1000 + i for i in range(200)]
        assert set(int(x) for x in b.redis.lrange(log, 0, -1)) == set(range(520)) | set(range(1000, 1200))
        w.stop()
        t.join(30)
        assert not t.is_alive()
        assert b.redis.xpending(b.streams[2], "workers")["pending"] == 0
        eng.shutdown(wait_for_completion=False)
        p.shutdown(wait_for_completion=False)
    finally:
        srv.stop()
