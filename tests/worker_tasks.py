"""Tasks for the worker contract tests (tests/test_broker_contract.py): the worker runs in the
test's process on every broker, so these keep their state in memory (counters, gates)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from catzilla_tasks import BackgroundTasks, task

FUNCS: list[Any] = []
runs: Counter[str] = Counter()  # key -> how many times a task ran with it
gates: dict[str, threading.Event] = {}
started: dict[str, threading.Event] = {}
_lock = threading.Lock()


def _reg(f):
    FUNCS.append(f)
    return f


def register(engine: BackgroundTasks) -> None:
    """Register every task here on ``engine`` by name (keeping each one's decorator config)."""
    for f in FUNCS:
        engine._registered[f"{f.__module__}.{f.__qualname__}"] = f


def event(table: dict[str, threading.Event], key: str) -> threading.Event:
    with _lock:
        return table.setdefault(key, threading.Event())


def _count(key: str) -> int:
    with _lock:
        runs[key] += 1
        return runs[key]


@_reg
@task(max_retries=3, retry_base_ms=20, retry_backoff="fixed")
def flaky(key: str, fail_times: int) -> int:
    n = _count(key)
    if n <= fail_times:
        raise ConnectionError(f"attempt {n} fails")
    return n


@_reg
@task
def gated(key: str, value: Any) -> Any:
    """Counts its run, says it started, waits for its gate (30 s at most)."""
    _count(key)
    event(started, key).set()
    event(gates, key).wait(30)
    return value


@_reg
@task
def slow(key: str, seconds: float) -> int:
    n = _count(key)
    event(started, key).set()
    time.sleep(seconds)  # the task's own work: outlives the visibility timeout
    return n


# -- limits and progress (the broker's, shared by its workers) --------------------------------
running: Counter[str] = Counter()  # key -> how many run now
most: Counter[str] = Counter()  # key -> the most that ran at once
starts: dict[str, list[float]] = {}


@_reg
@task(concurrency_limit=1)
def one_at_a_time(key: str, value: Any) -> Any:
    """At most one runs at once across the broker's workers; waits for its gate (30 s at most)."""
    with _lock:
        running[key] += 1
        most[key] = max(most[key], running[key])
    try:
        _count(key)
        event(started, f"{key}:{value}").set()
        event(gates, f"{key}:{value}").wait(30)
        return value
    finally:
        with _lock:
            running[key] -= 1


@_reg
@task(rate_limit="5/s")
def five_a_second(key: str, i: int) -> int:
    with _lock:
        starts.setdefault(key, []).append(time.monotonic())
    return i


@_reg
@task
def reports_progress(key: str) -> str:
    from catzilla_tasks import current_task

    current_task().set_progress(0.5, "half")
    event(started, key).set()
    event(gates, key).wait(30)
    current_task().set_progress(1.0, "done")
    return "reported"


@_reg
@task(rate_limit="5/s", max_retries=1, retry_base_ms=10, retry_backoff="fixed")
def five_a_second_failing_once(key: str, i: int) -> int:
    with _lock:
        starts.setdefault(key, []).append(time.monotonic())
    if _count(f"{key}:{i}") == 1:
        raise ConnectionError("the first attempt fails")
    return i
