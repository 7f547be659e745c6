"""Fault injection against real redis-servers (issue 13, "Must show"): workers talk to Redis
through a proxy of ours (fault_proxy.py) that resets, blackholes or delays their connections at
chosen moments (the fetch, the hand-off's idempotency claim, the commit, the lease renewal) or at random;
mixed with kill -9 of worker processes, Redis restarts with append-only persistence, poison
messages and oversized results.

Checked at the end of every scenario (``check``):
* every accepted task reached a final state (a result, or a dead letter for the poison);
* a task ran more than once only if its first run began before a fault (a worker that died
  or lost Redis before its commit); re-sent copies of finished keyed tasks never run;
* no worker hangs: each stop returns within its timeout;
* Redis memory returns to its baseline once results and keys expired.

``CATZILLA_CHAOS_SECONDS`` sets how long the random schedule runs (``make chaos``: 300 s);
``CATZILLA_CHAOS_SEED`` its seed (printed, so a failing schedule can be replayed).
"""

from __future__ import annotations

import collections
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import redis_fault_tasks as ft
from fault_proxy import FaultProxy
from redis_helpers import RedisServer, redis, wait_until

from catzilla_tasks import BackgroundTasks
from catzilla_tasks.brokers import RedisBroker, RemoteTaskError, Worker, scripts

TESTS = os.path.dirname(os.path.abspath(__file__))
CHAOS_SECONDS = float(os.environ.get("CATZILLA_CHAOS_SECONDS", "12"))
CHAOS_SEED = int(os.environ.get("CATZILLA_CHAOS_SEED", "0") or 0) or random.randrange(1 << 30)
TTL = 8.0  # results and idempotency keys: outlive a scenario, short enough for the memory check
BIG = 64 * 1024  # max_result_bytes of every worker here

pytestmark = pytest.mark.timeout(240 + 2 * CHAOS_SECONDS)


@pytest.fixture
def server(monkeypatch):
    srv = RedisServer(appendonly=True)
    monkeypatch.setenv("CT_TEST_REDIS_URL", srv.url)  # the tasks' own log goes to Redis directly
    yield srv
    srv.stop()


@pytest.fixture
def proxy(server):
    p = FaultProxy(server.port)
    yield p
    p.close()


def broker(url: str, prefix: str, **kw) -> RedisBroker:
    kw.setdefault("result_ttl", TTL)
    kw.setdefault("idempotency_ttl", TTL)
    return RedisBroker(url, prefix=prefix, max_result_bytes=BIG, socket_timeout=2, **kw)


def dataset_bytes(r) -> int:
    return int(r.info("memory")["used_memory_dataset"])


class Load:
    """The tasks of a scenario: plain and keyed runs, poison messages, oversized results."""

    def __init__(self, producer: BackgroundTasks, log_key: str, prefix: str) -> None:
        self.p = producer
        self.b: RedisBroker = producer.broker
        self.log_key = log_key
        self.prefix = prefix
        self.results: dict[int, object] = {}
        self.keyed: dict[int, str] = {}
        self.big: list = []
        self.poison = 0
        self.next = 0

    def publish(self, n: int, slow: float = 0.0, rnd: random.Random | None = None) -> None:
        rnd = rnd or random.Random(n)
        items = []
        with self.p.batch():
            for _ in range(n):
                i = self.next
                self.next += 1
                secs = slow if slow and i % 10 == 0 else 0.0
                if i % 5 == 0:
                    key = f"{self.prefix}-k{i}"
                    res = self.p.options(idempotency_key=key).add_task(ft.count_run, self.log_key, i, secs)
                    items.append((i, key, res))
                else:
                    items.append((i, None, self.p.add_task(ft.count_run, self.log_key, i, secs)))
            if rnd.random() < 0.5:
                big = self.p.add_task(ft.blob, BIG * 2)
        # accepted: the batch was sent (publishing raised otherwise)
        for i, key, r in items:
            self.results[i] = r
            if key:
                self.keyed[i] = key
        if "big" in locals():
            self.big.append(big)
        self.b.publish_raw(2, b"m\xc1 not msgpack")  # poison: undecodable
        self.poison += 1
        self.b.publish_raw(2, self.b.serializer.dumps(["p", "no.such.task", [], {}]))  # poison: unknown name
        self.poison += 1

    def collect(self) -> None:
        """Read every outcome stored so far (a RemoteResult keeps it once read: results expire,
        and a long scenario outlives them)."""
        pending = [r for r in [*self.results.values(), *self.big] if r._final is None]
        if not pending:
            return
        pipe = self.b.redis.pipeline(transaction=False)
        for r in pending:
            pipe.lindex(self.b.result_key(r.task_id), 0)
        for r, raw in zip(pending, pipe.execute(), strict=True):  # one reply per command
            r._take(raw)

    def collecting(self) -> threading.Event:
        """collect() every 0.2 s in a thread until the returned event is set."""
        done = threading.Event()

        def loop() -> None:
            while not done.wait(0.2):
                try:
                    self.collect()
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass

        threading.Thread(target=loop, daemon=True).start()
        return done

    def wait_all(self, timeout: float = 60) -> None:
        """Wait for every outcome."""
        for r in [*self.results.values(), *self.big]:
            try:
                r.wait(timeout)
            except ValueError:
                pass

    def runs(self) -> dict[int, list[float]]:
        out: dict[int, list[float]] = collections.defaultdict(list)
        for raw in self.b.redis.lrange(self.log_key, 0, -1):
            value, _, started = raw.decode().split(":")
            out[int(value)].append(float(started))
        return out


