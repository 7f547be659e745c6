"""Adversarial tests of the producer's group commit (issue 18): the async publishing
connection of a loop after the server dropped it, connections and loops left behind by event
loops that ended, and interruptions of threads waiting in a flush chain."""

from __future__ import annotations

import asyncio

import pytest
import redis_tasks as rt
from redis_helpers import RedisServer, prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)
from test_producer_group_commit import by_marker, published

from catzilla_tasks import BackgroundTasks
from catzilla_tasks.brokers import RedisBroker

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
