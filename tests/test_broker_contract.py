"""The broker contract (brokers/base.py), one scenario run on every broker: a producer built by
BackgroundTasks(broker=...) publishes, a consumer of that broker runs the tasks, results and
dead letters come back through the broker. Redis: a real redis-server and the Worker; memory:
MemoryBroker and the interface-only Consumer."""

from __future__ import annotations

import threading

import pytest
import redis_tasks as rt
from redis_helpers import prefix, redis, redis_url  # noqa: F401  (fixtures)

from catzilla_tasks import BackgroundTasks, TaskPriority, TaskStatus
from catzilla_tasks.brokers import RedisBroker, Worker
from catzilla_tasks.brokers.base import Broker
from catzilla_tasks.brokers.consumer import Consumer
from catzilla_tasks.brokers.memory import MemoryBroker
from catzilla_tasks.brokers.producer import DistributedTasks


class Side:
    """A producer engine and a consumer on one broker; ``stop()`` ends both."""

    def __init__(self, kind: str, request, monkeypatch) -> None:
        self.engines: list[BackgroundTasks] = []
        if kind == "redis":
            url = request.getfixturevalue("redis_url")
            pfx = request.getfixturevalue("prefix")
            monkeypatch.setenv("CT_TEST_REDIS_URL", url)
            make = lambda: RedisBroker(url, prefix=pfx)  # noqa: E731
            self.producer = self._engine(make())
            self.broker = self.producer.broker
            worker_engine = self._engine(make())
            self.worker = Worker(worker_engine, concurrency=8)
            self.thread = threading.Thread(target=self.worker.run, daemon=True)
            self.thread.start()
            assert self.worker.ready.wait(10)
        else:
            self.broker = MemoryBroker()
            self.producer = self._engine(self.broker)
            self.worker = Consumer(self._engine(self.broker), self.broker, concurrency=8).start()
            self.thread = None

    def _engine(self, broker) -> BackgroundTasks:
        eng = BackgroundTasks(workers=2, broker=broker)
        rt.register(eng)
        self.engines.append(eng)
        return eng

    def stop(self) -> None:
        self.worker.stop()
        if self.thread is not None:
            self.thread.join(30)
        for eng in self.engines:
            eng.shutdown(wait_for_completion=False, timeout=10)
        self.broker.close()


@pytest.fixture(params=["memory", "redis"])
def side(request, monkeypatch):
    s = Side(request.param, request, monkeypatch)
    yield s
    s.stop()


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


# -- the consumer side behind the interface (FetchingBroker: the in-memory broker) ------------

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
        assert c.counts["succeeded"] == 1
    finally:
        c.stop(10)
        p.shutdown(wait_for_completion=False)


@pytest.mark.timeout(60)
def test_from_engine_makes_an_app_engine_itself_the_producer():
    # `catzilla-tasks worker app:tasks --broker URL` on an app created without a broker: the
    # app's own engine object (the one its task functions refer to) must publish
    eng = BackgroundTasks(workers=1)
    rt.register(eng)
    b = MemoryBroker()
    c = Consumer(_memory_producer(b), b, concurrency=2).start()
    try:
        assert DistributedTasks.from_engine(eng, b) is eng
        assert type(eng) is DistributedTasks and eng.broker is b and "add_task" not in vars(eng)
        assert "redis_tasks.add" in eng.registered_tasks
        assert eng.add_task(rt.add, 2, 3).wait(10) == 5
    finally:
        c.stop(10)
        eng.shutdown(wait_for_completion=False)


def test_a_subclass_of_the_engine_given_a_broker_says_what_to_subclass():
    class Mine(BackgroundTasks):
        pass

    with pytest.raises(TypeError, match="DistributedTasks"):
        Mine(workers=1, broker=MemoryBroker())
    with pytest.raises(TypeError, match="redis:// URL or a Broker"):
        BackgroundTasks(workers=1, broker=42)
