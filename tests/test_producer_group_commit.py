"""Group commit of a Redis producer's add_task across threads (brokers/group_commit.py).

Concurrent add_task calls share round trips; each still returns only once Redis holds its task
(or raises the error of its flush, and then none of that flush is in Redis). The first flush is
held open by a gate where a test needs callers to pile up behind it deterministically."""

from __future__ import annotations

import os
import threading

import pytest
import redis_tasks as rt
from fault_proxy import FaultProxy
from redis_helpers import RedisServer, prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)

from catzilla_tasks import BackgroundTasks, TaskPriority
from catzilla_tasks.brokers import RedisBroker
from catzilla_tasks.brokers.group_commit import GroupCommit
from catzilla_tasks.brokers.protocol import MSG_ARGS, MSG_ID, MSG_OPTIONS

pytestmark = pytest.mark.timeout(120)


def producer(url: str, prefix: str, **kw) -> BackgroundTasks:
    return BackgroundTasks(workers=1, broker=RedisBroker(url, prefix=prefix, **kw))


def published(broker: RedisBroker) -> dict[str, list]:
    """Every message in the four streams and the delayed set, by task id: [(where, message)...]."""
    out: dict[str, list] = {}
    for prio, stream in enumerate(broker.streams):
        if broker.redis.type(stream) != b"stream":  # (made another type by a test)
            continue
        for _id, fields in broker.redis.xrange(stream):
            msg = broker.serializer.loads(fields[b"m"])
            out.setdefault(msg[MSG_ID], []).append((prio, msg))
    for member in broker.redis.zrange(broker.delayed_key, 0, -1):
        msg = broker.serializer.loads(member[1:])
        out.setdefault(msg[MSG_ID], []).append(("delayed", msg))
    return out


def by_marker(broker: RedisBroker) -> dict[str, int]:
    """How many copies of each echo(marker) call are in Redis."""
    out: dict[str, int] = {}
    for copies in published(broker).values():
        for _where, msg in copies:
            out[msg[MSG_ARGS][0]] = out.get(msg[MSG_ARGS][0], 0) + 1
    return out


class Gate:
    """Holds the reply of the first ``n`` flushes of ``group`` until ``release()``."""

    def __init__(self, group: GroupCommit, n: int = 1) -> None:
        self.group = group
        self.left = n
        self.holding = threading.Event()
        self.open = threading.Event()
        self.sizes: list[int] = []
        self.threads: list[int] = []
        self._begin, self._end = group._begin, group._end
        group._begin, group._end = self.begin, self.end

    def begin(self, items):
        self.sizes.append(len(items))
        self.threads.append(threading.get_ident())
        return self._begin(items)

    def end(self, token):
        if self.left > 0:
            self.left -= 1
            self.holding.set()
            assert self.open.wait(60), "gate never opened"
        return self._end(token)

    def release(self) -> None:
        self.open.set()


def hold_first_flush(tasks: BackgroundTasks) -> tuple[Gate, threading.Thread]:
    """A caller whose flush (echo("first")) is held open by a gate: callers that come now queue
    behind it until ``gate.release()``."""
    gate = Gate(tasks.broker._group)
    first = threading.Thread(target=tasks.add_task, args=(rt.echo, "first"), daemon=True)
    first.start()
    assert gate.holding.wait(30)
    return gate, first


def run_threads(n: int, target, *args) -> list[threading.Thread]:
    ts = [threading.Thread(target=target, args=(i, *args), daemon=True) for i in range(n)]
    for t in ts:
        t.start()
    return ts


def join(ts: list[threading.Thread]) -> None:
    for t in ts:
        t.join(60)
        assert not t.is_alive(), "a publishing thread hangs"


def test_concurrent_add_task_all_published_once_with_their_options(redis_url, prefix):
    tasks = producer(redis_url, prefix)
    broker = tasks.broker
    gate = Gate(broker._group, n=0)
    handles: dict[int, list] = {}
    prios = [TaskPriority.CRITICAL, TaskPriority.HIGH, TaskPriority.NORMAL, TaskPriority.LOW]

    def work(i):
        out = handles.setdefault(i, [])
        for j in range(40):
            if j % 10 == 3:
                out.append(("d", tasks.options(delay_ms=60_000).add_task(rt.echo, f"{i}.{j}")))
            elif j % 10 == 7:
                out.append(("k", tasks.options(idempotency_key=f"k{i}.{j}").add_task(rt.echo, f"{i}.{j}")))
            else:
                out.append((int(prios[j % 4]), tasks.options(priority=prios[j % 4]).add_task(rt.echo, f"{i}.{j}")))

    join(run_threads(32, work))
    stored = published(broker)
    n = 0
    for out in handles.values():
        for kind, h in out:
            n += 1
            copies = stored.get(h.task_id)
            assert copies is not None and len(copies) == 1, h.task_id
            where, msg = copies[0]
            if kind == "d":
                assert where == "delayed"
            elif kind == "k":
                assert where == int(TaskPriority.NORMAL) and msg[MSG_OPTIONS]["k"] == "k" + msg[MSG_ARGS][0]
            else:
                assert where == kind
    assert n == 32 * 40 == len(stored)
    assert len(gate.sizes) < n, "no flush carried more than one task"


