"""Compiled tasks (catzilla_tasks.compiler) against Python tasks and ThreadPoolExecutor.

Two tasks, each run as a batch through ``map``, with 1 and then 2 workers (threads) in the
same process:

  add(a: int, b: int) -> int        a no-op-sized task
  loop(a: int, b: int) -> int       100 iterations of x = (x*x + b + i) % 1000003 (an integer
                                    loop LLVM cannot fold away)

Contenders:
  ours_native   f compiled (``@task``, numba): native code on the engine's C workers, no GIL,
                several items per engine node (the node size is reported as items_per_node).
                Two input paths, both timed in every run:
                  buffers  ``tasks.map(f, a, b, out="array")`` with a, b ``array.array('q')``
                           columns: the workers read the columns and write the results in
                           place, no Python object per item (what a user chasing speed does);
                           the main figures (tasks_per_s_w1/_w2, scaling_w2_over_w1)
                  lists    ``tasks.map(f, items)`` with items a list of (a, b) tuples and the
                           results a list: the caller converts each tuple and boxes each result
                           (list_tasks_per_s_w1/_w2, list_scaling_w2_over_w1)
                A 1-worker and a 2-worker engine live side by side (idle workers sleep) and the
                four batches (buffers w1, w2, lists w1, w2) are timed in turn, REPS times; each
                figure is the median of its REPS, so the w2/w1 ratios come from batches run
                seconds apart. raw_*: the same compiled code on 1 vs 2 plain threads, no engine.
  ours_python   the same function with ``compile_to_c=False``: ``tasks.map`` queues one Python
                task per item (in one call)
  threadpool    ``ThreadPoolExecutor(w).map(f, *columns)`` on the plain Python function

Timed: from the call with the inputs already built (argument tuples or columns) until every
result is in a list or array (results checked against the Python function). Python tasks and
the thread pool get a tenth of N (they are 10x to 1000x slower), one warm-up batch, then one
timed batch per worker count. ours_native on the add figure also times N/10 single
``add_task`` calls of the compiled function (each its own native task with a TaskResult).

Called by run.py (figures compile_add, compile_loop) through _contenders.py; also runs alone:
``python benchmarks/_compile_bench.py CONTENDER FIGURE N`` (one JSON line), or
``python benchmarks/_compile_bench.py --runs 5`` (ours_native on both figures, each run in a
fresh process; prints every run and the medians; --help for the options).
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


REPS = 5  # timed rounds per ours_native run (median of each)


def _ours(figure: str, n: int, native: bool) -> dict:
    from catzilla_tasks import compiler, task

    plain = FUNCS[figure]
    t0 = perf()
    f = task(compile_to_c="require" if native else False)(plain)  # returns plain itself, configured
    decorate_s = perf() - t0  # native: compiled now (annotated), or loaded from the disk cache
    if native:
        return _ours_native(figure, n, f, plain, decorate_s)
    n = max(1000, n // 10)
    items = _items(n)
    out: dict = {"n": n}
    for w in (1, 2):
        with _engine(w, n // 10) as tasks:
            tasks.map(f, items[: max(1000, n // 20)])  # warm-up
            t0 = perf()
            res = tasks.map(f, items)
            dt = perf() - t0
            _check(plain, items, res)
            out[f"tasks_per_s_w{w}"] = n / dt
    out["tasks_per_s"] = out["tasks_per_s_w2"]
    out["scaling_w2_over_w1"] = out["tasks_per_s_w2"] / out["tasks_per_s_w1"]
    return out


def _ours_native(figure: str, n: int, f, plain, decorate_s: float) -> dict:
    import array
    import statistics

    from catzilla_tasks import compiler, mapping

    items = _items(n)
    col_a = array.array("q", [a for a, _ in items])
    col_b = array.array("q", [b for _, b in items])
    spec = compiler.native_of(f).spec_for((int, int))
    out: dict = {"n": n, "compile_or_load_s": decorate_s, "from_disk_cache": int(spec.cache_hit), "reps": REPS}
    out.update(_raw_threads(spec.address, items))
    engines = {w: _engine(w, n // 10) for w in (1, 2)}
    try:
        warm = max(1000, n // 20)
        for tasks in engines.values():
            tasks.map(f, items[:warm])
            tasks.map(f, col_a[:warm], col_b[:warm], out="array")
        times: dict = {(path, w): [] for path in ("buf", "list") for w in (1, 2)}
        for _ in range(REPS):
            for path in ("buf", "list"):
                for w, tasks in engines.items():
                    t0 = perf()
                    res = tasks.map(f, col_a, col_b, out="array") if path == "buf" else tasks.map(f, items)
                    times[(path, w)].append(perf() - t0)
                    _check(plain, items, res)
                    del res
        for (path, w), ts in times.items():
            pre = "" if path == "buf" else "list_"
            out[f"{pre}tasks_per_s_w{w}"] = n / statistics.median(ts)
            out[f"{pre}per_rep_w{w}"] = [round(n / t) for t in ts]
        for w in (1, 2):
            out["items_per_node_w%d" % w] = mapping._auto_chunk(n, w)
        out["items_per_node"] = mapping._auto_chunk(n, 2)
        if figure == "compile_add":
            tasks = engines[2]
            k = max(1000, n // 10)
            t0 = perf()
            hs = [tasks.add_task(f, a, b) for a, b in items[:k]]
            vals = [h.wait(60) for h in hs]
            dt = perf() - t0
            _check(plain, items[:k], vals)
            if not hs[0].get_stats()["native"]:
                raise AssertionError("add_task did not run natively")
            out["add_task_per_s_w2"] = k / dt
    finally:
        for tasks in engines.values():
            tasks.shutdown()
    out["tasks_per_s"] = out["tasks_per_s_w2"]
    out["scaling_w2_over_w1"] = out["tasks_per_s_w2"] / out["tasks_per_s_w1"]
    out["list_scaling_w2_over_w1"] = out["list_tasks_per_s_w2"] / out["list_tasks_per_s_w1"]
    out["buf_over_list_w2"] = out["tasks_per_s_w2"] / out["list_tasks_per_s_w2"]
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


def _summary(argv: list[str]) -> None:
    import argparse
    import statistics
    import subprocess

    ap = argparse.ArgumentParser(description="ours_native on the compile figures, each run in a fresh process: "
                                 "buffers vs lists through tasks.map, 1 vs 2 workers, medians of --runs "
                                 "(run alone; one JSON line per measurement with CONTENDER FIGURE N)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--figures", default="compile_add,compile_loop")
    ap.add_argument("--n-add", type=int, default=1_000_000)
    ap.add_argument("--n-loop", type=int, default=200_000)
    ap.add_argument("--json", help="also write every run's figures to this file")
    args = ap.parse_args(argv)
    sizes = {"compile_add": args.n_add, "compile_loop": args.n_loop}
    figures = [f for f in args.figures.split(",") if f]
    runs: dict = {f: [] for f in figures}
    for r in range(args.runs):
        for fig in figures:
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "ours_native", fig, str(sizes[fig])],
                               capture_output=True, text=True, check=True)
            m = json.loads(p.stdout.strip().splitlines()[-1])
            runs[fig].append(m)
            print(f"run {r + 1} {fig}: buffers {m['tasks_per_s_w1']:,.0f} / {m['tasks_per_s_w2']:,.0f} /s "
                  f"({m['scaling_w2_over_w1']:.2f}x), lists {m['list_tasks_per_s_w1']:,.0f} / "
                  f"{m['list_tasks_per_s_w2']:,.0f} /s ({m['list_scaling_w2_over_w1']:.2f}x), plain threads "
                  f"{m['raw_scaling_t2_over_t1']:.2f}x", flush=True)
    med = lambda fig, k: statistics.median(m[k] for m in runs[fig])  # noqa: E731
    print(f"\nmedians of {args.runs} runs (each run: median of {REPS} rounds per path and worker count)")
    print(f"{'figure':<13} {'path':<8} {'N':>9} {'tasks/s w=1':>14} {'tasks/s w=2':>14} {'w2/w1':>7} {'per run w2/w1'}")
    for fig in figures:
        for path, pre in (("buffers", ""), ("lists", "list_")):
            per = ", ".join(f"{m[pre + 'scaling_w2_over_w1']:.2f}" for m in runs[fig])
            print(f"{fig:<13} {path:<8} {sizes[fig]:>9,} {med(fig, pre + 'tasks_per_s_w1'):>14,.0f} "
                  f"{med(fig, pre + 'tasks_per_s_w2'):>14,.0f} {med(fig, pre + 'scaling_w2_over_w1'):>6.2f}x  {per}")
        per = ", ".join(f"{m['raw_scaling_t2_over_t1']:.2f}" for m in runs[fig])
        print(f"{fig:<13} {'threads':<8} {sizes[fig]:>9,} {med(fig, 'raw_per_s_t1'):>14,.0f} "
              f"{med(fig, 'raw_per_s_t2'):>14,.0f} {med(fig, 'raw_scaling_t2_over_t1'):>6.2f}x  {per}  (plain threads, no engine)")
    if "compile_add" in runs:
        print(f"compiled add through single add_task calls (w=2): {med('compile_add', 'add_task_per_s_w2'):,.0f}/s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(runs, fh, indent=1)


if __name__ == "__main__":
    if len(sys.argv) == 4 and (sys.argv[1], sys.argv[2]) in MEASUREMENTS:
        print(json.dumps(MEASUREMENTS[(sys.argv[1], sys.argv[2])](int(sys.argv[3]), 0)))
    elif len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        sys.stderr.write(__doc__)
        sys.exit(2)
    else:
        _summary(sys.argv[1:])
