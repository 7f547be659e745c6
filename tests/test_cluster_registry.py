"""The cluster registry against a real redis-server: worker processes register and beat, a killed
one shows as lost with the tasks it held, a stopped one deregisters; the figures per task name
(outcomes, merged histograms, failures) match what was run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import redis_tasks as rt
from redis_helpers import prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)

from catzilla_tasks import BackgroundTasks
from catzilla_tasks.brokers import RedisBroker, Worker
from catzilla_tasks.brokers.cluster import ClusterView
from catzilla_tasks.brokers.registry import (
    LOST_AFTER_BEATS,
    TaskFigures,
    bucket,
    bucket_upper_ns,
    cluster_key,
    merge,
    percentile,
)

TESTS = os.path.dirname(os.path.abspath(__file__))
BEAT = 0.2


def start_worker(url: str, prefix: str, concurrency: int = 4, vt: float = 1.0, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, CT_TEST_REDIS_URL=url, CT_TEST_PREFIX=prefix, CT_TEST_VT=str(vt),
               PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [sys.executable, "-m", "catzilla_tasks.cli", "worker", "redis_tasks:tasks", "--concurrency", str(concurrency),
         "--heartbeat", str(BEAT), *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)


def test_buckets_are_the_engines():
    with BackgroundTasks(workers=1) as eng:
        bounds = eng._monitor_raw()["bounds_ns"]
    assert [bucket_upper_ns(i) for i in range(len(bounds))] == bounds
    for ns in (0, 1, 1023, 1024, 1500, 2047, 2048, 10**6, 10**9, 3 * 10**9 + 7):
        i = bucket(ns)
        assert (bucket_upper_ns(i - 1) if i else 0) <= ns < bucket_upper_ns(i)


def test_percentiles_come_from_merged_buckets_not_averaged():
    fast = {bucket(1_000_000): 99}  # 99 tasks of 1 ms on one worker
    slow = {bucket(1_000_000_000): 1}  # one of 1 s on another
    both = merge([fast, {str(k): v for k, v in slow.items()}])  # (JSON gives string keys)
    assert both == {bucket(1_000_000): 99, bucket(1_000_000_000): 1}
    p50 = percentile(both, 0.5)
    assert 0.0009 < p50 < 0.0013  # the merged median is ~1 ms (an average of medians would be ~0.5 s)
    assert percentile(both, 0.999) > 0.8
    assert percentile({}, 0.5) is None


def producer(url: str, prefix: str) -> BackgroundTasks:
    return BackgroundTasks(workers=2, broker=RedisBroker(url, prefix=prefix, visibility_timeout=1.0))


@pytest.mark.timeout(180)
def test_three_workers_register_one_killed_is_lost_one_stopped_deregisters(redis_url, prefix):
    procs = [start_worker(redis_url, prefix) for _ in range(3)]
    p = producer(redis_url, prefix)
    view = ClusterView(redis_url, prefix=prefix)
    try:
        wait_until(lambda: len([w for w in view.workers() if w["state"] == "alive"]) == 3, 60, "3 workers alive")
        ws = {w["pid"]: w for w in view.workers()}
        assert set(ws) == {pr.pid for pr in procs}
        for w in ws.values():
            assert w["queues"] == ["default"] and w["concurrency"] == 4 and w["interval"] == BEAT
            assert w["host"] and w["id"] and w["rss_bytes"] > 10 * 2**20
            assert abs(w["last_seen"] - time.time()) < 5 and w["started"] <= w["last_seen"]

        # what is run: 60 successes, 4 tasks failing 3 times each (2 retries), one with a secret
        with p.batch():
            ok = [p.add_task(rt.add, i, 1) for i in range(60)]
            bad = [p.add_task(rt.always_fails, i) for i in range(3)]
            bad.append(p.add_task(rt.always_fails, "redis://:hunter2@db.internal:6379/0"))
        assert [r.wait(30) for r in ok] == [i + 1 for i in range(60)]
        for r in bad:
            with pytest.raises(Exception, match="bad value"):
                r.wait(30)
        # a beat takes the figures (counted once acknowledged) and then the worker's in_flight
        # (given back a moment later): one beat can show 64 processed and one still in flight
        wait_until(lambda: sum(w["processed"] for w in view.workers()) == 64
                   and all(w["in_flight"] == 0 for w in view.workers()), 30, "the figures of 64 tasks")
        ws = view.workers()
        assert sum(w["failed"] for w in ws) == 4
        assert sum(w["succeeded"] for w in ws) == 60
        assert sum(w["retried"] for w in ws) == 8
        assert all(w["in_flight"] == 0 and w["pending"] == 0 for w in ws)
        names = {t["name"]: t for t in view.task_names()}
        add, fails = names["redis_tasks.add"], names["redis_tasks.always_fails"]
        assert (add["processed"], add["succeeded"], add["failed"], add["retried"]) == (60, 60, 0, 0)
        assert (fails["processed"], fails["failed"], fails["retried"]) == (4, 4, 8)
        assert add["run"]["samples"] == 60 and fails["run"]["samples"] == 12  # every attempt timed
        assert add["wait"]["samples"] == 60
        assert 0 <= add["run"]["p50"] <= add["run"]["p99"] < 1.0
        assert 0 <= add["wait"]["p50"] <= add["wait"]["p99"] < 30
        assert sum(add["run_histogram"].values()) == 60
        errors = fails["errors"]
        assert errors and all(e["error"].startswith("ValueError: bad value") for e in errors)
        assert {e["worker"] for e in errors} <= {w["id"] for w in ws}
        text = repr(view.task_names(errors=20))
        assert "hunter2" not in text and "***" in text  # redacted
        rows = {(r["queue"], r["priority"]): r for r in view.queues()}
        assert rows[("default", "normal")] == {
            "queue": "default", "priority": "normal", "queued": 0, "delayed": 0, "in_flight": 0, "dead_letters": 4,
        }

        # a worker killed while it holds tasks: lost, and what it held is pending for it
        started, gate = f"{prefix}:started", f"{prefix}:gate"
        held = [p.add_task(rt.held, started, gate, i) for i in range(12)]  # 4 per worker (concurrency 4)
        wait_until(lambda: p.broker.redis.llen(started) == 12, 30, "12 held tasks started")
        wait_until(lambda: all(w["in_flight"] == 4 for w in view.workers()), 10, "each worker to report 4 in flight")
        victim = procs[0]
        seen = {w["pid"]: w["last_seen"] for w in view.workers()}[victim.pid]  # (a beat may follow)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        wait_until(lambda: {w["pid"]: w["state"] for w in view.workers()}.get(victim.pid) == "lost", 10, "lost")
        sec, usec = p.broker.redis.time()  # (beats are in Redis's clock)
        # not before its beats were missed: LOST_AFTER_BEATS intervals after its last beat (not
        # after the kill: a beat comes an interval plus its own duration after the last one,
        # and later on a loaded machine)
        assert sec + usec / 1e6 - seen >= LOST_AFTER_BEATS * BEAT, (seen, sec, usec)
        ws = {w["pid"]: w for w in view.workers()}
        assert ws[victim.pid]["pending"] == 4  # what reclaim will move
        # (the others are alive: a beat late by 3 intervals, a stall of the machine, would read
        # as lost for a moment, so this waits for their next beats)
        wait_until(lambda: [w["state"] for w in view.workers() if w["pid"] != victim.pid] == ["alive", "alive"],
                   10, "the two others alive")
        assert view.workers()[-1]["pid"] == victim.pid  # lost ones last
        p.broker.redis.rpush(gate, *range(40))
        assert sorted(r.wait(60) for r in held) == list(range(12))  # the lost worker's 4 reclaimed
        wait_until(lambda: {w["pid"]: w["pending"] for w in view.workers()}[victim.pid] == 0, 10, "reclaimed")

        # a worker stopped with SIGTERM deregisters
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(30) == 0
        assert procs[1].pid not in {w["pid"] for w in view.workers()}
        expected = {procs[2].pid: "alive", victim.pid: "lost"}
        wait_until(lambda: {w["pid"]: w["state"] for w in view.workers()} == expected, 10, "one alive, one lost")
    finally:
        stop(*procs)
        view.close()
        p.shutdown(wait_for_completion=False)


@pytest.mark.timeout(60)
def test_in_process_worker_registers_and_deregisters_and_bad_interval_is_refused(redis_url, prefix):
    b = RedisBroker(redis_url, prefix=prefix)
    eng = BackgroundTasks(workers=2, broker=b)
    rt.register(eng)
    for bad in (0, -1, True, "2", float("nan"), 7200):
        with pytest.raises(ValueError, match="heartbeat_interval"):
            Worker(eng, heartbeat_interval=bad)
    w = Worker(eng, concurrency=2, heartbeat_interval=0.05)
    t = threading.Thread(target=w.run)
    t.start()
    try:
        w.ready.wait(10)
        view = ClusterView(b)
        wait_until(lambda: [x["id"] for x in view.workers()] == [w.consumer], 10, "registered")
        assert view.queue_names(scan=False) == ["default"]
        for key in b.redis.scan_iter(f"{prefix}:cluster:*"):  # every registry key expires
            assert b.redis.pttl(key) > 0, key
    finally:
        w.stop()
        t.join(20)
    assert view.workers() == []
    assert not b.redis.exists(cluster_key(prefix, "worker", w.consumer))
    # without a heartbeat: not registered, no figures
    w2 = Worker(eng, concurrency=2, heartbeat_interval=None)
    assert w2.figures is None
    eng.shutdown(wait_for_completion=False)


def test_timing_is_sampled_above_the_budget_and_counts_stay_exact():
    class Handle:
        def __init__(self, run_ms):
            self.run_ms = run_ms

        def get_stats(self):
            return {"execution_time_ms": self.run_ms, "started_at": time.time()}

    class Job:
        def __init__(self, i):
            self.msg = [f"t{i}", "n", None, None]
            self.kinds = ("succeeded",)
            self.handle = Handle(1.0)
            self.eid = b"%d-0" % int(time.time() * 1000)
            self.error = None

    f = TaskFigures(timed_per_beat=100)
    f.record([Job(i) for i in range(1000)])
    tasks, _, finished = f.snapshot(1.0)
    assert finished == 1000 and tasks["n"]["succeeded"] == 1000 and tasks["n"]["rate"] == 1000
    assert sum(tasks["n"]["run"].values()) == 1000  # below the budget's first beat: every task timed
    f.record([Job(i) for i in range(1000)])  # now a stride of 10
    tasks, _, _ = f.snapshot(1.0)
    assert tasks["n"]["succeeded"] == 2000
    assert sum(tasks["n"]["run"].values()) == 1100


_WORKER_WITH_ID = """
import os, sys
import redis_tasks as rt
from catzilla_tasks import BackgroundTasks
from catzilla_tasks.brokers import RedisBroker, Worker
url, prefix = os.environ["CT_TEST_REDIS_URL"], os.environ["CT_TEST_PREFIX"]
eng = BackgroundTasks(workers=2, broker=RedisBroker(url, prefix=prefix))
rt.register(eng)
if sys.argv[3:] == ["multi"]:  # a worker of several queues (routing.py): one registry entry
    from catzilla_tasks.brokers.routing import MultiQueueWorker
    w = MultiQueueWorker(eng, {"default": 1, "emails": 1}, concurrency=2, consumer=sys.argv[1],
                         heartbeat_interval=float(sys.argv[2]))