def test_callers_queued_behind_a_flush_share_the_next_one(redis_url, prefix):
    tasks = producer(redis_url, prefix)
    gate, first = hold_first_flush(tasks)
    results: dict[int, object] = {}
    ts = run_threads(20, lambda i: results.__setitem__(i, tasks.add_task(rt.echo, i)))
    wait_until(lambda: len(tasks.broker._group._queue) == 20, 30, "20 callers queued")
    assert not results  # none returned: Redis does not hold their tasks yet
    gate.release()
    join(ts + [first])
    assert gate.sizes == [1, 20]
    assert len(results) == 20 and len(published(tasks.broker)) == 21


def test_a_lone_caller_flushes_on_its_own_thread(redis_url, prefix):
    tasks = producer(redis_url, prefix)
    gate = Gate(tasks.broker._group, n=0)
    for _ in range(3):
        tasks.add_task(rt.echo, 1)
    assert gate.sizes == [1, 1, 1] and set(gate.threads) == {threading.get_ident()}


def test_script_error_mid_flush_fails_exactly_the_callers_of_that_flush(redis_url, prefix):
    """The CRITICAL stream is made a key of another type: a flush carrying a CRITICAL task fails
    as a whole (none of its tasks stored, its NORMAL ones neither), the others succeed; each
    caller gets the outcome of the flush that carried its own task."""
    tasks = producer(redis_url, prefix)
    broker = tasks.broker
    broker.redis.set(broker.streams[0], b"not a stream")
    gate, first = hold_first_flush(tasks)
    outcome: dict[str, object] = {}

    def call(i, prio):
        marker = f"{prio.name}.{i}"
        try:
            tasks.options(priority=prio).add_task(rt.echo, marker)
            outcome[marker] = "ok"
        except redis.ResponseError as exc:
            outcome[marker] = exc

    ts = run_threads(10, call, TaskPriority.NORMAL) + run_threads(5, call, TaskPriority.CRITICAL)
    wait_until(lambda: len(broker._group._queue) == 15, 30, "15 callers queued")
    gate.release()
    join(ts + [first])
    assert len(outcome) == 15
    assert all(isinstance(v, redis.ResponseError) and "WRONGTYPE" in str(v) for v in outcome.values()), outcome
    assert by_marker(broker) == {"first": 1}  # nothing of the failed flush is in Redis
    assert len({id(v) for v in outcome.values()}) == 15  # each caller raises an error of its own

    # the same mix without a gate: flushes of every size; still one outcome per caller, kept
    outcome.clear()

    def mixed(i):
        for j in range(20):
            call(f"{i}.{j}", TaskPriority.CRITICAL if (i + j) % 7 == 0 else TaskPriority.NORMAL)

    join(run_threads(16, mixed))
    stored = by_marker(broker)
    assert len(outcome) == 16 * 20
    for marker, result in outcome.items():
        assert stored.get(marker, 0) == (1 if result == "ok" else 0), (marker, result)
    assert any(r == "ok" for r in outcome.values())
    assert not any(r == "ok" for m, r in outcome.items() if m.startswith("CRITICAL"))


def test_connection_reset_mid_flush_fails_that_flush_and_the_next_ones_go_on(redis_url, prefix):
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = FaultProxy(port)
    try:
        tasks = producer(proxy.url, prefix, socket_timeout=10)
        broker = tasks.broker
        gate, first = hold_first_flush(tasks)
        outcome: dict[str, object] = {}

        def call(i):
            try:
                tasks.add_task(rt.echo, f"m{i}")
                outcome[f"m{i}"] = "ok"
            except (redis.ConnectionError, ConnectionError) as exc:
                outcome[f"m{i}"] = exc

        ts = run_threads(12, call)
        wait_until(lambda: len(broker._group._queue) == 12, 30, "12 callers queued")
        trigger = proxy.on_command(b"EVALSHA", "reset_after")  # the flush of 12 is applied, its reply lost
        gate.release()
        join(ts + [first])
        assert trigger.fired.is_set()
        errors = (redis.ConnectionError, ConnectionError)
        assert all(isinstance(v, errors) for v in outcome.values()), sorted(map(repr, outcome.items()))
        # applied before the reset (at least once: the callers may publish again)
        assert by_marker(broker) == {"first": 1, **{f"m{i}": 1 for i in range(12)}}
        # the next publishes use a fresh connection
        outcome.clear()
        join(run_threads(12, call))
        assert all(v == "ok" for v in outcome.values())
        tasks.add_task(rt.echo, "after")
    finally:
        proxy.close()


