"""Workflow benchmarks (standalone: ``python benchmarks/_workflows_bench.py [--quick]``).

1. A random DAG of 10,000 no-op steps, each depending on 0-3 random earlier steps (fixed
   seed): wall time per step from ``execute()`` to the workflow's value, against a plain no-op
   task in the same engine (10,000 ``add_task`` calls, then every result waited for). Goal: at
   most 3x. Also shown: the same DAG with every dependency's value passed as an argument, and
   the same DAG scheduled by a minimal hand-written release loop on the engine's done-callbacks
   (no cancellation, no failure handling, no result dict): the floor for this design.
2. A linear chain of 1,000 no-op steps: ``chain(...)`` against Celery-style chaining by hand
   on a ``ThreadPoolExecutor(4)``, each step submitted from the previous future's
   done-callback; and the same hand-made chaining on this engine's done-callbacks.

Each figure is the median of ``--runs`` runs (3), cases interleaved run by run so that a
noisy neighbour hits them alike, each run after a full ``gc.collect()``. Prints a table, then
one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from catzilla_tasks import BackgroundTasks  # noqa: E402
from catzilla_tasks.workflows import Step, TaskChain, chain  # noqa: E402

WAIT_S = 120.0


def noop(*args: Any) -> None:
    return None


def passthrough(x: Any = None) -> Any:
    return x


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def medians(runs: int, cases: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Median seconds of each case over ``runs`` rounds, the cases interleaved in each round.
    Each run starts after a full garbage collection, so no run pays for another's garbage (a
    full collection of this process, which holds the benchmark's DAGs, takes ~50 ms)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, fn in cases.items():
            gc.collect()
            times[name].append(fn())
    return {name: statistics.median(ts) for name, ts in times.items()}


# -- 1. random DAG ---------------------------------------------------------------------------


def dag_shape(n: int, seed: int) -> list[list[int]]:
    """The dependencies of each step: 0-3 distinct earlier steps, drawn with a fixed seed."""
    rng = random.Random(seed)
    return [rng.sample(range(i), min(i, rng.randint(0, 3))) for i in range(n)]


def build_dag(tasks: BackgroundTasks, shape: list[list[int]], with_results: bool = False) -> TaskChain:
    wf = TaskChain("dag", tasks=tasks)
    steps: list[Step] = []
    for deps in shape:
        if with_results:
            steps.append(wf.step(noop, *(steps[d] for d in deps)))
        else:
            steps.append(wf.step(noop, depends_on=[steps[d] for d in deps]))
    return wf.validate()


def time_workflow(wf: TaskChain) -> float:
    t0 = time.perf_counter()
    out = wf.execute().wait(WAIT_S)
    dt = time.perf_counter() - t0
    assert len(out) == len(wf)
    return dt


def time_plain(tasks: BackgroundTasks, n: int) -> float:
    add = tasks.add_task
    t0 = time.perf_counter()
    results = [add(noop) for _ in range(n)]
    for r in results:
        r.wait(WAIT_S)
    return time.perf_counter() - t0


def time_dag_by_hand(tasks: BackgroundTasks, shape: list[list[int]]) -> float:
    """The floor: the same DAG released by the least code that can do it on done-callbacks
    (a countdown per step, a done-callback per task; nothing for failures or cancel)."""
    n = len(shape)
    dependents: list[list[int]] = [[] for _ in range(n)]
    for j, deps in enumerate(shape):
        for d in deps:
            dependents[d].append(j)
    t0 = time.perf_counter()
    countdown: list[list[bool] | None] = [[True] + [False] * (len(deps) - 1) if len(deps) > 1 else None
                                          for deps in shape]
    sinks = [True] + [False] * (sum(1 for ds in dependents if not ds) - 1)
    finished = threading.Event()
    add = tasks.add_task
    index: dict[int, int] = {}

    def on_done(h: Any) -> None:
        j = index.pop(h._key)
        h.wait()
        after = dependents[j]
        if not after:
            if sinks.pop():
                finished.set()
            return
        for d in after:
            c = countdown[d]
            if c is None or c.pop():
                h2 = add(noop)
                index[h2._key] = d
                h2._on_done(on_done)

    for j, deps in enumerate(shape):
        if not deps:
            h = add(noop)
            index[h._key] = j
            h._on_done(on_done)
    finished.wait(WAIT_S)
    return time.perf_counter() - t0


# -- 2. linear chain -------------------------------------------------------------------------


def time_tpe_chain(pool: ThreadPoolExecutor, n: int) -> float:
    """Celery-style chaining by hand: the done-callback of step i submits step i+1."""
    done: Future = Future()

    def step_done(i: int, f: Future) -> None:
        try:
            value = f.result()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter
            done.set_exception(exc)
            return
        if i + 1 == n:
            done.set_result(value)
        else:
            pool.submit(passthrough, value).add_done_callback(lambda g: step_done(i + 1, g))

    # add_done_callback() on a future that is already done calls back at once, in this frame:
    # when the pool is quicker than the submitter the chain recurses, up to a frame or so per
    # step (the pitfall of chaining by hand), so give it the depth it needs.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * n + 1000))
    try:
        t0 = time.perf_counter()
        pool.submit(passthrough, 0).add_done_callback(lambda g: step_done(0, g))
        done.result(WAIT_S)
        return time.perf_counter() - t0
    finally:
        sys.setrecursionlimit(limit)


def time_engine_callbacks_chain(tasks: BackgroundTasks, n: int) -> float:
    """The same by hand on this engine's done-callbacks (no workflow bookkeeping)."""
    finished = threading.Event()
    add = tasks.add_task

    def step_done(i: int, h: Any) -> None:
        value = h.wait()
        if i + 1 == n:
            finished.set()
        else:
            add(passthrough, value)._on_done(lambda g: step_done(i + 1, g))

    t0 = time.perf_counter()
    add(passthrough, 0)._on_done(lambda g: step_done(0, g))
    finished.wait(WAIT_S)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10_000, help="steps of the random DAG")
    ap.add_argument("--chain", type=int, default=1_000, help="steps of the linear chain")
    ap.add_argument("--workers", type=int, default=None, help="engine workers (default: the engine's default)")
    ap.add_argument("--quick", action="store_true", help="1 run, 2,000-step DAG, 200-step chain")
    a = ap.parse_args()
    if a.quick:
        a.runs, a.steps, a.chain = 1, 2_000, 200

    kw: dict[str, Any] = {}
    if a.workers is not None:
        kw = {"workers": a.workers, "min_workers": min(2, a.workers), "max_workers": max(2, a.workers)}
    tasks = BackgroundTasks(queue_size=max(100_000, 2 * a.steps), enable_auto_scaling=False, **kw)
    try:
        shape = dag_shape(a.steps, seed=1)
        dag = build_dag(tasks, shape)
        dag_results = build_dag(tasks, shape, with_results=True)
        edges = sum(len(d) for d in shape)
        lin = chain(*([passthrough] * a.chain), tasks=tasks).validate()
        # warm-up: the slab, the workers, every code path
        time_plain(tasks, a.steps)
        time_workflow(dag)
        time_workflow(dag_results)
        time_dag_by_hand(tasks, shape)
        time_workflow(lin)
        time_engine_callbacks_chain(tasks, a.chain)
        m = medians(a.runs, {"build": lambda: timed(lambda: build_dag(tasks, shape))})
        m.update(medians(a.runs, {
            "plain": lambda: time_plain(tasks, a.steps),
            "dag": lambda: time_workflow(dag),
            "dag_results": lambda: time_workflow(dag_results),
            "dag_by_hand": lambda: time_dag_by_hand(tasks, shape),
            "chain": lambda: time_workflow(lin),
            "chain_by_hand": lambda: time_engine_callbacks_chain(tasks, a.chain),
        }))
        workers = tasks.stats()["workers"]
    finally:
        tasks.shutdown()
    with ThreadPoolExecutor(4) as pool:
        time_tpe_chain(pool, a.chain)
        m.update(medians(a.runs, {"tpe_chain": lambda: time_tpe_chain(pool, a.chain)}))

    us = 1e6
    per_step = {k: m[k] / a.steps * us for k in ("plain", "dag", "dag_results", "dag_by_hand", "build")}
    per_link = {k: m[k] / a.chain * us for k in ("chain", "chain_by_hand", "tpe_chain")}
    plain_us = per_step["plain"]
    rows = [
        (f"plain no-op task x{a.steps} (add_task, then wait each)", m["plain"], plain_us, 1.0),
        (f"random DAG: {a.steps} steps, {edges} edges (depends_on)", m["dag"], per_step["dag"],
         per_step["dag"] / plain_us),
        ("  same DAG, each dependency's value passed as an argument", m["dag_results"], per_step["dag_results"],
         per_step["dag_results"] / plain_us),
        ("  same DAG by hand on done-callbacks (floor, no bookkeeping)", m["dag_by_hand"], per_step["dag_by_hand"],
         per_step["dag_by_hand"] / plain_us),
        ("  building + validating the DAG (no execution)", m["build"], per_step["build"], None),
        (f"linear chain(): {a.chain} steps", m["chain"], per_link["chain"], None),
        ("  by hand on the engine's done-callbacks", m["chain_by_hand"], per_link["chain_by_hand"], None),
        ("  by hand on ThreadPoolExecutor(4) done-callbacks", m["tpe_chain"], per_link["tpe_chain"], None),
    ]
    print(f"catzilla_tasks workflows - Python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"{workers} engine workers, median of {a.runs}")
    print(f"{'case':<64} {'total ms':>9} {'us/step':>8} {'x plain':>8}")
    for name, total, per, ratio in rows:
        print(f"{name:<64} {total * 1e3:>9.1f} {per:>8.2f} {'' if ratio is None else f'{ratio:.2f}':>8}")
    ratio = per_step["dag"] / plain_us
    print(f"DAG step: {ratio:.2f}x a plain task (goal <= 3x: {'met' if ratio <= 3 else 'not met'}; the "
          f"hand-written floor is {per_step['dag_by_hand'] / plain_us:.2f}x). Linear chain: "
          f"{m['tpe_chain'] / m['chain']:.1f}x faster than ThreadPoolExecutor(4) chaining.")
    print(json.dumps({
        "bench": "workflows",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "workers": workers,
        "runs": a.runs,
        "dag_steps": a.steps,
        "dag_edges": edges,
        "plain_task_us": round(plain_us, 3),
        "dag_step_us": round(per_step["dag"], 3),
        "dag_step_ratio": round(ratio, 2),
        "dag_results_step_us": round(per_step["dag_results"], 3),
        "dag_results_ratio": round(per_step["dag_results"] / plain_us, 2),
        "dag_by_hand_step_us": round(per_step["dag_by_hand"], 3),
        "dag_by_hand_ratio": round(per_step["dag_by_hand"] / plain_us, 2),
        "dag_build_us_per_step": round(per_step["build"], 3),
        "chain_steps": a.chain,
        "chain_us_per_step": round(per_link["chain"], 2),
        "chain_by_hand_us_per_step": round(per_link["chain_by_hand"], 2),
        "tpe_chain_us_per_step": round(per_link["tpe_chain"], 2),
        "chain_speedup_vs_tpe": round(m["tpe_chain"] / m["chain"], 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
