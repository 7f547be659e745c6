"""Workflow benchmarks (standalone: ``python benchmarks/_workflows_bench.py [--quick]``).

1. A random DAG of 10,000 no-op steps (each depends on 0-3 random earlier steps, fixed seed):
   wall time per step of ``execute()`` to the workflow's value, against a plain no-op task in
   the same engine (10,000 ``add_task`` calls, then every result waited for). Goal: at most 3x.
2. A linear chain of 1,000 no-op steps: ``chain(...)`` against Celery-style chaining by hand
   on a ``ThreadPoolExecutor(4)``, each step submitted from the previous future's
   done-callback; and the same hand-made chaining on this engine's own done-callbacks (the
   floor for this engine: a task's round trip through the queue).

Each figure is the median of ``--runs`` runs (3). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
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
from catzilla_tasks.workflows import TaskChain, chain  # noqa: E402


def noop(*args: Any) -> None:
    return None


def passthrough(x: Any = None) -> Any:
    return x


def median_of(runs: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(runs))


# -- 1. random DAG ---------------------------------------------------------------------------


def random_dag(tasks: BackgroundTasks, n: int, seed: int, with_results: bool = False) -> TaskChain:
    rng = random.Random(seed)
    wf = TaskChain("dag", tasks=tasks)
    steps = []
    for i in range(n):
        deps = rng.sample(steps, min(i, rng.randint(0, 3)))
        if with_results:
            steps.append(wf.step(noop, *deps))
        else:
            steps.append(wf.step(noop, depends_on=deps))
    return wf.validate()


def time_workflow(wf: TaskChain) -> float:
    t0 = time.perf_counter()
    out = wf.execute().wait(120)
    dt = time.perf_counter() - t0
    assert len(out) == len(wf)
    return dt


def time_plain(tasks: BackgroundTasks, n: int) -> float:
    add = tasks.add_task
    t0 = time.perf_counter()
    results = [add(noop) for _ in range(n)]
    for r in results:
        r.wait(120)
    return time.perf_counter() - t0


# -- 2. linear chain -------------------------------------------------------------------------


def time_tpe_chain(pool: ThreadPoolExecutor, n: int) -> float:
    """Celery-style chaining by hand: the done-callback of step i submits step i+1."""
    done: Future = Future()

    def step_done(i: int, f: Future) -> None:
        try:
            value = f.result()
        except BaseException as exc:
            done.set_exception(exc)
            return
        if i + 1 == n:
            done.set_result(value)
        else:
            pool.submit(passthrough, value).add_done_callback(lambda g: step_done(i + 1, g))

    t0 = time.perf_counter()
    pool.submit(passthrough, 0).add_done_callback(lambda g: step_done(0, g))
    done.result(120)
    return time.perf_counter() - t0


def time_engine_callbacks_chain(tasks: BackgroundTasks, n: int) -> float:
    """The same by hand on this engine's done-callbacks (no workflow bookkeeping)."""
    finished = threading.Event()
    submit = tasks._submit

    def step_done(i: int, h: Any) -> None:
        value = h.wait(0)
        if i + 1 == n:
            finished.set()
        else:
            submit(passthrough, (value,), None, None, None)._on_done(lambda g: step_done(i + 1, g))

    t0 = time.perf_counter()
    submit(passthrough, (0,), None, None, None)._on_done(lambda g: step_done(0, g))
    finished.wait(120)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10_000, help="steps of the random DAG")
    ap.add_argument("--chain", type=int, default=1_000, help="steps of the linear chain")
    ap.add_argument("--workers", type=int, default=None, help="engine workers (default: the engine's)")
    ap.add_argument("--quick", action="store_true", help="1 run, 2,000-step DAG, 200-step chain")
    a = ap.parse_args()
    if a.quick:
        a.runs, a.steps, a.chain = 1, 2_000, 200

    tasks = BackgroundTasks(workers=a.workers, queue_size=max(100_000, 2 * a.steps), enable_auto_scaling=False,
                            memory_pool_mb=1000)
    try:
        # warm-up: slab, workers, code paths
        time_plain(tasks, a.steps)
        dag = random_dag(tasks, a.steps, seed=1)
        dag_results = random_dag(tasks, a.steps, seed=1, with_results=True)
        time_workflow(dag)

        t0 = time.perf_counter()
        random_dag(tasks, a.steps, seed=2)
        build_s = time.perf_counter() - t0

        plain_s = median_of(a.runs, lambda: time_plain(tasks, a.steps))
        dag_s = median_of(a.runs, lambda: time_workflow(dag))
        dag_res_s = median_of(a.runs, lambda: time_workflow(dag_results))
        edges = sum(len(d) for d in dag._compile().dependents)

        lin = chain(*([passthrough] * a.chain), tasks=tasks).validate()
        time_workflow(lin)
        chain_s = median_of(a.runs, lambda: time_workflow(lin))
        cb_s = median_of(a.runs, lambda: time_engine_callbacks_chain(tasks, a.chain))
        workers = tasks.stats()["workers"]
    finally:
        tasks.shutdown()
    with ThreadPoolExecutor(4) as pool:
        time_tpe_chain(pool, a.chain)
        tpe_s = median_of(a.runs, lambda: time_tpe_chain(pool, a.chain))

    us = 1e6
    plain_us = plain_s / a.steps * us
    dag_us = dag_s / a.steps * us
    dag_res_us = dag_res_s / a.steps * us
    rows = [
        (f"plain no-op task x{a.steps} (add_task + wait)", plain_s, plain_us, 1.0),
        (f"random DAG, {a.steps} steps, {edges} edges (depends_on)", dag_s, dag_us, dag_us / plain_us),
        (f"same DAG, results passed as arguments", dag_res_s, dag_res_us, dag_res_us / plain_us),
        (f"linear chain(), {a.chain} steps", chain_s, chain_s / a.chain * us, None),
        (f"by hand: engine done-callbacks, {a.chain} steps", cb_s, cb_s / a.chain * us, None),
        (f"by hand: ThreadPoolExecutor(4) done-callbacks, {a.chain} steps", tpe_s, tpe_s / a.chain * us, None),
    ]
    print(f"catzilla_tasks workflows — Python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"{workers} engine workers, median of {a.runs}")
    print(f"{'case':<62} {'total ms':>10} {'us/step':>9} {'x plain':>8}")
    for name, total, per, ratio in rows:
        print(f"{name:<62} {total * 1e3:>10.1f} {per:>9.2f} {'' if ratio is None else f'{ratio:.2f}':>8}")
    print(f"building + validating the {a.steps}-step DAG: {build_s * 1e3:.1f} ms ({build_s / a.steps * us:.2f} us/step)")
    ratio = dag_us / plain_us
    print(f"DAG step overhead: {ratio:.2f}x a plain task (goal <= 3x: {'met' if ratio <= 3 else 'NOT met'}); "
          f"linear chain: {tpe_s / chain_s:.1f}x faster than ThreadPoolExecutor(4) chaining")
    print(json.dumps({
        "bench": "workflows",
        "runs": a.runs,
        "workers": workers,
        "dag_steps": a.steps,
        "dag_edges": edges,
        "plain_task_us": round(plain_us, 3),
        "dag_step_us": round(dag_us, 3),
        "dag_step_ratio": round(ratio, 2),
        "dag_results_step_us": round(dag_res_us, 3),
        "dag_results_ratio": round(dag_res_us / plain_us, 2),
        "dag_build_us_per_step": round(build_s / a.steps * us, 3),
        "chain_steps": a.chain,
        "chain_us_per_step": round(chain_s / a.chain * us, 2),
        "engine_callbacks_chain_us_per_step": round(cb_s / a.chain * us, 2),
        "tpe_chain_us_per_step": round(tpe_s / a.chain * us, 2),
        "chain_speedup_vs_tpe": round(tpe_s / chain_s, 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