def test_redis_killed_mid_flush_every_caller_gets_an_error_none_hangs(prefix):
    server = RedisServer()
    try:
        tasks = producer(server.url, prefix, socket_timeout=5, socket_connect_timeout=2)
        broker = tasks.broker
        tasks.add_task(rt.echo, "warm")
        gate = Gate(broker._group)
        outcome: dict[int, object] = {}

        def call(i):
            try:
                tasks.add_task(rt.echo, i)
                outcome[i] = "ok"
            except Exception as exc:  # noqa: BLE001 - whatever it is, each caller gets one
                outcome[i] = exc

        ts = run_threads(1, call)
        assert gate.holding.wait(30)
        ts += run_threads(10, lambda i: call(i + 1))
        wait_until(lambda: len(broker._group._queue) == 10, 30, "10 callers queued")
        server.kill()
        gate.release()
        join(ts)
        assert len(outcome) == 11
        failed = [v for v in outcome.values() if v != "ok"]
        assert len(failed) >= 10, outcome
        assert all(isinstance(v, (redis.ConnectionError, ConnectionError)) for v in failed), outcome
        assert broker._group._busy is False and not broker._group._queue  # the chain ended
    finally:
        server.stop()


def test_bad_input_fails_its_own_caller_only_before_joining_a_flush(redis_url, prefix):
    tasks = producer(redis_url, prefix)
    broker = tasks.broker
    gate, first = hold_first_flush(tasks)
    outcome: dict[int, object] = {}

    def call(i):
        try:
            if i % 3 == 0:
                tasks.add_task(rt.echo, object())  # cannot be encoded
            elif i % 3 == 1:
                tasks.options(idempotency_key="").add_task(rt.echo, i)
            else:
                tasks.add_task(rt.echo, i)
            outcome[i] = "ok"
        except (TypeError, ValueError) as exc:
            outcome[i] = exc

    ts = run_threads(12, call)
    wait_until(lambda: len(outcome) == 8 and len(broker._group._queue) == 4, 30, "bad calls failed, good ones queued")
    assert all(isinstance(outcome[i], (TypeError, ValueError)) for i in range(12) if i % 3 != 2)
    gate.release()
    join(ts + [first])
    assert all(outcome[i] == "ok" for i in range(12) if i % 3 == 2)
    assert by_marker(broker) == {"first": 1, **{i: 1 for i in range(12) if i % 3 == 2}}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_does_not_share_the_parents_flush(redis_url, prefix):
    tasks = producer(redis_url, prefix)
    gate = Gate(tasks.broker._group)
    first = threading.Thread(target=tasks.add_task, args=(rt.echo, "parent"), daemon=True)
    first.start()
    assert gate.holding.wait(30)  # the parent's flush is in flight (its lock free, its chain busy)
    pid = os.fork()
    if pid == 0:  # the child: its own chain, not the parent's (whose reader is not here)
        code = 1
        try:
            done = threading.Event()

            def child_publish():
                tasks.add_task(rt.echo, "child")
                done.set()

            threading.Thread(target=child_publish, daemon=True).start()
            code = 0 if done.wait(20) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    gate.release()
    first.join(30)
    assert os.waitstatus_to_exitcode(status) == 0
    assert by_marker(tasks.broker) == {"parent": 1, "child": 1}


def test_a_function_re_decorated_between_calls_publishes_with_its_new_config(redis_url, prefix):
    """Plain calls reuse what a function's config sends (see RedisBroker._prepare); re-decorating
    the function (a new config object) must be seen by the next call, in both publish paths."""
    import asyncio

    tasks = producer(redis_url, prefix)
    broker = tasks.broker

    def job(x):  # (a module-level name is what travels: give it one)
        return x

    job.__module__, job.__qualname__ = "redis_tasks", "job_redecorated"
    try:
        tasks.task(priority=TaskPriority.LOW)(job)
        first = tasks.add_task(job, 1).task_id
        asyncio.run(tasks.add_task_async(job, 2))
        tasks.task(priority=TaskPriority.CRITICAL, delay_ms=0)(job)
        second = tasks.add_task(job, 3).task_id
        third = asyncio.run(tasks.add_task_async(job, 4)).task_id
        where = {tid: copies[0][0] for tid, copies in published(broker).items()}
        assert where[first] == int(TaskPriority.LOW)
        assert where[second] == int(TaskPriority.CRITICAL)
        assert where[third] == int(TaskPriority.CRITICAL)
        tasks.task(delay_ms=60_000)(job)
        fourth = tasks.add_task(job, 5).task_id
        assert published(broker)[fourth][0][0] == "delayed"
    finally:
        tasks.shutdown()


