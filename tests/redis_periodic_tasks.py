"""A module that declares a cluster-wide periodic task, for the schedule tests: every process
importing it (declarer subprocesses, workers) declares the schedule. Built from
CT_TEST_REDIS_URL / CT_TEST_PREFIX, CT_TEST_EVERY (seconds), CT_TEST_OVERLAP (0/1) and
CT_TEST_SLEEP (seconds each run takes)."""

from __future__ import annotations

import os
import threading
import time

from catzilla_tasks import BackgroundTasks
from catzilla_tasks.brokers import RedisBroker

URL = os.environ["CT_TEST_REDIS_URL"]
PREFIX = os.environ.get("CT_TEST_PREFIX", "ctt")
tasks = BackgroundTasks(workers=2, broker=RedisBroker(URL, prefix=PREFIX))
_client = threading.local()


def _r():
    c = getattr(_client, "c", None)
    if c is None:
        import redis

        c = _client.c = redis.Redis.from_url(os.environ["CT_TEST_REDIS_URL"], socket_timeout=None)
    return c


@tasks.periodic(every=float(os.environ.get("CT_TEST_EVERY", "0.2")), overlap=os.environ.get("CT_TEST_OVERLAP") == "1")
def beat():
    """Notes when it started and ended (the worker's clock), in Redis."""
    r = _r()
    start = time.time()
    time.sleep(float(os.environ.get("CT_TEST_SLEEP", "0")))
    r.rpush(f"{os.environ.get('CT_TEST_PREFIX', 'ctt')}:beats", f"{start}:{time.time()}:{os.getpid()}")