def check(load: Load, fault_times: list[float]) -> None:
    """The invariants every scenario ends with (see the module docstring), workers running."""
    b = load.b
    # every accepted task reached a final state
    for i, r in load.results.items():
        assert r.wait(60) == i
    for r in load.big:
        with pytest.raises(ValueError, match="max_result_bytes"):
            r.wait(60)
    # every poison message and oversized result dead-lettered (twice at most where a commit's
    # reply was lost: the commit was applied, then retried)
    want = load.poison + len(load.big)
    wait_until(lambda: b.dead_letter_count() >= want, 30, "poison and oversized dead-lettered")
    assert b.dead_letter_count() <= want + len(fault_times), (b.dead_letter_count(), want)
    # (a killed worker's entries are pending until a live worker reclaims and acknowledges them)
    wait_until(lambda: all(b.redis.xpending(s, "workers")["pending"] == 0 for s in b.streams), 30, "nothing pending")
    # duplicates only for tasks whose first run began before a fault
    runs = load.runs()
    assert set(runs) == set(load.results)
    last_fault = max(fault_times, default=0.0)
    dups = {i: starts for i, starts in runs.items() if len(starts) > 1}
    for i, starts in dups.items():
        assert min(starts) <= last_fault + 0.5, (i, starts, last_fault)
    # a finished keyed task re-sent is a no-op with the first run's result
    before = sum(len(s) for s in runs.values())
    # (those whose key is remembered for a while yet: keys expire too, with idempotency_ttl)
    live = {i: k for i, k in load.keyed.items() if b.redis.pttl(b.done_key(k)) > 3000}
    assert live or not load.keyed
    with load.p.batch():
        again = {i: load.p.options(idempotency_key=k).add_task(ft.count_run, load.log_key, i) for i, k in live.items()}
    for i, r in again.items():
        try:
            assert r.wait(60) == i
        except RemoteTaskError as exc:  # the first run's result had expired: still not run again
            assert exc.type_name == "DuplicateTask", exc
    assert sum(len(s) for s in load.runs().values()) == before


def memory_back_to_baseline(b: RedisBroker, baseline: int, log_key: str) -> None:
    """Once results and idempotency keys expired (and the test's own log and the dead letters
    are removed), what the queue keeps is its empty streams: memory is back to the baseline."""
    b.redis.delete(log_key)
    b.purge()
    prefix_keys = lambda: [k for k in b.redis.scan_iter(f"{b.prefix}:*", count=1000)]  # noqa: E731
    wait_until(lambda: not prefix_keys(), 30, f"every key to expire (left: {prefix_keys()[:5]})")
    assert b.redis.dbsize() == 0  # (the server is this test's own)
    # what is left besides keys: client buffers, the append-only file's buffer, the scripts
    # cache (a restarted server starts from a different baseline): well under a MiB
    assert dataset_bytes(b.redis) - baseline < 1024 * 1024, (dataset_bytes(b.redis), baseline)


def no_key_without_ttl(b: RedisBroker, log_key: str) -> None:
    """Every key the scenario left is one of the queue's streams or expires (nothing grows)."""
    structural = {*b.streams, b.delayed_key, b.dead_key, log_key}
    for k in b.redis.scan_iter(f"{b.prefix}:*", count=1000):
        if k.decode() not in structural:
            assert b.redis.pttl(k) > 0, k


def sha(script: str) -> bytes:
    return hashlib.sha1(script.encode()).hexdigest().encode()


# the moments a fault can hit, by what the worker sends then
MOMENTS = {
    "fetch": sha(scripts.FETCH),   # the fetch script's EVALSHA
    "hand-off": sha(scripts.IDEM_CLAIM),  # the idempotency claim between fetch and hand-off
    "commit": b"EXEC",             # the end of the commit transaction
    "renewal": b"XCLAIM",          # the lease renewal of held tasks
}


