"""Tasks for the distributed-mode tests. Workers in subprocesses import ``redis_tasks:tasks``,
built from CT_TEST_REDIS_URL / CT_TEST_PREFIX / CT_TEST_VT (visibility timeout, seconds)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

from catzilla_tasks import BackgroundTasks, TaskPriority, task

FUNCS: list[Any] = []


def _reg(f):
    FUNCS.append(f)
    return f


def register(engine: BackgroundTasks) -> None:
    """Register every task here on ``engine`` by name (keeping each one's decorator config)."""
    for f in FUNCS:
        engine._registered[f"{f.__module__}.{f.__qualname__}"] = f


_clients: dict[Any, Any] = {}
_lock = threading.Lock()


def _sync_client():
    import redis

    url = os.environ["CT_TEST_REDIS_URL"]  # tests in one process may use several servers
    with _lock:
        c = _clients.get(url)
        if c is None:
            # no socket timeout: tasks here block in Redis (held: up to 30 s), and redis-py 8
            # reads with a 5 s timeout by default (a held task failed with TimeoutError at 5 s)
            c = _clients[url] = redis.Redis.from_url(url, socket_timeout=None)
    return c


def _async_client():
    import redis.asyncio as aredis

    url = os.environ["CT_TEST_REDIS_URL"]
    loop = asyncio.get_running_loop()
    c = _clients.get((loop, url))
    if c is None:
        pool = aredis.BlockingConnectionPool.from_url(os.environ["CT_TEST_REDIS_URL"], max_connections=32)
        c = _clients[(loop, url)] = aredis.Redis(connection_pool=pool)
    return c


@_reg
@task
def add(a, b):
    return a + b


@_reg
@task
async def async_add(a, b):
    await asyncio.sleep(0)
    return a + b


@_reg
@task
def echo(*args, **kwargs):
    return [list(args), kwargs]


@_reg
@task(max_retries=2, retry_backoff="fixed", retry_base_ms=5)
def always_fails(x):
    raise ValueError(f"bad value {x}")


_flaky_calls: dict[str, int] = {}


@_reg
@task(max_retries=3, retry_backoff="fixed", retry_base_ms=5)
def flaky(key, fail_times):
    n = _flaky_calls[key] = _flaky_calls.get(key, 0) + 1
    if n <= fail_times:
        raise ConnectionError(f"attempt {n} fails")
    return n


@_reg
@task(max_retries=0)
def fails_until_set(flag_key, value, message="the flag is not set"):
    """Fails (at once dead-lettered: no retries) until the test sets ``flag_key`` in Redis."""
    if not _sync_client().exists(flag_key):
        raise RuntimeError(message)
    return value


@_reg
@task
def progress_then_hold(gate_key, fraction, message):
    """Reports its progress, then waits (in Redis, up to 30 s) until the test opens the gate."""
    from catzilla_tasks import current_task

    current_task().set_progress(fraction, message)
    _sync_client().blpop([gate_key], timeout=30)
    return fraction


@_reg
@task
def record(log_key, value):
    """Side effect: appends value to a list in Redis (counts executions)."""
    _sync_client().rpush(log_key, value)
    return value


@_reg
@task
def held(started_key, gate_key, value):
    """Notes that it started, then waits (in Redis, up to 30 s) until the test opens the gate."""
    c = _sync_client()
    c.rpush(started_key, value)
    c.blpop([gate_key], timeout=30)
    return value


@_reg
@task
def stamp(log_key):
    """Appends the time it ran (the worker's clock) to a list in Redis."""
    _sync_client().rpush(log_key, repr(time.time()))
    return 1


@_reg
@task(delay_ms=400)
def stamp_later(log_key, _after=None):
    _sync_client().rpush(log_key, repr(time.time()))
    return 2


@_reg
@task
def record_slow(log_key, value, seconds):
    _sync_client().rpush(log_key, value)
    time.sleep(seconds)
    return value


@_reg
@task(max_retries=10, retry_backoff="fixed", retry_base_ms=100)
def record_slow_retrying(log_key, value, seconds):
    """record_slow, retried when Redis is away (the restart test)."""
    _sync_client().rpush(log_key, value)
    time.sleep(seconds)
    return value


@_reg
@task
async def run_once(log_key, value, seconds):
    """The kill -9 test's task: record the run, take a while (many in flight), then return."""
    await _async_client().rpush(log_key, value)
    await asyncio.sleep(seconds)
    return value


@_reg
@task(priority=TaskPriority.LOW)
def low(log_key, value, seconds):
    _sync_client().rpush(log_key, f"{os.getpid()}:{threading.get_ident()}:{value}")
    time.sleep(seconds)


@_reg
@task(priority=TaskPriority.CRITICAL)
def critical(log_key, value, seconds):
    _sync_client().rpush(log_key, f"{os.getpid()}:{threading.get_ident()}:{value}")
    time.sleep(seconds)


@_reg
@task(timeout_ms=50)
def too_slow():
    for _ in range(500):  # short sleeps: the timeout is raised between them
        time.sleep(0.01)


@_reg
@task
def square_noting_pid(log_key, x, seconds=0.0):
    """A workflow step: notes which worker process ran it, takes a while, returns x*x."""
    _sync_client().rpush(log_key, f"{os.getpid()}:{x}")
    time.sleep(seconds)
    return x * x


@_reg
@task
def total(values, plus=0):
    return sum(values) + plus


@_reg
@task
def pair(a, b=None):
    return [a, b]


@_reg
@task(max_retries=3, retry_backoff="fixed", retry_base_ms=10)
def until_cancelled(log_key, value):
    """Notes that it started, then runs until its cancel is requested (up to 30 s); notes that too."""
    from catzilla_tasks import current_task

    c = _sync_client()
    c.rpush(log_key, f"started:{value}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if current_task().cancel_requested:
            c.rpush(log_key, f"stopped:{value}")
            raise RuntimeError("stopped: cancel requested")  # (not retried: it was cancelled)
        time.sleep(0.01)
    return value


@_reg
@task
async def async_until_cancelled(log_key, value):
    c = _async_client()
    await c.rpush(log_key, f"started:{value}")
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        await c.rpush(log_key, f"cancelled:{value}")
        raise
    return value


def our_error(name: str) -> BaseException:
    """An instance of catzilla_tasks.errors.<name> with every attribute set to a non-default value."""
    from catzilla_tasks import errors

    kind = getattr(errors, name)
    if kind is errors.ShutdownTimeout:
        return kind("shutdown ran out of time", cancelled=3, running=2)
    if kind is errors.WorkerLost:
        return kind("the child died", pid=4242, exitcode=-9)
    if kind is errors.TaskExceptionNotPicklable:
        return kind("cannot pickle", type_name="mod.Weird", child_traceback="Traceback: weird")
    if kind is errors.ChildTraceback:
        return kind("Traceback (most recent call last): boom", pid=4243)
    if kind is errors.WorkflowError:
        return kind("step failed", workflow="etl", step="load", results={})
    if kind is errors.RemoteTaskError:
        return kind("mod.Odd: odd", type_name="mod.Odd", remote_traceback="Traceback: odd")
    return kind(f"a {name}")


@_reg
@task(max_retries=0)
def raises_ours(name):
    raise our_error(name)


def __getattr__(name: str) -> Any:
    if name == "tasks":
        from catzilla_tasks.brokers import RedisBroker

        broker = RedisBroker(os.environ["CT_TEST_REDIS_URL"], prefix=os.environ.get("CT_TEST_PREFIX", "ctt"),
                             visibility_timeout=float(os.environ.get("CT_TEST_VT", "60")))
        eng = BackgroundTasks(workers=4, broker=broker)
        register(eng)
        globals()["tasks"] = eng
        return eng
    raise AttributeError(name)
