"""tasks.map at its edges: huge chunk sizes, the first failure and Ctrl-C (what has not started
is cancelled, as concurrent.futures does), and a bounded number of items in flight."""

from __future__ import annotations

import array
import gc
import importlib.util
import os
import signal
import threading

import pytest

from catzilla_tasks import BackgroundTasks, mapping, task

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                 reason="the [compile] extra (numba) is part of the test extra")

pytestmark = pytest.mark.usefixtures("compile_cache_dir")


@task
def add(a: int, b: int) -> int:
    return a + b


# ---- chunk_size never overflows ----------------------------------------------------------

@needs_numba
@pytest.mark.timeout(120)
@pytest.mark.parametrize("chunk", [2**63 - 1, 2**63 - 1000, 2**63, 10**30])
@pytest.mark.parametrize("n", [0, 1, 10, 5000])
def test_huge_chunk_size_is_one_node_for_the_whole_batch(compile_engine, chunk, n):
    items = [(i, 1) for i in range(n)]
    assert compile_engine.map(add, items, chunk_size=chunk) == [i + 1 for i in range(n)]
    a, b = array.array("q", range(n)), array.array("q", [1]) * n
    assert list(compile_engine.map(add, a, b, chunk_size=chunk, out="array")) == [i + 1 for i in range(n)]


@needs_numba
@pytest.mark.timeout(120)
def test_engine_clamps_a_chunk_larger_than_the_batch(compile_engine):
    """The C side clamps too (a chunk of 2**63-1 made start + chunk overflow)."""
    from catzilla_tasks import compiler

    spec = compiler.native_of(add).spec_for((int, int))
    for n in (1, 7, 5000):
        items = [(i, 2) for i in range(n)]
        for chunk in (2**63 - 1, 2**63 - 1000, n + 1):
            results, failed, cancelled = compile_engine._map_native(
                spec.address, spec.codes, spec.rcode, items, chunk, 2
            )
            assert results == [i + 2 for i in range(n)] and not failed and not cancelled


@pytest.mark.parametrize("bad", [0, -1, -(2**63), True, 1.5, "8"])
def test_bad_chunk_size_is_refused_at_the_call(compile_engine, bad):
    with pytest.raises(ValueError, match="chunk_size"):
        compile_engine.map(add, [(1, 2)], chunk_size=bad)


# ---- Python tasks: the first failure or Ctrl-C cancels what has not started --------------

def _blocking_batch(make_tasks, first):
    """A map of 1000 items on 2 workers: item 0 does first(); every other item records that it
    ran, then waits for the gate (so at most 2 of them run before the test opens it)."""
    t = make_tasks(workers=2, min_workers=2, enable_auto_scaling=False)
    gate, lock, ran = threading.Event(), threading.Lock(), []

    def job(i):
        if i == 0:
            return first()
        with lock:
            ran.append(i)
        gate.wait(60)
        return i

    return t, gate, ran, job


@pytest.mark.timeout(120)
def test_first_failure_cancels_the_items_not_started(make_tasks):
    def fail():
        raise ValueError("item 0 fails")

    t, gate, ran, job = _blocking_batch(make_tasks, fail)
    with pytest.raises(ValueError, match="item 0 fails") as ei:
        t.map(job, range(1000))
    assert any("item 0 0 failed" in note for note in ei.value.__notes__)
    gate.set()
    t.join(60)
    assert len(ran) <= 2, f"{len(ran)} items ran after the first failure"
    assert t.stats()["cancelled"] == 1000 - 1 - len(ran)


@pytest.mark.timeout(120)
def test_first_failure_with_return_exceptions_runs_everything(make_tasks):
    def fail():
        raise ValueError("item 0 fails")

    t, gate, ran, job = _blocking_batch(make_tasks, fail)
    gate.set()
    res = t.map(job, range(1000), return_exceptions=True)
    assert isinstance(res[0], ValueError) and res[1:] == list(range(1, 1000)) and len(ran) == 999


@pytest.mark.timeout(120)
def test_ctrl_c_cancels_the_items_not_started(make_tasks):
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        t, gate, ran, job = _blocking_batch(make_tasks, lambda: os.kill(os.getpid(), signal.SIGINT))
        with pytest.raises(KeyboardInterrupt):
            t.map(job, range(1000))
    finally:
        signal.signal(signal.SIGINT, old)
    gate.set()
    t.join(60)
    assert len(ran) <= 2, f"{len(ran)} items ran after Ctrl-C"
    assert t.stats()["cancelled"] == 1000 - 1 - len(ran)


@pytest.mark.timeout(120)
def test_one_by_one_path_cancels_on_first_failure(make_tasks):
    """The one-by-one path (delayed tasks) cancels the same way."""
    t, gate, ran, job = _blocking_batch(make_tasks, lambda: 1 / 0)
    slow = task(delay_ms=1)(job)
    with pytest.raises(ZeroDivisionError):
        t.map(slow, range(300))
    gate.set()
    t.join(60)
    assert len(ran) <= 2 and t.stats()["cancelled"] == 300 - 1 - len(ran)


# ---- Python tasks: a bounded number of nodes in flight -----------------------------------

@pytest.mark.timeout(300)
def test_python_map_keeps_a_bounded_window_of_nodes(make_tasks):
    t = make_tasks(workers=2, queue_size=1_000_000)
    n = 300_000
    gc.collect()
    base = BackgroundTasks.memory_stats()["nodes_in_use"]
    peak = [0]

    def job(i):
        if i % 997 == 0:
            peak[0] = max(peak[0], BackgroundTasks.memory_stats()["nodes_in_use"])
        return i * 2

    res = t.map(job, range(n))
    assert res == [2 * i for i in range(n)]
    assert peak[0] - base <= mapping.MAP_WINDOW + 100, f"{peak[0] - base} nodes in flight at once"
    del res
    gc.collect()
    assert BackgroundTasks.memory_stats()["nodes_in_use"] - base <= 10


@pytest.mark.timeout(120)
def test_running_items_are_not_asked_to_cancel(make_tasks):
    """Only what has not started is cancelled: a running item does not see cancel_requested."""
    from catzilla_tasks import current_task

    seen = []

    def fail():
        raise ValueError("item 0 fails")

    t, gate, ran, job = _blocking_batch(make_tasks, fail)

    def watched(i):
        out = job(i)
        seen.append(current_task().cancel_requested)
        return out

    with pytest.raises(ValueError):
        t.map(watched, range(100))
    gate.set()
    t.join(60)
    assert seen and not any(seen)
