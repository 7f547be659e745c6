"""add_task_async: on a Redis producer it publishes on redis.asyncio without blocking the event
loop, group-committed among the coroutines of a loop; on the in-process engine it queues at
once. Same handles, same options, same errors as add_task."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis_tasks as rt
from redis_helpers import RedisServer, prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)
from test_producer_group_commit import by_marker, published

from catzilla_tasks import BackgroundTasks, TaskPriority, TaskResult
from catzilla_tasks.brokers import MemoryBroker, RedisBroker, RemoteResult
from catzilla_tasks.brokers.protocol import MSG_OPTIONS

pytestmark = pytest.mark.timeout(120)


def producer(url: str, prefix: str, **kw) -> BackgroundTasks:
    return BackgroundTasks(workers=1, broker=RedisBroker(url, prefix=prefix, **kw))


class AsyncGate:
    """Holds the first ``n`` flushes of this loop's group commit until ``open`` is set."""

    def __init__(self, broker: RedisBroker, n: int = 1) -> None:
        self.group = broker._agroups.get(asyncio.get_running_loop())[0]
        self._send = self.group._send
        self.group._send = self.send
        self.left = n
        self.holding = asyncio.Event()
        self.open = asyncio.Event()
        self.sizes: list[int] = []

    async def send(self, items):
        self.sizes.append(len(items))
        if self.left > 0:
            self.left -= 1
            self.holding.set()
            await self.open.wait()
        return await self._send(items)


async def until(cond, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


def test_in_process_engine_add_task_async_returns_its_task_result_at_once():
    with BackgroundTasks(workers=2) as tasks:

        async def main():
            r = await tasks.add_task_async(rt.add, 2, 3)
            o = await tasks.options(priority=TaskPriority.CRITICAL).add_task_async(rt.add, 4, b=5)
            return r, o

        r, o = asyncio.run(main())
        assert isinstance(r, TaskResult) and isinstance(o, TaskResult)
        assert r.wait(10) == 5 and o.wait(10) == 9
        assert o.priority is TaskPriority.CRITICAL
        with pytest.raises(TypeError):
            asyncio.run(tasks.add_task_async(42))


def test_in_process_engine_full_with_block_timeout_waits_off_the_loop():
    tasks = BackgroundTasks(workers=1, min_workers=1, max_workers=1, queue_size=1, enable_auto_scaling=False)
    gate = threading.Event()
    try:
        tasks.pause()

        async def main():
            first = await tasks.add_task_async(gate.wait, 10)
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.005)

            t = asyncio.create_task(ticker())
            waiting = asyncio.create_task(tasks.options(block_timeout=30).add_task_async(rt.add, 1, 1))
            await asyncio.sleep(0.05)
            before = ticks
            await until(lambda: ticks >= before + 10, "10 ticks of the loop")  # waiting for room, the loop goes on
            assert not waiting.done()
            tasks.resume()
            gate.set()
            second = await asyncio.wait_for(waiting, 30)
            t.cancel()
            return first, second

        first, second = asyncio.run(main())
        assert second.wait(10) == 2
    finally:
        gate.set()
        tasks.resume()
        tasks.shutdown()


def test_memory_broker_add_task_async():
    tasks = BackgroundTasks(workers=1, broker=MemoryBroker())

    async def main():
        return await tasks.add_task_async(rt.add, 1, 2), await tasks.options(delay_ms=5).add_task_async(rt.add, 1, 3)

    a, b = asyncio.run(main())
    assert a.task_id and b.task_id and a.task_id != b.task_id
    assert tasks.broker.queued()["NORMAL"] == 1 and tasks.broker.queued()["delayed"] == 1


