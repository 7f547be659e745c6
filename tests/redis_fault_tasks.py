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


@_reg
@task(compile_to_c=False)
def count_run(log_key, value, seconds=0.0):
    """Records the run (pid:value) in a Redis list, sleeps, returns value."""
    rt._sync_client().rpush(log_key, f"{os.getpid()}:{value}")
    if seconds:
        time.sleep(seconds)
    return value
