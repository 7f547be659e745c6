"""Adversarial tests of the producer's group commit (issue 18): the async publishing
connection of a loop after the server dropped it, connections and loops left behind by event
loops that ended, and interruptions of threads waiting in a flush chain."""

from __future__ import annotations

import asyncio
import gc
import signal
import threading
import warnings

import pytest
import redis_tasks as rt
from redis_helpers import RedisServer, prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)
from test_producer_group_commit import Gate, by_marker, published, run_threads

from catzilla_tasks import BackgroundTasks
from catzilla_tasks.brokers import RedisBroker, Worker

pytestmark = pytest.mark.timeout(120)


def producer(url: str, prefix: str, **kw) -> BackgroundTasks:
    return BackgroundTasks(workers=1, broker=RedisBroker(url, prefix=prefix, **kw))


def clients(r: redis.Redis) -> int:
    """Connections to the server other than ``r``'s own."""
    me = r.client_id()
    return sum(1 for c in r.client_list() if int(c["id"]) != me)


def test_async_publish_after_the_server_dropped_the_loops_connection(redis_url, prefix):
    """CLIENT KILL (an operator, a proxy, a failover) or the server's idle ``timeout`` closes
    the loop's publishing connection between bursts: the next add_task_async publishes on a new
    one (the sync add_task does, through redis-py's pool check) instead of failing its callers
    while Redis is up."""
    tasks = producer(redis_url, prefix)
    admin = redis.Redis.from_url(redis_url)

    async def main():
        await tasks.add_task_async(rt.echo, "warm")
        killed = admin.client_kill_filter(_type="normal", skipme=True)
        assert killed >= 1
        for _ in range(3):  # (an idle loop between bursts: it reads the end of the killed connection)
            await asyncio.sleep(0)
        h1 = await tasks.add_task_async(rt.echo, "after-kill")
        hs = await asyncio.gather(*(tasks.add_task_async(rt.echo, f"burst{i}") for i in range(20)))
        return [h1, *hs]

    try:
        hs = asyncio.run(main())
        stored = published(tasks.broker)
        assert all(h.task_id in stored for h in hs)
        assert by_marker(tasks.broker)["after-kill"] == 1
        # the sync path, for comparison (redis-py's pool checks a pooled connection first)
        tasks.add_task(rt.echo, "sync-warm")
        admin.client_kill_filter(_type="normal", skipme=True)
        tasks.add_task(rt.echo, "sync-after-kill")
    finally:
        admin.close()


def test_async_publish_after_a_redis_restart_between_bursts(prefix):
    server = RedisServer()
    try:
        tasks = producer(server.url, prefix)

        async def main():
            await tasks.add_task_async(rt.echo, "before")
            server.kill()
            server.start()  # same port, empty
            for _ in range(3):  # (an idle loop between bursts: it reads the end of the old connection)
                await asyncio.sleep(0)
            return await tasks.add_task_async(rt.echo, "after")

        h = asyncio.run(main())
        assert h.task_id in published(tasks.broker)
    finally:
        server.stop()


def test_event_loops_that_ended_leave_no_connection_and_no_loop_behind(redis_url, prefix):
    """An app calling asyncio.run per job (or a test suite, a CLI) with one producer: each
    loop's publishing connections are closed when its loop ends (no ResourceWarning), and the
    broker keeps neither the loop nor its connections."""
    tasks = producer(redis_url, prefix)
    admin = redis.Redis.from_url(redis_url)
    try:
        base = clients(admin)

        async def main(i):
            hs = await asyncio.gather(*(tasks.add_task_async(rt.echo, f"{i}.{j}") for j in range(5)))
            # a keyed one too: it goes through the loop's pooled client
            hs.append(await tasks.options(idempotency_key=f"key{i}").add_task_async(rt.echo, f"k{i}"))
            return hs

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(20):
                asyncio.run(main(i))
            gc.collect()
        leaked = [w for w in caught if issubclass(w.category, ResourceWarning)]
        assert not leaked, [str(w.message) for w in leaked[:3]]
        assert clients(admin) <= base + 1, f"{clients(admin) - base} connections left by 20 ended loops"
        assert len(tasks.broker._agroups._by_loop) <= 1
        assert len(by_marker(tasks.broker)) == 20 * 6
    finally:
        admin.close()


def test_awaiting_results_from_loops_that_ended_leaves_no_connection_behind(redis_url, prefix):
    """``await handle`` (the results' async client of a loop) from one asyncio.run after
    another: each loop's client is closed with its loop, and the broker keeps no loop."""
    b = RedisBroker(redis_url, prefix=prefix)
    eng = BackgroundTasks(workers=2, broker=b)
    rt.register(eng)
    w = Worker(eng, concurrency=2)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    assert w.ready.wait(10)
    tasks = producer(redis_url, prefix)
    admin = redis.Redis.from_url(redis_url)
    try:

        async def main(i):
            return await (await tasks.add_task_async(rt.add, i, 1))

        asyncio.run(main(-1))
        base = clients(admin)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert [asyncio.run(main(i)) for i in range(10)] == [i + 1 for i in range(10)]
            gc.collect()
        leaked = [w for w in caught if issubclass(w.category, ResourceWarning)]
        assert not leaked, [str(w.message) for w in leaked[:3]]
        assert clients(admin) <= base, f"{clients(admin) - base} connections left by 10 ended loops"
        assert len(tasks.broker._aclients._by_loop) <= 1
    finally:
        admin.close()
        w.stop()
        t.join(20)
        eng.shutdown(wait_for_completion=False)


