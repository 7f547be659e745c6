"""Tasks for the fault tests (test_redis_worker_faults.py, test_redis_chaos.py): registered on
the test's engines next to redis_tasks' (``register``)."""

from __future__ import annotations

import os
import time

import redis_tasks as rt

from catzilla_tasks import task

FUNCS = []


def _reg(f):
    FUNCS.append(f)
    return f


def register(engine) -> None:
    rt.register(engine)
    for f in FUNCS:
        engine._registered[f"{f.__module__}.{f.__qualname__}"] = f


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")


@_reg
@task(compile_to_c=False)
def raise_unprintable():
    raise Unprintable()


@_reg
@task(compile_to_c=False)
def blob(n):
    """Returns n bytes."""
    return b"x" * n


def _note(log_key: str, entry: str) -> None:
    """RPUSH, retried while Redis restarts (the log of runs is the test's, not a fault target)."""
    import redis

    deadline = time.monotonic() + 60
    while True:
        try:
            rt._sync_client().rpush(log_key, entry)
            return
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@_reg
@task(compile_to_c=False)
def count_run(log_key, value, seconds=0.0):
    """Records the run (value, pid, wall-clock start) in a Redis list, sleeps, returns value."""
    _note(log_key, f"{value}:{os.getpid()}:{time.time():.6f}")
    if seconds:
        time.sleep(seconds)
    return value


def __getattr__(name: str):
    """``redis_fault_tasks:tasks`` for worker processes: CT_TEST_REDIS_URL is Redis itself (the
    tasks' own log), CT_TEST_BROKER_URL what the worker uses (the fault proxy)."""
    if name == "tasks":
        from catzilla_tasks import BackgroundTasks
        from catzilla_tasks.brokers import RedisBroker

        env = os.environ
        broker = RedisBroker(env.get("CT_TEST_BROKER_URL", env["CT_TEST_REDIS_URL"]),
                             prefix=env.get("CT_TEST_PREFIX", "ctt"),
                             visibility_timeout=float(env.get("CT_TEST_VT", "60")),
                             result_ttl=float(env.get("CT_TEST_RESULT_TTL", "3600")),
                             idempotency_ttl=float(env.get("CT_TEST_RESULT_TTL", "3600")),
                             max_result_bytes=int(env.get("CT_TEST_MAX_RESULT", str(32 << 20))),
                             socket_timeout=float(env.get("CT_TEST_SOCKET_TIMEOUT", "30")))
        eng = BackgroundTasks(workers=4, broker=broker)
        register(eng)
        globals()["tasks"] = eng
        return eng
    raise AttributeError(name)