def test_thousand_coroutines_published_once_with_their_options_in_few_flushes(redis_url, prefix):
    tasks = producer(redis_url, prefix)
    broker = tasks.broker

    async def main():
        gate = AsyncGate(broker, n=0)

        async def one(i):
            if i % 10 == 3:
                return "d", await tasks.options(delay_ms=60_000).add_task_async(rt.echo, i)
            if i % 10 == 7:
                return "k", await tasks.options(idempotency_key=f"k{i}").add_task_async(rt.echo, i)
            prio = TaskPriority(i % 4)
            return int(prio), await tasks.options(priority=prio).add_task_async(rt.echo, i)

        return await asyncio.gather(*(one(i) for i in range(1000))), gate.sizes

    results, sizes = asyncio.run(main())
    stored = published(broker)
    assert len(stored) == 1000
    for kind, h in results:
        assert isinstance(h, RemoteResult)
        ((where, msg),) = stored[h.task_id]
        if kind == "d":
            assert where == "delayed"
        elif kind == "k":
            assert msg[MSG_OPTIONS]["k"].startswith("k") and where == int(TaskPriority.NORMAL)
        else:
            assert where == kind
    # coalesced; the 100 keyed ones are deduplicated at submit, one script each
    assert len(sizes) < 100 and sum(sizes) == 900


def test_the_event_loop_is_not_blocked_while_a_publish_waits_for_redis(redis_url, prefix):
    tasks = producer(redis_url, prefix)

    async def main():
        gate = AsyncGate(tasks.broker)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        t = asyncio.create_task(ticker())
        pub = asyncio.create_task(tasks.add_task_async(rt.echo, "x"))
        await gate.holding.wait()
        before = ticks
        await until(lambda: ticks >= before + 10, "10 ticks of the loop")  # the publish waits, the loop goes on
        assert not pub.done()
        gate.open.set()
        h = await pub
        t.cancel()
        return h

    h = asyncio.run(main())
    assert h.task_id in published(tasks.broker)


def test_script_error_mid_flush_each_coroutine_gets_its_own_flush_outcome(redis_url, prefix):
    tasks = producer(redis_url, prefix)
    broker = tasks.broker
    broker.redis.set(broker.streams[0], b"not a stream")

    async def main():
        gate = AsyncGate(broker)
        first = asyncio.create_task(tasks.add_task_async(rt.echo, "first"))
        await gate.holding.wait()
        outcome = {}

        async def call(marker, prio):
            try:
                await tasks.options(priority=prio).add_task_async(rt.echo, marker)
                outcome[marker] = "ok"
            except redis.ResponseError as exc:
                outcome[marker] = exc

        calls = [asyncio.create_task(call(f"N{i}", TaskPriority.NORMAL)) for i in range(10)]
        calls += [asyncio.create_task(call(f"C{i}", TaskPriority.CRITICAL)) for i in range(3)]
        await until(lambda: len(gate.group._queue) == 13, "13 queued")
        gate.open.set()
        await asyncio.gather(first, *calls)
        assert all(isinstance(v, redis.ResponseError) for v in outcome.values()), outcome
        assert len({id(v) for v in outcome.values()}) == 13
        # then flushes of every size, mixed
        outcome.clear()
        await asyncio.gather(
            *(call(f"{'C' if i % 9 == 0 else 'N'}x{i}", TaskPriority(0 if i % 9 == 0 else 2)) for i in range(500))
        )
        return outcome

    outcome = asyncio.run(main())
    stored = by_marker(broker)
    assert stored.get("first") == 1 and not any(m[0] in "NC" and m[1:2].isdigit() for m in stored)
    for marker, result in outcome.items():
        assert stored.get(marker, 0) == (1 if result == "ok" else 0), (marker, result)
    assert not any(r == "ok" for m, r in outcome.items() if m.startswith("C"))


