"""The broker contract (brokers/base.py), one scenario run on every broker: a producer built by
BackgroundTasks(broker=...) publishes, the same Worker (brokers/worker.py, through the broker's
ConsumerSession) runs the tasks, results and dead letters come back through the broker. Redis:
a real redis-server; memory: MemoryBroker."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis_tasks as rt
import worker_tasks as wt
from redis_helpers import prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)

from catzilla_tasks import BackgroundTasks, TaskPriority, TaskStatus
from catzilla_tasks.brokers import RedisBroker, Worker
from catzilla_tasks.brokers.base import Broker, ConsumerSession, FetchingBroker
from catzilla_tasks.brokers.consumer import Consumer
from catzilla_tasks.brokers.memory import MemoryBroker
from catzilla_tasks.brokers.producer import DistributedTasks
from catzilla_tasks.brokers.protocol import OPT_IDEMPOTENCY_KEY, message


class Side:
    """A producer engine and Workers on one broker; ``stop()`` ends them all."""

    def __init__(self, kind: str, request, monkeypatch, **broker_options) -> None:
        self.engines: list[BackgroundTasks] = []
        self.workers: list[tuple[Worker, threading.Thread]] = []
        self.kind = kind
        if kind == "redis":
            url = request.getfixturevalue("redis_url")
            pfx = request.getfixturevalue("prefix")
            monkeypatch.setenv("CT_TEST_REDIS_URL", url)
            self.make = lambda: RedisBroker(url, prefix=pfx, **broker_options)  # noqa: E731
            self.producer = self._engine(self.make())
            self.broker = self.producer.broker
        else:
            self.broker = MemoryBroker(**broker_options)
            self.make = lambda: self.broker  # noqa: E731
            self.producer = self._engine(self.broker)
        self.worker = self.add_worker()

    def _engine(self, broker) -> BackgroundTasks:
        eng = BackgroundTasks(workers=2, broker=broker)
        rt.register(eng)
        wt.register(eng)
        self.engines.append(eng)
        return eng

    def add_worker(self, concurrency: int = 8) -> Worker:
        """A Worker of its own (engine, broker client) on the broker, running on a thread."""
        w = Worker(self._engine(self.make()), concurrency=concurrency)
        t = threading.Thread(target=w.run, daemon=True)
        t.start()
        assert w.ready.wait(10)
        self.workers.append((w, t))
        return w

    def stop(self) -> None:
        for w, t in self.workers:
            w.stop(10)
            t.join(30)
        for eng in self.engines:
            eng.shutdown(wait_for_completion=False, timeout=10)
        self.broker.close()


@pytest.fixture(params=["memory", "redis"])
def make_side(request, monkeypatch):
    made: list[Side] = []

    def make(**broker_options) -> Side:
        made.append(Side(request.param, request, monkeypatch, **broker_options))
        return made[-1]

    yield make
    for s in made:
        s.stop()


@pytest.fixture
def side(make_side):
    return make_side()


@pytest.mark.timeout(120)
def test_producer_is_an_ordinary_class_over_the_broker_interface(side):
    p = side.producer
    assert type(p) is DistributedTasks and isinstance(p, BackgroundTasks)
    assert isinstance(p.broker, Broker)
    # the methods are the class's own, not attributes written on the instance
    for name in ("add_task", "options", "batch", "result", "_submit", "_gates"):
        assert name not in vars(p), name
    assert BackgroundTasks(workers=1).add_task.__class__.__name__ == "builtin_function_or_method"


@pytest.mark.timeout(120)
def test_publish_run_and_read_the_result(side):
    p = side.producer
    r = p.add_task(rt.add, 40, 2)
    assert r.wait(30) == 42
    assert r.status is TaskStatus.SUCCEEDED and r.is_ready()
    assert p.result(r.task_id).wait(5) == 42  # a handle by id, as another process would get it
    hi = p.options(priority=TaskPriority.HIGH).add_task(rt.add, "a", "b")
    assert hi.wait(30) == "ab"


@pytest.mark.timeout(120)
def test_a_batch_publishes_all_at_its_end(side):
    p = side.producer
    with p.batch():
        rs = [p.add_task(rt.add, i, i) for i in range(50)]
    assert [r.wait(30) for r in rs] == [2 * i for i in range(50)]


@pytest.mark.timeout(120)
def test_a_batch_that_raises_publishes_nothing(side):
    p = side.producer
    with pytest.raises(KeyError), p.batch():
        p.add_task(rt.add, 1, 2)
        raise KeyError("boom")
    assert sum(v for k, v in side.broker.queued().items() if k not in ("delayed", "dead")) == 0


@pytest.mark.timeout(120)
def test_a_failure_comes_back_as_its_exception_and_is_dead_lettered(side):
    p = side.producer
    r = p.add_task(rt.always_fails, 7)
    with pytest.raises(ValueError, match="bad value 7"):
        r.wait(30)
    assert r.status is TaskStatus.FAILED
    dead = side.broker.dead_letters()
    assert len(dead) == 1 and dead[0]["task_id"] == r.task_id and "bad value 7" in dead[0]["error"]
    assert side.broker.dead_letter_count() == 1


@pytest.mark.timeout(120)
def test_a_delayed_task_runs_after_its_delay(side):
    p = side.producer
    r = p.options(delay_ms=300).add_task(rt.add, 1, 1)
    assert r.wait(30) == 2


@pytest.mark.timeout(120)
def test_bad_input_fails_at_the_call_site(side):
    p = side.producer
    with pytest.raises(TypeError, match="importable name"):
        p.add_task(lambda: None)
    with pytest.raises(ValueError, match="idempotency_key"):
        p.options(idempotency_key="").add_task(rt.add, 1, 2)


@pytest.mark.timeout(120)
def test_a_redriven_dead_letter_runs_again(side):
    p = side.producer
    r = p.add_task(rt.always_fails, 3)
    with pytest.raises(ValueError):
        r.wait(30)
    [entry] = side.broker.dead_letters()
    assert side.broker.redrive([entry["id"]]) == 1
    assert side.broker.redrive([entry["id"]]) == 0  # moved once
    # it runs again and fails again: its waiters get the re-run's outcome, a new dead letter
    with pytest.raises(ValueError, match="bad value 3"):
        p.result(r.task_id).wait(30)
    [again] = side.broker.dead_letters()
    assert again["task_id"] == r.task_id and again["id"] != entry["id"]


# -- the in-memory broker's own primitives ----------------------------------------------------

def _memory_producer(broker):
    eng = BackgroundTasks(workers=1, broker=broker)
    rt.register(eng)
    return eng


@pytest.mark.timeout(60)
def test_fetch_takes_no_more_than_capacity_highest_priority_first():
    b = MemoryBroker()
    p = _memory_producer(b)
    try:
        p.options(priority=TaskPriority.LOW).add_task(rt.add, 0, 0)
        for i in range(3):
            p.options(priority=TaskPriority.CRITICAL).add_task(rt.add, i, i)
        got = b.fetch(2, 0)
        assert [d.priority for d in got] == [0, 0]
        got += b.fetch(5, 0)
        assert [d.priority for d in got] == [0, 0, 0, 3]
        assert b.fetch(5, 0) == []  # all held
    finally:
        p.shutdown(wait_for_completion=False)


@pytest.mark.timeout(60)
def test_a_held_message_of_a_silent_consumer_is_handed_out_again_then_dead_lettered():
    b = MemoryBroker(visibility_timeout=0.05, max_deliveries=2)
    p = _memory_producer(b)
    try:
        r = p.add_task(rt.add, 1, 2)
        [d1] = b.fetch(1, 0)
        [d2] = b.fetch(1, 5)  # after the visibility timeout: at least once
        assert d2.payload == d1.payload and d2.deliveries == 2
        assert b.fetch(1, 0.3) == []  # its second holder went silent too: max_deliveries reached
        [dead] = b.dead_letters()
        assert dead["task_id"] == r.task_id and "max_deliveries" in dead["error"]
    finally:
        p.shutdown(wait_for_completion=False)


@pytest.mark.timeout(60)
def test_commit_with_retry_queues_the_message_again_after_its_delay():
    b = MemoryBroker()
    p = _memory_producer(b)
    try:
        p.add_task(rt.add, 1, 2)
        [d] = b.fetch(1, 0)
        b.commit(d, None, retry_ms=100)
        assert b.queued()["delayed"] == 1 and b.fetch(1, 0) == []
        [again] = b.fetch(1, 10)
        assert again.payload == d.payload
    finally:
        p.shutdown(wait_for_completion=False)


@pytest.mark.timeout(60)
def test_a_copy_of_a_keyed_task_that_succeeded_is_not_run_again():
    b = MemoryBroker()
    p = _memory_producer(b)
    c = Consumer(_memory_producer(b), b, concurrency=2).start()
    try:
        first = p.options(idempotency_key="order-1").add_task(rt.add, 1, 2)
        assert first.wait(30) == 3
        copy = p.options(idempotency_key="order-1").add_task(rt.add, 100, 200)
        assert copy.wait(10) == 3  # the first run's outcome (its waiter is woken, not timed out)
        # the worker counts a batch after its commit, which is what woke the waiters
        wait_until(lambda: c.stats()["in_flight"] == 0, 10, "the run to be committed and counted")
        assert c.counts["succeeded"] == 1
    finally:
        c.stop(10)
        p.shutdown(wait_for_completion=False)


@pytest.mark.timeout(60)
def test_a_worker_given_a_broker_runs_an_app_engine_without_one():
    # `catzilla-tasks worker app:tasks --broker URL` on an app created without a broker: the
    # app's engine runs the broker's tasks and stays an ordinary engine (its class untouched)
    eng = BackgroundTasks(workers=1)
    rt.register(eng)
    b = MemoryBroker()
    p = _memory_producer(b)
    c = Consumer(eng, b, concurrency=2).start()
    try:
        assert type(eng) is BackgroundTasks and not hasattr(DistributedTasks, "from_engine")
        assert p.add_task(rt.add, 2, 3).wait(10) == 5
        # counted after the commit that woke the waiter
        wait_until(lambda: c.stats()["in_flight"] == 0, 10, "the run to be committed and counted")
        assert c.counts["succeeded"] == 1
    finally:
        c.stop(10)
        p.shutdown(wait_for_completion=False)
        eng.shutdown(wait_for_completion=False)


def test_a_subclass_of_the_engine_given_a_broker_says_what_to_subclass():
    class Mine(BackgroundTasks):
        pass

    with pytest.raises(TypeError, match="DistributedTasks"):
        Mine(workers=1, broker=MemoryBroker())
    with pytest.raises(TypeError, match="redis:// URL or a Broker"):
        BackgroundTasks(workers=1, broker=42)


# -- the Worker, the same on every broker (through broker.consumer(): a ConsumerSession) ------


def _key() -> str:
    return uuid.uuid4().hex


@pytest.mark.timeout(120)
def test_every_broker_gives_a_worker_a_consumer_session(side):
    assert isinstance(side.broker, FetchingBroker)
    assert isinstance(side.worker.session, ConsumerSession)


@pytest.mark.timeout(120)
def test_a_failure_is_retried_through_the_broker_after_its_backoff(side):
    key = _key()
    r = side.producer.add_task(wt.flaky, key, 2)
    assert r.wait(30) == 3  # ran three times: two failures, each retried by the broker
    assert wt.runs[key] == 3
    wait_until(lambda: side.worker.counts["retried"] == 2, 10, "two retries counted")
    assert side.broker.dead_letter_count() == 0


@pytest.mark.timeout(120)
def test_retries_exhausted_the_task_is_dead_lettered_with_its_error(side):
    key = _key()
    r = side.producer.add_task(wt.flaky, key, 10)
    with pytest.raises(ConnectionError, match="attempt 4 fails"):
        r.wait(30)
    assert wt.runs[key] == 4  # the first run and max_retries=3
    [dead] = side.broker.dead_letters()
    assert dead["task_id"] == r.task_id and "attempt 4 fails" in dead["error"]


@pytest.mark.timeout(120)
def test_a_message_naming_no_registered_task_is_dead_lettered(side):
    r = side.producer.add_task("worker_tasks.nothing_of_that_name")
    with pytest.raises(LookupError, match="unknown task name"):
        r.wait(30)
    [dead] = side.broker.dead_letters()
    assert dead["name"] == "worker_tasks.nothing_of_that_name" and "LookupError" in dead["error"]


@pytest.mark.timeout(120)
def test_copies_of_a_keyed_task_held_at_once_run_once(side):
    key = _key()
    p = side.producer
    first = p.options(idempotency_key=key).add_task(wt.gated, key, "a")
    assert wt.event(wt.started, key).wait(20)
    # a copy as a producer whose submit-time deduplication did not see the first would send it
    copy_id = f"copy-{key}"
    b = side.broker
    copy = message(copy_id, "worker_tasks.gated", [key, "b"], {}, {OPT_IDEMPOTENCY_KEY: key})
    b.publish_raw(2, b.serializer.dumps(copy))
    second = b.result(copy_id)
    # the second copy waits while the first holds the key's claim (it is not run alongside)
    wait_until(lambda: side.worker.counts["deferred_idempotent"] >= 1, 20, "the second copy to wait")
    assert wt.runs[key] == 1
    wt.event(wt.gates, key).set()
    assert first.wait(20) == "a" and second.wait(20) == "a"
    assert wt.runs[key] == 1


@pytest.mark.timeout(120)
def test_stop_returns_once_the_held_tasks_are_committed(side):
    key = _key()
    r = side.producer.add_task(wt.gated, key, 7)
    assert wt.event(wt.started, key).wait(20)
    w, t = side.workers[0]
    w.stop()
    assert t.is_alive()  # it waits for the task it holds
    wt.event(wt.gates, key).set()
    t.join(30)
    assert not t.is_alive()
    assert r.wait(10) == 7 and w.counts["succeeded"] == 1 and w.stats()["in_flight"] == 0


@pytest.mark.timeout(120)
def test_a_live_worker_keeps_a_task_longer_than_the_visibility_timeout(make_side):
    side = make_side(visibility_timeout=0.6)
    side.add_worker()  # a second worker, idle: it must not take the running task
    key = _key()
    r = side.producer.add_task(wt.slow, key, 2.0)
    assert r.wait(30) == 1
    assert wt.runs[key] == 1
    assert sum(w.counts["reclaimed"] for w, _ in side.workers) == 0


@pytest.mark.timeout(120)
def test_the_tasks_of_a_consumer_that_went_silent_go_to_a_live_worker(make_side):
    side = make_side(visibility_timeout=0.6)
    side.workers[0][0].stop()
    side.workers[0][1].join(10)
    r = side.producer.add_task(rt.add, 20, 22)
    dead = side.broker.consumer(f"dead-{_key()}")  # fetches, then never renews nor commits
    dead.setup()
    held = dead.fetch(1, 1000)
    assert len(held) == 3 and held[0] == 2  # [priority, token, payload]: NORMAL
    side.add_worker()
    assert r.wait(30) == 42  # after the visibility timeout: at least once


# -- limits and progress: kept by the broker, shared by its workers ----------------------------


@pytest.mark.timeout(120)
def test_a_concurrency_limit_holds_across_workers_and_parks_the_rest(side):
    side.add_worker()
    key = _key()
    p = side.producer
    first = p.add_task(wt.one_at_a_time, key, "a")
    assert wt.event(wt.started, f"{key}:a").wait(20)
    second = p.add_task(wt.one_at_a_time, key, "b")
    # over the limit: parked by the broker (acknowledged by its worker, holding no slot)
    wait_until(lambda: sum(w.counts["parked_concurrency_limit"] for w, _ in side.workers) >= 1, 20, "a park")
    assert wt.runs[key] == 1
    wt.event(wt.gates, f"{key}:b").set()
    wt.event(wt.gates, f"{key}:a").set()  # its lease given back with its outcome: the parked one runs
    assert first.wait(20) == "a" and second.wait(20) == "b"
    assert wt.runs[key] == 2 and wt.most[key] == 1


@pytest.mark.timeout(120)
def test_a_rate_limit_spaces_the_starts_and_defers_without_dropping(side):
    side.add_worker()
    key = _key()
    p = side.producer
    with p.batch():
        hs = [p.add_task(wt.five_a_second, key, i) for i in range(4)]
    assert sorted(h.wait(30) for h in hs) == [0, 1, 2, 3]
    s = sorted(wt.starts[key])
    # slots 200 ms apart (the emission interval of 5/s); a start never comes before its slot (it
    # may come after it: the guarantee is on admissions), and the first one runs at once
    assert s[-1] - s[0] >= 0.58, s
    assert sum(w.counts["deferred_rate_limit"] for w, _ in side.workers) >= 1


@pytest.mark.timeout(120)
def test_progress_reports_are_read_through_the_brokers_result(side):
    key = _key()
    r = side.producer.add_task(wt.reports_progress, key)
    assert r.progress is None or r.progress.fraction == 0.5
    assert wt.event(wt.started, key).wait(20)
    wait_until(lambda: r.progress is not None, 10, "the first report")
    assert tuple(r.progress) == (0.5, "half")
    assert tuple(side.producer.result(r.task_id).progress) == (0.5, "half")  # by id, as elsewhere
    wt.event(wt.gates, key).set()
    assert r.wait(20) == "reported"
    assert tuple(r.progress) == (1.0, "done")


@pytest.mark.timeout(120)
def test_a_retry_of_a_rate_limited_task_asks_for_a_slot_again(side):
    key = _key()
    p = side.producer
    with p.batch():
        hs = [p.add_task(wt.five_a_second_failing_once, key, i) for i in range(3)]
    assert sorted(h.wait(30) for h in hs) == [0, 1, 2]
    s = sorted(wt.starts[key])
    assert len(s) == 6
    # six admissions at 5/s: the last slot is 1 s after the first (a deferred task's retry does
    # not run in the slot its first run reserved)
    assert s[-1] - s[0] >= 0.98, s


@pytest.mark.timeout(60)
def test_memory_a_lapsed_lease_of_a_task_still_running_is_taken_back():
    """As on Redis (test_limits_attack): a running task's lease that lapsed (a stalled
    heartbeat) is taken back by the next heartbeat, so no second task of a limit of one starts."""
    broker = MemoryBroker(visibility_timeout=0.6)
    p = _memory_producer(broker)
    wt.register(p)
    w = Consumer(p, broker, concurrency=4).start()
    try:
        key = _key()
        first = p.add_task(wt.one_at_a_time, key, "a")
        assert wt.event(wt.started, f"{key}:a").wait(20)
        [(ident, leases)] = [(i, ls) for i, ls in broker._leases.items() if ls]
        with broker._cv:
            for lease_id in leases:
                leases[lease_id] = 0.0  # lapsed
        wait_until(
            lambda: any(t > time.monotonic() for t in broker._leases.get(ident, {}).values()), 5, "its lease taken back"
        )
        second = p.add_task(wt.one_at_a_time, key, "b")
        wait_until(lambda: w.counts["parked_concurrency_limit"] >= 1, 10, "the second to park")
        wt.event(wt.gates, f"{key}:a").set()
        wt.event(wt.gates, f"{key}:b").set()
        assert first.wait(20) == "a" and second.wait(20) == "b"
        assert wt.most[key] == 1
    finally:
        w.stop(10)
        p.shutdown(wait_for_completion=False, timeout=10)


@pytest.mark.timeout(120)
def test_the_worker_keeps_its_figures_per_task_name_on_every_broker(side):
    r = side.producer.add_task(rt.add, 1, 2)
    assert r.wait(30) == 3
    w = side.worker
    name = f"{rt.add.__module__}.add"
    wait_until(lambda: w.figures.totals().get(name, {}).get("succeeded", 0) >= 1, 10, "the batch recorded")
    # the registry is the broker's: Redis publishes the worker, memory keeps no registry
    assert (side.worker.session.cluster_heartbeat(w, 1.0) is None) == (side.kind == "memory")