@pytest.mark.parametrize("action", ["reset_before", "reset_after", "blackhole"])
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_fault_at_a_chosen_moment(server, proxy, moment, action):
    prefix = f"ch{os.urandom(4).hex()}"
    producer = BackgroundTasks(workers=2, broker=broker(server.url, prefix))
    b = producer.broker
    load = Load(producer, f"{prefix}:runs", prefix)
    load.publish(60, slow=0.8)  # slow ones: the worker holds tasks across lease renewals
    eng = BackgroundTasks(workers=4, broker=broker(proxy.url, prefix, visibility_timeout=1.5))
    ft.register(eng)
    w = Worker(eng, concurrency=16)
    t = threading.Thread(target=w.run, daemon=True)
    trig = proxy.on_command(MOMENTS[moment], action)
    t.start()
    try:
        assert trig.fired.wait(30), f"the {moment} never happened"
        load.publish(40)
        load.wait_all()
        # the fault lasts until the worker has Redis again: a reset at once, a blackhole for its
        # second plus the client's socket timeout
        check(load, [trig.at + (3.5 if action == "blackhole" else 0.5)])
        t0 = time.monotonic()
        w.stop(timeout=10)
        t.join(20)
        assert not t.is_alive() and time.monotonic() - t0 < 12, "the worker hung"
        no_key_without_ttl(b, load.log_key)
    finally:
        w.stop(timeout=0)
        t.join(10)
        eng.shutdown(wait_for_completion=False, timeout=5)
        producer.shutdown(wait_for_completion=False, timeout=5)


def start_worker(server: RedisServer, proxy: FaultProxy, prefix: str, concurrency: int = 16) -> subprocess.Popen:
    env = dict(os.environ, CT_TEST_REDIS_URL=server.url, CT_TEST_BROKER_URL=proxy.url, CT_TEST_PREFIX=prefix,
               CT_TEST_VT="1.5", CT_TEST_RESULT_TTL=str(TTL), CT_TEST_MAX_RESULT=str(BIG),
               CT_TEST_SOCKET_TIMEOUT="2",
               PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [
            sys.executable, "-m", "catzilla_tasks.cli", "worker", "redis_fault_tasks:tasks",
            "--concurrency", str(concurrency),
        ],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_a_seeded_random_fault_schedule(server, proxy):
    """Worker processes through the proxy; for CATZILLA_CHAOS_SECONDS, at random moments: a
    reset of every connection, a blackhole, a delay, a fault on the next commit/renewal/fetch,
    kill -9 of a worker (a new one started), a kill -9 and restart of Redis (append-only)."""
    rnd = random.Random(CHAOS_SEED)
    print(f"chaos seed {CHAOS_SEED} (CATZILLA_CHAOS_SEED={CHAOS_SEED} replays it), {CHAOS_SECONDS} s")
    prefix = f"ch{os.urandom(4).hex()}"
    producer = BackgroundTasks(workers=2, broker=broker(server.url, prefix))
    b = producer.broker
    baseline = dataset_bytes(b.redis)
    load = Load(producer, f"{prefix}:runs", prefix)
    workers = [start_worker(server, proxy, prefix) for _ in range(2)]
    faults: list[float] = []
    stops: list[float] = []
    collecting = load.collecting()
    try:
        end = time.monotonic() + CHAOS_SECONDS
        while time.monotonic() < end:
            try:
                load.publish(rnd.randint(5, 40), slow=rnd.choice([0.0, 0.3, 1.0]), rnd=rnd)
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                pass  # not accepted (Redis was restarting): nothing to check for it
            time.sleep(rnd.uniform(0.1, 0.8))
            kind = rnd.choice(["reset", "blackhole", "delay", "command", "kill", "restart", "none", "none"])
            faults.append(time.time())
            if kind == "reset":
                proxy.reset_all()
            elif kind == "blackhole":
                proxy.blackhole(rnd.uniform(0.2, 2.5))
            elif kind == "delay":
                proxy.set_delay(rnd.choice([0.0, 0.0, 0.005, 0.05]))
            elif kind == "command":
                proxy.on_command(
                    rnd.choice(list(MOMENTS.values())), rnd.choice(["reset_before", "reset_after", "blackhole"])
                )
            elif kind == "kill":
                victim = workers.pop(rnd.randrange(len(workers)))
                os.kill(victim.pid, signal.SIGKILL)
                victim.communicate(timeout=10)
                workers.append(start_worker(server, proxy, prefix))
            elif kind == "restart":
                server.kill()
                time.sleep(rnd.uniform(0.0, 1.0))
                server.start()
            else:
                faults.pop()
        proxy.set_delay(0.0)
        load.wait_all(120)
        collecting.set()
        check(load, faults)
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            t0 = time.monotonic()
            out, _ = w.communicate(timeout=60)
            stops.append(time.monotonic() - t0)
            assert w.returncode == 0, out[-3000:]
        assert all(s <= 1.5 + 10 for s in stops), stops  # no worker hung
        memory_back_to_baseline(b, baseline, load.log_key)
    finally:
        collecting.set()
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.communicate()
        producer.shutdown(wait_for_completion=False, timeout=5)