def test_cancelled_waiting_coroutine_withdraws_its_task_others_unaffected(redis_url, prefix):
    tasks = producer(redis_url, prefix)

    async def main():
        gate = AsyncGate(tasks.broker, n=2)
        first = asyncio.create_task(tasks.add_task_async(rt.echo, "first"))  # flush 1, held
        await gate.holding.wait()
        queued = [asyncio.create_task(tasks.add_task_async(rt.echo, f"q{i}")) for i in range(5)]
        await until(lambda: len(gate.group._queue) == 5, "5 queued")
        queued[2].cancel()  # not taken by a flush yet: withdrawn
        first.cancel()  # its flush is in flight: it is published all the same
        gate.holding.clear()
        gate.open.set()
        with pytest.raises(asyncio.CancelledError):
            await first
        with pytest.raises(asyncio.CancelledError):
            await queued[2]
        return [await q for i, q in enumerate(queued) if i != 2], gate.sizes

    handles, sizes = asyncio.run(main())
    assert sizes == [1, 4]
    assert by_marker(tasks.broker) == {"first": 1, "q0": 1, "q1": 1, "q3": 1, "q4": 1}
    assert all(h.task_id in published(tasks.broker) for h in handles)


def test_loop_shutdown_with_publishes_in_flight_ends_them_and_a_new_loop_publishes(redis_url, prefix):
    tasks = producer(redis_url, prefix)
    seen = {}

    async def main():
        gate = AsyncGate(tasks.broker)
        seen["gate"] = gate
        asyncio.create_task(tasks.add_task_async(rt.echo, "lost0"))
        await gate.holding.wait()
        for i in range(1, 50):
            asyncio.create_task(tasks.add_task_async(rt.echo, f"lost{i}"))
        await until(lambda: len(gate.group._queue) == 49, "49 queued")
        # returning ends asyncio.run: it cancels the callers and the flusher, whose flush is held

    t0 = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - t0 < 10
    group = seen["gate"].group
    assert group._flusher is None and not group._queue
    stored = by_marker(tasks.broker)
    assert stored.get("lost0", 0) <= 1 and not any(f"lost{i}" in stored for i in range(1, 50))

    # the same in a thread's own loop, closed while waiters are still awaiting their flush
    async def waiters():
        gate = AsyncGate(tasks.broker)
        outs = [asyncio.create_task(tasks.add_task_async(rt.echo, f"w{i}")) for i in range(20)]
        await gate.holding.wait()
        group = gate.group
        group._flusher.cancel()  # the loop's flusher cancelled (a loop shutting down does it)
        done, _ = await asyncio.wait(outs, timeout=10)
        return [t.exception() for t in done], group

    errors, group = asyncio.run(waiters())
    assert len(errors) == 20 and all(isinstance(e, ConnectionError) for e in errors[1:] if e is not None)
    assert sum(isinstance(e, (ConnectionError, asyncio.CancelledError)) for e in errors) >= 19

    async def again():
        return await asyncio.gather(*(tasks.add_task_async(rt.echo, f"again{i}") for i in range(10)))

    hs = asyncio.run(again())
    stored = published(tasks.broker)
    assert all(h.task_id in stored for h in hs)


def test_bad_input_fails_its_own_coroutine_only(redis_url, prefix):
    tasks = producer(redis_url, prefix)

    async def main():
        gate = AsyncGate(tasks.broker)
        first = asyncio.create_task(tasks.add_task_async(rt.echo, "first"))
        await gate.holding.wait()
        good = [asyncio.create_task(tasks.add_task_async(rt.echo, f"g{i}")) for i in range(5)]
        with pytest.raises(TypeError):
            await tasks.add_task_async(rt.echo, object())
        with pytest.raises(ValueError):
            await tasks.options(idempotency_key="").add_task_async(rt.echo, 1)
        with pytest.raises(TypeError):
            await tasks.add_task_async(lambda: None)
        await until(lambda: len(gate.group._queue) == 5, "5 queued")
        gate.open.set()
        return await asyncio.gather(first, *good)

    hs = asyncio.run(main())
    assert by_marker(tasks.broker) == {"first": 1, **{f"g{i}": 1 for i in range(5)}}
    assert len(hs) == 6


