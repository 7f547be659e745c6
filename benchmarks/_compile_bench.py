"""Compiled tasks (catzilla_tasks.compiler) against Python tasks and ThreadPoolExecutor.

Two tasks, each run as a batch through ``map``, with 1 and then 2 workers (threads) in the
same process:

  add(a: int, b: int) -> int        a no-op-sized task
  loop(a: int, b: int) -> int       100 iterations of x = (x*x + b + i) % 1000003 (an integer
                                    loop LLVM cannot fold away)

Contenders:
  ours_native   ``tasks.map(f, items)`` with f compiled (``@task``, numba): native code on the
                engine's C workers, no GIL, several items per engine node (the node size is
                reported as items_per_node)
  ours_python   the same function with ``compile_to_c=False``: ``tasks.map`` queues one Python
                task per item (in one call)
  threadpool    ``ThreadPoolExecutor(w).map(f, *columns)`` on the plain Python function

Timed: from the call with the argument tuples already built until every result is in a list
(results checked against the Python function). Each measurement: one warm-up batch, then one
timed batch per worker count. Python tasks and the thread pool get a tenth of N (they are 10x
to 1000x slower). ours_native on the add figure also times N/10 single ``add_task`` calls of
the compiled function (each its own native task with a TaskResult) and their results.

Called by run.py (figures compile_add, compile_loop) through _contenders.py; also runs alone:
``python benchmarks/_compile_bench.py CONTENDER FIGURE N``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

perf = time.perf_counter


def add(a: int, b: int) -> int:
    return a + b


def loop(a: int, b: int) -> int:
    x = a
    for i in range(100):
        x = (x * x + b + i) % 1000003
    return x


FUNCS = {"compile_add": add, "compile_loop": loop}


def _items(n: int) -> list[tuple[int, int]]:
    return [(i, (i * 7919) % 1000) for i in range(n)]


def _engine(workers: int, queue_size: int):
    from catzilla_tasks import BackgroundTasks

    return BackgroundTasks(workers=workers, min_workers=1, max_workers=max(2, workers), enable_auto_scaling=False,
                           queue_size=max(10_000, queue_size))


def _check(func, items, results) -> None:
    step = max(1, len(items) // 1000)
    for i in range(0, len(items), step):
        if results[i] != func(*items[i]):
            raise AssertionError(f"item {i}: got {results[i]!r}, want {func(*items[i])!r}")
    if len(results) != len(items):
        raise AssertionError("result count")


def _ours(figure: str, n: int, native: bool) -> dict:
    from catzilla_tasks import compiler, task

    plain = FUNCS[figure]
    t0 = perf()
    f = task(compile_to_c="require" if native else False)(plain)  # returns plain itself, configured
    decorate_s = perf() - t0  # native: compiled now (annotated), or loaded from the disk cache
    n = n if native else max(1000, n // 10)
    items = _items(n)
    out: dict = {"n": n}
    if native:
        spec = compiler.native_of(f).spec_for((int, int))
        out["compile_or_load_s"] = decorate_s
        out["from_disk_cache"] = int(spec.cache_hit)
        out.update(_raw_threads(spec.address, items))
    for w in (1, 2):
        with _engine(w, n // 10) as tasks:
            tasks.map(f, items[: max(1000, n // 20)])  # warm-up
            t0 = perf()
            res = tasks.map(f, items)
            dt = perf() - t0
            _check(plain, items, res)
            out[f"tasks_per_s_w{w}"] = n / dt
            if native:
                out["items_per_node"] = compiler._auto_chunk(n, w)
            if native and w == 2 and figure == "compile_add":
                k = max(1000, n // 10)
                t0 = perf()
                hs = [tasks.add_task(f, a, b) for a, b in items[:k]]
                vals = [h.wait(60) for h in hs]
                dt = perf() - t0
                _check(plain, items[:k], vals)
                if not hs[0].get_stats()["native"]:
                    raise AssertionError("add_task did not run natively")
                out["add_task_per_s_w2"] = k / dt
    out["tasks_per_s"] = out["tasks_per_s_w2"]
    out["scaling_w2_over_w1"] = out["tasks_per_s_w2"] / out["tasks_per_s_w1"]
    return out


def _raw_threads(address: int, items: list) -> dict:
    """The machine's own ceiling for this run: the same compiled code over the same items from
    1 and then 2 plain threads (ctypes calls release the GIL), no engine involved."""
    import ctypes
    import threading

    import numpy as np

    n = len(items)
    a = np.array([x for x, _ in items], dtype=np.int64)
    b = np.array([y for _, y in items], dtype=np.int64)
    o = np.empty(n, np.int64)
    st = np.empty(n, np.uint8)
    fn = ctypes.CFUNCTYPE(ctypes.c_int64, *([ctypes.c_void_p] * 10), ctypes.c_int64, ctypes.c_int64)(address)

    def run(lo: int, hi: int) -> None:
        fn(a.ctypes.data, b.ctypes.data, 0, 0, 0, 0, 0, 0, o.ctypes.data, st.ctypes.data, lo, hi)

    run(0, min(n, 10_000))
    t0 = perf()
    run(0, n)
    one = perf() - t0
    threads = [threading.Thread(target=run, args=(0, n // 2)), threading.Thread(target=run, args=(n // 2, n))]
    t0 = perf()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    two = perf() - t0
    return {"raw_per_s_t1": n / one, "raw_per_s_t2": n / two, "raw_scaling_t2_over_t1": one / two}


def _threadpool(figure: str, n: int) -> dict:
    f = FUNCS[figure]
    n = max(1000, n // 10)
    items = _items(n)
    cols = list(zip(*items))
    out: dict = {"n": n}
    for w in (1, 2):
        with ThreadPoolExecutor(max_workers=w) as pool:
            list(pool.map(f, *(c[: max(1000, n // 20)] for c in cols)))  # warm-up
            t0 = perf()
            res = list(pool.map(f, *cols))
            dt = perf() - t0
        _check(f, items, res)
        out[f"tasks_per_s_w{w}"] = n / dt
    out["tasks_per_s"] = out["tasks_per_s_w2"]
    out["scaling_w2_over_w1"] = out["tasks_per_s_w2"] / out["tasks_per_s_w1"]
    return out


# _contenders.py sets this to its own Unavailable (a contender that cannot run here)
Unavailable: type[Exception] = RuntimeError


def _native_or_unavailable(figure: str, n: int) -> dict:
    from catzilla_tasks.compiler import _numba_missing

    missing = _numba_missing()
    if missing:
        raise Unavailable(missing)
    return _ours(figure, n, True)


MEASUREMENTS = {
    (contender, figure): fn
    for figure in FUNCS
    for contender, fn in (
        ("ours_native", lambda n, _p, figure=figure: _native_or_unavailable(figure, n)),
        ("ours_python", lambda n, _p, figure=figure: _ours(figure, n, False)),
        ("threadpool", lambda n, _p, figure=figure: _threadpool(figure, n)),
    )
}


if __name__ == "__main__":
    if len(sys.argv) != 4 or (sys.argv[1], sys.argv[2]) not in MEASUREMENTS:
        sys.stderr.write(__doc__)
        sys.exit(2)
    print(json.dumps(MEASUREMENTS[(sys.argv[1], sys.argv[2])](int(sys.argv[3]), 0)))