else:
    w = Worker(eng, concurrency=2, consumer=sys.argv[1], heartbeat_interval=float(sys.argv[2]))
try:
    w.run(install_signals=True)
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}", flush=True)
    sys.exit(3)
finally:
    eng.shutdown(wait_for_completion=False)
"""


def worker_with_id(url: str, prefix: str, wid: str, beat: float, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, CT_TEST_REDIS_URL=url, CT_TEST_PREFIX=prefix,
               PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", _WORKER_WITH_ID, wid, str(beat), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.timeout(120)
def test_a_worker_whose_id_a_live_worker_holds_fails_at_start(redis_url, prefix, monkeypatch):
    """Two workers given the same id would share one registry entry and one consumer name (the
    second taking over the tasks the first holds): the second fails at start, naming the id and
    the live worker's host and pid, and runs nothing. Once the first has stopped (deregistered),
    or when the live-looking entry is a killed process of this host, the id can be used again."""
    import socket

    monkeypatch.setenv("CT_TEST_REDIS_URL", redis_url)  # (redis_tasks.held's client, in this process)
    b = RedisBroker(redis_url, prefix=prefix)
    eng = BackgroundTasks(workers=2, broker=b)
    rt.register(eng)
    view = ClusterView(b)
    a = Worker(eng, concurrency=2, consumer="dup-id", heartbeat_interval=0.5)
    t = threading.Thread(target=a.run)
    t.start()
    try:
        assert a.ready.wait(10)
        wait_until(lambda: [(x["id"], x["pid"]) for x in view.workers()] == [("dup-id", os.getpid())], 10, "A")
        held = eng.add_task(rt.held, f"{prefix}:started", f"{prefix}:gate", 1)
        assert b.redis.blpop([f"{prefix}:started"], timeout=20)  # A holds it
        for kind in ("single", "multi"):
            other = worker_with_id(redis_url, prefix, "dup-id", 0.5, kind)
            try:
                out, _ = other.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                stop(other)  # (it started: the defect)
                raise
            assert other.returncode == 3, (kind, out)
            assert "WorkerIdInUse" in out and "'dup-id'" in out, out
            assert f"{socket.gethostname()}" in out and f"pid {os.getpid()}" in out, out
        (entry,) = view.workers()
        assert (entry["id"], entry["pid"], entry["state"]) == ("dup-id", os.getpid(), "alive")
        b.redis.rpush(f"{prefix}:gate", 1)
        assert held.wait(20) == 1
        assert b.redis.llen(f"{prefix}:started") == 0  # run once, by A only
    finally:
        a.stop()
        t.join(20)
    assert view.workers() == []
    # deregistered: the id is free again; a worker killed (-9) leaves a live-looking entry, which
    # a worker of the same host takes over at once (its pid is not running)
    k = worker_with_id(redis_url, prefix, "dup-id", 30)
    try:
        wait_until(lambda: [(x["id"], x["pid"]) for x in view.workers()] == [("dup-id", k.pid)], 30, "K")
    finally:
        stop(k)
    (entry,) = view.workers()
    assert entry["state"] == "alive" and entry["pid"] == k.pid
    c = Worker(eng, concurrency=2, consumer="dup-id", heartbeat_interval=0.5)
    t = threading.Thread(target=c.run)
    t.start()
    try:
        assert c.ready.wait(10)
        wait_until(lambda: [(x["id"], x["pid"]) for x in view.workers()] == [("dup-id", os.getpid())], 10, "C")
    finally:
        c.stop()
        t.join(20)
        view.close()
        eng.shutdown(wait_for_completion=False)