def test_redis_killed_mid_flush_every_coroutine_gets_an_error(prefix):
    server = RedisServer()
    try:
        tasks = producer(server.url, prefix, socket_timeout=5, socket_connect_timeout=2)

        async def main():
            await tasks.add_task_async(rt.echo, "warm")
            gate = AsyncGate(tasks.broker)
            outs = [asyncio.create_task(tasks.add_task_async(rt.echo, i)) for i in range(30)]
            await gate.holding.wait()
            server.kill()
            gate.open.set()
            done, pending = await asyncio.wait(outs, timeout=30)
            assert not pending
            return [t.exception() for t in outs]

        errors = asyncio.run(main())
        assert all(isinstance(e, (redis.ConnectionError, ConnectionError)) for e in errors[1:]), errors
    finally:
        server.stop()


def test_sync_and_async_publishers_at_once(redis_url, prefix):
    tasks = producer(redis_url, prefix)
    out = []

    def threads_part():
        for i in range(200):
            out.append(tasks.add_task(rt.echo, f"t{i}"))

    async def coros():
        return await asyncio.gather(*(tasks.add_task_async(rt.echo, f"a{i}") for i in range(300)))

    th = [threading.Thread(target=threads_part) for _ in range(4)]
    for t in th:
        t.start()
    hs = asyncio.run(coros())
    for t in th:
        t.join(60)
    stored = published(tasks.broker)
    assert len(stored) == 4 * 200 + 300 and all(h.task_id in stored for h in hs + out)


def _no_sync_publish(broker: RedisBroker) -> None:
    """From an async handler the integrations must not use the blocking publish."""

    def refuse(*a, **k):
        raise AssertionError("submit (blocking) called from an async handler")

    broker.submit = refuse


def test_starlette_detached_add_task_async_on_a_broker_engine(redis_url, prefix):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from catzilla_tasks.integrations.starlette import DetachedBackgroundTasks

    tasks = producer(redis_url, prefix)
    _no_sync_publish(tasks.broker)

    async def route(request):
        bt = DetachedBackgroundTasks(engine=tasks)
        h = await bt.add_task_async(rt.echo, "from-route")
        return JSONResponse({"id": h.task_id, "n": len(bt.results)})

    with TestClient(Starlette(routes=[Route("/", route)])) as client:
        body = client.get("/").json()
    assert body["n"] == 1 and body["id"] in published(tasks.broker)

    # the in-process engine: the same call, a TaskResult, at once
    with BackgroundTasks(workers=1) as local:

        async def local_route(request):
            h = await DetachedBackgroundTasks(engine=local).add_task_async(rt.add, 2, 2)
            return JSONResponse({"v": await h})

        with TestClient(Starlette(routes=[Route("/", local_route)])) as client:
            assert client.get("/").json() == {"v": 4}


def test_starlette_dropin_publishes_with_add_task_async_on_a_broker_engine(redis_url, prefix):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from catzilla_tasks.integrations import starlette as st

    tasks = producer(redis_url, prefix, result_ttl=60)
    _no_sync_publish(tasks.broker)
    waited = threading.Event()

    async def route(request):
        bt = st.BackgroundTasks(engine=tasks)
        bt.add_task(rt.echo, "after-response")
        return JSONResponse({"ok": True}, background=bt)

    def fake_worker():  # stores the outcome the drop-in waits for, once the task is in Redis
        wait_until(lambda: published(tasks.broker), 30, "the task published")
        (task_id,) = published(tasks.broker)
        tasks.broker.redis.rpush(tasks.broker.result_key(task_id), tasks.broker.serializer.dumps([0, "done"]))
        waited.set()

    t = threading.Thread(target=fake_worker, daemon=True)
    t.start()
    with TestClient(Starlette(routes=[Route("/", route)])) as client:
        assert client.get("/").json() == {"ok": True}
    assert waited.is_set()