def test_a_waiting_thread_interrupted_while_its_flush_is_being_sent_does_not_stall_the_chain(redis_url, prefix):
    """KeyboardInterrupt (or a signal handler's exception) in the main thread while it waits in
    add_task, at the moment the flush carrying its task is being sent with it first: that flush's
    reply was handed to the interrupted thread, nobody read it, and every caller of that flush
    and every later add_task of the producer waited for ever."""
    tasks = producer(redis_url, prefix)
    group = tasks.broker._group
    gate = Gate(group)
    main_ident = threading.get_ident()
    interrupted = threading.Event()
    real_begin = group._begin

    def begin(items):
        if len(gate.sizes) == 1:  # the flush carrying the main thread's task, main first
            signal.pthread_kill(main_ident, signal.SIGINT)
            interrupted.wait(2)  # (the interrupted caller leaves now, or waits for this send)
        return real_begin(items)

    group._begin = begin
    first = threading.Thread(target=tasks.add_task, args=(rt.echo, "first"), daemon=True)
    first.start()
    assert gate.holding.wait(30)
    others: list[object] = []

    def helper():
        wait_until(lambda: len(group._queue) == 1, 30, "the main thread queued")
        t = threading.Thread(target=lambda: others.append(tasks.add_task(rt.echo, "second")), daemon=True)
        t.start()
        wait_until(lambda: len(group._queue) == 2, 30, "a second caller queued")
        gate.release()
        t.join(30)

    h = threading.Thread(target=helper, daemon=True)
    h.start()
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            tasks.add_task(rt.echo, "main")
        interrupted.set()
    finally:
        signal.signal(signal.SIGINT, old)
    h.join(30)
    first.join(30)
    assert gate.sizes[:2] == [1, 2]
    assert len(others) == 1, "the other caller of the interrupted thread's flush never returned"
    done = threading.Thread(target=lambda: others.append(tasks.add_task(rt.echo, "later")), daemon=True)
    done.start()
    done.join(30)
    assert len(others) == 2, "the producer's next add_task never returned"
    stored = by_marker(tasks.broker)
    assert stored["first"] == stored["second"] == stored["later"] == 1 and stored.get("main", 0) <= 1


def test_a_unix_socket_broker_url_publishes_sync_and_async(tmp_path, prefix):
    """``unix://`` is a documented broker URL: a TCP-only default (socket_keepalive) made every
    connection of such a broker fail with TypeError, add_task and add_task_async alike."""
    import shutil
    import subprocess

    from redis_helpers import clean_env

    sock = str(tmp_path / "redis.sock")
    proc = subprocess.Popen(
        [shutil.which("redis-server"), "--port", "0", "--unixsocket", sock, "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        admin = redis.Redis(unix_socket_path=sock, db=2)

        def up():
            try:
                return admin.ping()
            except (redis.ConnectionError, FileNotFoundError):
                return False

        wait_until(up, 20, "redis-server on its unix socket")
        tasks = producer(f"unix://{sock}?db=2", prefix)
        h = tasks.add_task(rt.echo, "sync")

        async def main():
            hs = await asyncio.gather(*(tasks.add_task_async(rt.echo, f"a{i}") for i in range(5)))
            hs.append(await tasks.options(idempotency_key="k").add_task_async(rt.echo, "keyed"))
            return hs

        hs = asyncio.run(main())
        stored = published(tasks.broker)
        assert all(x.task_id in stored for x in [h, *hs])
        assert admin.xlen(tasks.broker.streams[2]) == 7
        admin.close()
    finally:
        proc.kill()
        proc.wait()


def test_an_interruption_of_the_thread_sending_the_next_flush_is_raised_not_swallowed(redis_url, prefix):
    """The thread that read a flush's reply sends the next one: a KeyboardInterrupt (Ctrl-C, a
    signal handler's SystemExit) landing there failed the callers of that next flush and was
    then swallowed, so the interrupted thread went on as if nothing happened. It is raised in
    that thread once the chain is handed on; the other callers get an error, none hangs."""
    tasks = producer(redis_url, prefix)
    group = tasks.broker._group
    gate = Gate(group)
    real_begin = group._begin
    main_ident = threading.get_ident()

    shot: list[int] = []

    def begin(items):
        if len(gate.sizes) == 1 and not shot:  # the next flush, sent by the main thread after its own
            shot.append(1)
            signal.pthread_kill(main_ident, signal.SIGINT)  # (handled in this thread, right here)
        return real_begin(items)

    group._begin = begin
    outcomes: dict[int, object] = {}

    def caller(i):
        try:
            outcomes[i] = tasks.add_task(rt.echo, f"c{i}")
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            outcomes[i] = exc

    def helper():
        assert gate.holding.wait(30)
        ts = run_threads(3, caller)
        wait_until(lambda: len(group._queue) == 3, 30, "3 callers queued")
        gate.release()
        for t in ts:
            t.join(30)

    h = threading.Thread(target=helper, daemon=True)
    h.start()
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            tasks.add_task(rt.echo, "main")
    finally:
        signal.signal(signal.SIGINT, old)
    h.join(30)
    assert len(outcomes) == 3 and all(isinstance(o, ConnectionError) for o in outcomes.values()), outcomes
    tasks.add_task(rt.echo, "later")
    stored = by_marker(tasks.broker)
    assert stored["main"] == stored["later"] == 1 and not any(f"c{i}" in stored for i in range(3))
