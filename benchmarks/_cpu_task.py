"""The CPU-bound task of the cpu_isolation figure, in its own small module.

Process-isolated tasks travel to the child by pickle, i.e. by reference to a
module-level function: `spin` and `warm` are importable by name in the engine's
child processes (multiprocessing passes the parent's sys.path, which holds
benchmarks/). `calibrate` sizes `spin` to a target duration on this machine.
"""
import os
import time


def spin(iterations):
    """Pure-Python arithmetic that holds the GIL for the whole call.

    Returns (pid, checksum): the pid shows where the task ran (the parent for
    thread tasks, a child for process-isolated ones).
    """
    x = 0
    for i in range(iterations):
        x = (x + i * i) % 1_000_003
    return os.getpid(), x


def warm(seconds):
    """A tiny process task for warm-up: long enough that two of them overlap and
    the pool starts two children, not one child twice."""
    time.sleep(seconds)
    return os.getpid()


def calibrate(target_s, probe_iterations=500_000, trials=5):
    """Iterations of `spin` that take about `target_s` seconds here, alone.

    The median of a few trials of a short probe, scaled linearly. (Not the fastest
    trial: this machine's speed drifts, and the fastest moment would size the task
    too long.) Returns (iterations, seconds_per_iteration).
    """
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        spin(probe_iterations)
        times.append(time.perf_counter() - t0)
    per_iteration = sorted(times)[len(times) // 2] / probe_iterations
    return max(1, int(round(target_s / per_iteration))), per_iteration
