"""Rate limits and concurrency limits: in-process (per engine) and on Redis (cluster-wide)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import limit_tasks as lt
import pytest
import redis_tasks as rt
from redis_helpers import prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)

from catzilla_tasks import BackgroundTasks, TaskConfig, TaskStatus
from catzilla_tasks.brokers import RedisBroker, Worker

TESTS = os.path.dirname(os.path.abspath(__file__))


def max_in_window(times: list[float], window: float = 1.0) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


# -- validation --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["fast", "10", "0/s", "-1/s", "10/d", "1/0s", 5])
def test_a_bad_rate_limit_is_refused_at_the_decorator(bad):
    with BackgroundTasks(workers=1) as tasks, pytest.raises(ValueError, match="rate_limit"):
        tasks.task(rate_limit=bad)(lambda: None)


def test_bad_concurrency_limit_queue_and_key_are_refused():
    for kw, word in (
        ({"concurrency_limit": 0}, "concurrency_limit"),
        ({"concurrency_limit": True}, "concurrency_limit"),
        ({"queue": "a b"}, "queue"),
        ({"rate_limit_key": lambda: "k"}, "needs a rate_limit"),
        ({"rate_limit": "1/s", "rate_limit_key": "customer"}, "callable"),
    ):
        with pytest.raises(ValueError, match=word):
            TaskConfig(**kw)
    assert TaskConfig(rate_limit="100/m")._rate == (100.0, 60.0)
    assert TaskConfig(rate_limit="5/10s")._rate == (5.0, 10.0)
    assert TaskConfig(rate_limit="3/h")._rate == (3.0, 3600.0)


# -- in-process --------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_in_process_rate_limit_spaces_starts_without_holding_workers(make_tasks):
    tasks = make_tasks(workers=2, enable_auto_scaling=False)
    starts: dict[int, float] = {}

    @tasks.task(rate_limit="20/s")
    def rated(i):
        starts[i] = time.monotonic()
        return i

    other = threading.Event()
    t0 = time.monotonic()
    handles = [tasks.add_task(rated, i) for i in range(40)]
    # the waiting ones are in the timer, not on the workers: other work runs at once
    tasks.add_task(other.set)
    assert other.wait(1.0)
    assert [h.wait(10) for h in handles] == list(range(40))
    took = time.monotonic() - t0
    # call i's slot is t0 + i * 50 ms (reserved in submission order, the first at once): none
    # starts before it; at most 21 starts in any 1 s window (20/s plus the burst of one), plus
    # one per 50 ms of the worst scheduling delay seen (a late start falls into the next window)
    lateness = [starts[i] - (t0 + i * 0.05) for i in range(40)]
    assert min(lateness) > -0.005, lateness
    assert max_in_window(list(starts.values())) <= 21 + int(max(lateness) / 0.05), lateness
    assert 1.8 <= took <= 2.6, took  # 39 intervals of 50 ms


@pytest.mark.timeout(60)
def test_in_process_keyed_rate_limit_is_per_key(make_tasks):
    tasks = make_tasks(workers=4)
    starts: dict[tuple[str, int], float] = {}

    @tasks.task(rate_limit="10/s", rate_limit_key=lambda customer, k: customer)
    def job(customer, k):
        starts[customer, k] = time.monotonic()

    t0 = time.monotonic()
    hs = [tasks.add_task(job, c, k) for k in range(10) for c in ("a", "b")]
    for h in hs:
        h.wait(10)
    assert time.monotonic() - t0 < 1.4  # the two keys ran side by side (10 each at 10/s: ~0.9 s)
    for c in "ab":  # the k-th call of a key: its slot at t0 + k * 100 ms
        assert all(starts[c, k] > t0 + k * 0.1 - 0.005 for k in range(10))


@pytest.mark.timeout(60)
def test_in_process_concurrency_limit_parks_calls_and_keeps_workers_free(make_tasks):
    tasks = make_tasks(workers=4, enable_auto_scaling=False)
    lock = threading.Lock()
    running = [0, 0]  # now, peak
    release = threading.Event()

    @tasks.task(concurrency_limit=2)
    def limited(i):
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        release.wait(10)
        with lock:
            running[0] -= 1
        return i * 2

    hs = [tasks.add_task(limited, i) for i in range(12)]
    # two hold their slots; the ten parked ones hold no worker: other tasks run
    assert tasks.add_task(lambda: "free").wait(2) == "free"
    assert hs[5].status is TaskStatus.PENDING
    release.set()
    assert [h.wait(10) for h in hs] == [i * 2 for i in range(12)]
    assert running[1] == 2


@pytest.mark.timeout(60)
def test_in_process_parked_call_can_be_cancelled_and_failures_reach_the_handle(make_tasks):
    tasks = make_tasks(workers=2)
    gate = threading.Event()

    @tasks.task(concurrency_limit=1)
    def one(x):
        gate.wait(10)
        if x == "boom":
            raise KeyError(x)
        return x

    first = tasks.add_task(one, "boom")
    parked = tasks.add_task(one, "never")
    third = tasks.add_task(one, "ok")
    assert parked.cancel() is True
    gate.set()
    with pytest.raises(KeyError):
        first.wait(10)
    assert third.wait(10) == "ok"
    assert parked.status is TaskStatus.CANCELLED


def test_tasks_without_limits_stay_on_the_c_path(make_tasks):
    tasks = make_tasks(workers=1)

    def f():
        return 1

    assert tasks.add_task(f).wait(5) == 1
    assert tasks._limits is None  # nothing of limits.py was touched


# -- Redis: cluster-wide -----------------------------------------------------------------------
class Cluster:
    def __init__(self, url: str, prefix: str, monkeypatch) -> None:
        monkeypatch.setenv("CT_TEST_REDIS_URL", url)
        self.url = url
        self.prefix = prefix
        self.engines: list[BackgroundTasks] = []
        self.workers: list[tuple[Worker, threading.Thread]] = []
        self.producer = self.engine()
        self.r = self.producer.broker.redis

    def engine(self, **broker_kw) -> BackgroundTasks:
        broker_kw.setdefault("prefix", self.prefix)
        eng = BackgroundTasks(workers=4, broker=RedisBroker(self.url, **broker_kw))
        rt.register(eng)
        lt.register(eng)
        self.engines.append(eng)
        return eng

    def worker(self, concurrency: int = 10, engine: BackgroundTasks | None = None, **broker_kw) -> Worker:
        eng = engine or self.engine(**broker_kw)
        w = Worker(eng, concurrency=concurrency)
        t = threading.Thread(target=w.run, daemon=True)
        t.start()
        assert w.ready.wait(10)
        self.workers.append((w, t))
        return w

    def close(self) -> None:
        for w, _t in self.workers:
            w.stop()
        for _w, t in self.workers:
            t.join(30)
        for eng in self.engines:
            eng.shutdown(wait_for_completion=False, timeout=10)
            eng.broker.close()


@pytest.fixture
def cluster(redis_url, prefix, monkeypatch):
    c = Cluster(redis_url, prefix, monkeypatch)
    yield c
    c.close()


def start_worker_process(url: str, prefix: str, concurrency: int = 10, **env_extra: str) -> subprocess.Popen:
    """``catzilla-tasks worker limit_tasks:tasks`` in a process of its own (its own GIL)."""
    env = dict(os.environ, CT_TEST_REDIS_URL=url, CT_TEST_PREFIX=prefix, **env_extra,
               PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "catzilla_tasks.cli", "worker", "limit_tasks:tasks", "--concurrency", str(concurrency)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # its banner: fetching from here on
    assert "catzilla-tasks worker" in line, line
    return proc


def stop_worker_process(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return out


@pytest.mark.timeout(120)
def test_redis_rate_limit_20_per_s_over_200_tasks_on_2_workers(cluster):
    """The must-show figure: 200 tasks of rate_limit="20/s" on two worker processes, done in
    10 s +- 10%. The limiter admits at most 20 per second plus the burst of one: at most 21
    admissions (reserved slots, logged by the workers) in any 1 s window, checked exactly. A task
    starts once a worker thread gets to it, which on a loaded machine can be tens of ms after its
    slot: a start S seconds late can fall into the next window, so the starts are checked against
    21 plus floor(S / 50 ms), S the latest start after its slot measured per task (0 on a quiet
    machine: exactly 21; see docs/architecture.md, rate limits)."""
    log, adm = f"{cluster.prefix}:starts", f"{cluster.prefix}:admissions"
    procs = [start_worker_process(cluster.url, cluster.prefix, CT_TEST_ADMISSIONS=adm) for _ in range(2)]
    try:
        p = cluster.producer
        t0 = time.time()
        with p.batch():
            handles = [p.add_task(lt.rated, log, i) for i in range(200)]
        assert [h.wait(30) for h in handles] == list(range(200))
        took = time.time() - t0
    finally:
        outs = [stop_worker_process(proc) for proc in procs]
    starts = dict(x.decode().split() for x in cluster.r.lrange(log, 0, -1))
    slots = dict(x.decode().split() for x in cluster.r.lrange(adm, 0, -1))
    assert len(starts) == 200 and len(slots) == 200
    worst_admitted = max_in_window([float(v) for v in slots.values()])
    worst_started = max_in_window([float(v) for v in starts.values()])
    lateness = [float(starts[i]) - float(slots[i]) for i in starts]
    allowance = int(max(0.0, max(lateness)) / 0.05)
    print(
        f"200 tasks at 20/s on 2 worker processes: {took:.2f} s; at most {worst_admitted} admitted and "
        f"{worst_started} started in any 1 s window; starts after their slot: median "
        f"{sorted(lateness)[100] * 1000:.0f} ms, worst {max(lateness) * 1000:.0f} ms"
    )
    assert worst_admitted <= 21  # 20/s plus the burst of one
    assert min(lateness) > -0.005  # no start ahead of its slot (the clocks agree to the ms here)
    assert worst_started <= 21 + allowance
    assert 9.0 <= took <= 11.0, took
    ran = [int(re.search(r"(\d+) succeeded", o).group(1)) for o in outs]  # type: ignore[union-attr]
    assert sum(ran) == 200 and min(ran) > 20, outs  # both ran them


@pytest.mark.timeout(120)
def test_redis_keyed_rate_limit(cluster):
    log = f"{cluster.prefix}:keyed"
    cluster.worker(concurrency=10)
    p = cluster.producer
    t0 = time.time()
    hs = [p.add_task(lt.per_customer, c, log) for _ in range(4) for c in ("a", "b", "c")]
    for h in hs:
        h.wait(30)
    took = time.time() - t0
    assert 1.2 <= took <= 3.0, took  # 4 per key at 2/s: ~1.5 s, the keys side by side
    rows = [x.decode().split() for x in cluster.r.lrange(log, 0, -1)]
    for c in "abc":
        assert max_in_window([float(t) for k, t in rows if k == c]) <= 3


@pytest.mark.timeout(120)
def test_redis_concurrency_limit_2_across_2_workers_of_concurrency_10(cluster):
    counter, log = f"{cluster.prefix}:running", f"{cluster.prefix}:seen"
    w1 = cluster.worker(concurrency=10)
    w2 = cluster.worker(concurrency=10)
    p = cluster.producer
    with p.batch():
        hs = [p.add_task(lt.limited, counter, log, 0.05) for _ in range(30)]
    for h in hs:
        h.wait(60)
    seen = [int(x) for x in cluster.r.lrange(log, 0, -1)]
    assert len(seen) == 30
    assert max(seen) <= 2, seen
    assert max(seen) == 2  # the limit was reached, not serialised
    parked = w1.counts["parked_concurrency_limit"] + w2.counts["parked_concurrency_limit"]
    assert parked > 0
    # no lease left behind, nothing left parked
    assert cluster.r.zcard(f"{cluster.prefix}:cc:{lt.limited.__module__}.limited") == 0
    assert cluster.r.zcard(f"{cluster.prefix}:default:cp:{lt.limited.__module__}.limited") == 0


@pytest.mark.timeout(120)
def test_redis_concurrency_lease_of_a_dead_worker_lapses(cluster):
    """A lease whose worker died (never released, never renewed) expires after the visibility
    timeout; a live worker's heartbeat then wakes the parked tasks."""
    counter, log = f"{cluster.prefix}:running", f"{cluster.prefix}:seen"
    name = f"{lt.limited.__module__}.limited"
    lease_key = f"{cluster.prefix}:cc:{name}"
    # two leases of a dead worker, expiring in 1.5 s (server ms)
    now_ms = int(cluster.r.time()[0] * 1000)
    cluster.r.zadd(lease_key, {"dead:1": now_ms + 1500, "dead:2": now_ms + 1500})
    cluster.worker(concurrency=4, visibility_timeout=1.5)
    p = cluster.producer
    hs = [p.add_task(lt.limited, counter, log, 0.01) for _ in range(3)]
    time.sleep(0.5)
    assert not any(h.is_ready() for h in hs)  # parked behind the dead leases
    for h in hs:
        assert h.wait(20) in (1, 2)


@pytest.mark.timeout(60)
def test_shutdown_runs_parked_calls_or_cancels_them():
    tasks = BackgroundTasks(workers=2)
    done: list[int] = []

    @tasks.task(concurrency_limit=1)
    def one(i):
        time.sleep(0.01)
        done.append(i)

    hs = [tasks.add_task(one, i) for i in range(20)]
    tasks.shutdown(wait_for_completion=True, timeout=30)  # parked calls run as their turn comes
    assert sorted(done) == list(range(20)) and all(h.status is TaskStatus.SUCCEEDED for h in hs)

    t2 = BackgroundTasks(workers=2)
    gate = threading.Event()

    @t2.task(concurrency_limit=1)
    def held(i):
        gate.wait(10)

    hs = [t2.add_task(held, i) for i in range(5)]
    wait_until(lambda: hs[0].status is TaskStatus.RUNNING, 10, "the first call to run")
    threading.Timer(0.3, gate.set).start()
    t2.shutdown(wait_for_completion=False, timeout=30)
    assert hs[0].status is TaskStatus.SUCCEEDED
    assert all(h.status is TaskStatus.CANCELLED for h in hs[1:])  # parked: never started