def test_catzilla_app_add_task_async_takes_catzillas_option_keywords(redis_url, prefix):
    pytest.importorskip("catzilla")
    from catzilla import Catzilla

    from catzilla_tasks.integrations.catzilla import enable_background_tasks

    app = Catzilla(production=True, show_banner=False, log_requests=False)
    app.tasks = producer(redis_url, prefix)
    enable_background_tasks(app, prefix=None)
    _no_sync_publish(app.tasks.broker)

    async def handler():
        a = await app.add_task_async(rt.echo, "crit", priority=TaskPriority.CRITICAL)
        b = await app.add_task_async(rt.echo, "later", delay_ms=60_000)
        c = await app.tasks.add_task_async(rt.echo, "plain")
        return a, b, c

    a, b, c = asyncio.run(handler())
    stored = published(app.tasks.broker)
    assert stored[a.task_id][0][0] == int(TaskPriority.CRITICAL)
    assert stored[b.task_id][0][0] == "delayed"
    assert stored[c.task_id][0][0] == int(TaskPriority.NORMAL)


def test_keyed_add_task_async_is_deduplicated_at_submit_as_add_task_is(redis_url, prefix):
    tasks = producer(redis_url, prefix)

    async def main():
        return await asyncio.gather(
            *(tasks.options(idempotency_key="same").add_task_async(rt.echo, i) for i in range(50))
        )

    hs = asyncio.run(main())
    assert len({h.task_id for h in hs}) == 1 and len(published(tasks.broker)) == 1
    assert tasks.options(idempotency_key="same").add_task(rt.echo, 99).task_id == hs[0].task_id


def test_routed_add_task_async_goes_to_its_named_queue(redis_url, prefix):
    tasks = producer(redis_url, prefix)

    async def main():
        a = await tasks.options(queue="emails").add_task_async(rt.echo, "routed")
        b = await tasks.options(queue="emails", delay_ms=60_000).add_task_async(rt.echo, "later")
        c = await tasks.add_task_async(rt.echo, "own")
        return a, b, c

    a, b, c = asyncio.run(main())
    streams, delayed = tasks.broker.queue_keys("emails")
    (entry,) = tasks.broker.redis.xrange(streams[int(TaskPriority.NORMAL)])
    assert tasks.broker.serializer.loads(entry[1][b"m"])[0] == a.task_id
    assert tasks.broker.redis.zcard(delayed) == 1
    assert set(published(tasks.broker)) == {c.task_id}  # the producer's own queue holds only its own


def test_a_silent_redis_fails_the_flush_at_the_socket_timeout_and_the_next_publish_goes_on(redis_url, prefix):
    """The group commit's connection has no socket timeout of its own: one deadline (the broker's
    socket_timeout) bounds each flush. A Redis that goes silent fails the flush's callers with
    redis.TimeoutError on time, never hangs them; the next publish uses a new connection."""
    from fault_proxy import FaultProxy

    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = FaultProxy(port)
    try:
        tasks = producer(proxy.url, prefix, socket_timeout=0.5, socket_connect_timeout=2)

        async def main():
            await tasks.add_task_async(rt.echo, "warm")
            proxy.blackhole(1.5)
            t0 = time.monotonic()
            outs = await asyncio.gather(
                *(tasks.add_task_async(rt.echo, f"s{i}") for i in range(5)), return_exceptions=True
            )
            took = time.monotonic() - t0
            await until(lambda: time.monotonic() - t0 > 1.6, "the silence to end")
            after = await tasks.add_task_async(rt.echo, "after")
            return outs, took, after

        outs, took, after = asyncio.run(main())
        assert all(isinstance(e, redis.TimeoutError) for e in outs), outs
        assert took < 1.4, took  # the socket timeout (0.5 s), not the silence (1.5 s)
        assert isinstance(after, RemoteResult)
        assert by_marker(tasks.broker).get("after") == 1
    finally:
        proxy.close()
