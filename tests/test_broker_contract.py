"""The broker contract (brokers/base.py), one scenario run on every broker: a producer built by
BackgroundTasks(broker=...) publishes, a consumer of that broker runs the tasks, results and
dead letters come back through the broker. Redis: a real redis-server and the Worker; memory:
MemoryBroker and the interface-only Consumer."""

from __future__ import annotations

import threading

import pytest
from redis_helpers import redis, redis_url, prefix  # noqa: F401  (fixtures)

import redis_tasks as rt
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