def test_an_unhashable_callable_gets_the_clear_error_not_a_cache_failure(redis_url, prefix):
    tasks = producer(redis_url, prefix)

    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self) -> None:
            pass

    try:
        with pytest.raises(TypeError, match="importable name"):
            tasks.add_task(Unhashable())
    finally:
        tasks.shutdown()


def queue_published(broker: RedisBroker, queue: str) -> dict[str, object]:
    """marker -> where (priority index or "delayed") of every echo(marker) in a named queue."""
    streams, delayed = broker.queue_keys(queue)
    out: dict[str, object] = {}
    for prio, stream in enumerate(streams):
        if broker.redis.type(stream) != b"stream":
            continue
        for _id, fields in broker.redis.xrange(stream):
            out[broker.serializer.loads(fields[b"m"])[MSG_ARGS][0]] = prio
    for member in broker.redis.zrange(delayed, 0, -1):
        out[broker.serializer.loads(member[1:])[MSG_ARGS][0]] = "delayed"
    return out


def test_tasks_routed_to_named_queues_share_the_flush_of_the_others(redis_url, prefix):
    """Callers publishing to two named queues and to the broker's own, at once: one flush
    carries all of them (not one round trip per routed task), each task lands in its queue's
    stream of its priority or its queue's delayed set; in the async path too."""
    import asyncio

    tasks = producer(redis_url, prefix)
    broker = tasks.broker
    gate, first = hold_first_flush(tasks)

    def call(i):
        if i % 3 == 0:
            tasks.options(queue="emails", priority=TaskPriority.HIGH).add_task(rt.echo, f"e{i}")
        elif i % 3 == 1:
            tasks.options(queue="reports", delay_ms=60_000).add_task(rt.echo, f"r{i}")
        else:
            tasks.add_task(rt.echo, f"o{i}")

    ts = run_threads(12, call)
    wait_until(lambda: len(broker._group._queue) == 12, 30, "12 callers queued")
    gate.release()
    join(ts + [first])
    assert gate.sizes == [1, 12]
    emails, reports = queue_published(broker, "emails"), queue_published(broker, "reports")
    assert emails == {f"e{i}": int(TaskPriority.HIGH) for i in range(0, 12, 3)}
    assert reports == {f"r{i}": "delayed" for i in range(1, 12, 3)}
    assert {m for m in by_marker(broker)} == {"first"} | {f"o{i}" for i in range(2, 12, 3)}

    async def main():
        await asyncio.gather(
            *(tasks.options(queue="emails").add_task_async(rt.echo, f"ae{i}") for i in range(20)),
            *(tasks.add_task_async(rt.echo, f"ao{i}") for i in range(20)),
        )

    asyncio.run(main())
    emails = queue_published(broker, "emails")
    assert all(emails.get(f"ae{i}") == int(TaskPriority.NORMAL) for i in range(20)), emails
    assert all(by_marker(broker).get(f"ao{i}") == 1 for i in range(20))


def test_a_named_queue_key_of_another_type_fails_the_whole_flush_and_a_bad_queue_name_its_caller(redis_url, prefix):
    tasks = producer(redis_url, prefix)
    broker = tasks.broker
    streams, _ = broker.queue_keys("broken")
    broker.redis.set(streams[int(TaskPriority.NORMAL)], b"not a stream")
    gate, first = hold_first_flush(tasks)
    outcome: dict[int, object] = {}

    def call(i):
        try:
            if i == 0:
                tasks.options(queue="broken").add_task(rt.echo, "b")
            else:
                tasks.add_task(rt.echo, f"o{i}")
            outcome[i] = "ok"
        except redis.ResponseError as exc:
            outcome[i] = exc

    ts = run_threads(6, call)
    wait_until(lambda: len(broker._group._queue) == 6, 30, "6 callers queued")
    gate.release()
    join(ts + [first])
    assert all(isinstance(v, redis.ResponseError) and "WRONGTYPE" in str(v) for v in outcome.values()), outcome
    assert by_marker(broker) == {"first": 1}  # the flush is stored whole or not at all
    with pytest.raises(ValueError):  # a reserved queue name: its own caller's error, nothing sent
        tasks.options(queue="done").add_task(rt.echo, "x")
