"""The cluster registry's cost on a worker, measured in isolation (the end-to-end Redis benchmark
on a shared machine moves by more than the 2 % it is held to).

    python benchmarks/_registry_cost.py [--cpu-us 10]

1. ``TaskFigures.record``: the committer's only new per-task work, over batches of 1,000
   finished no-op tasks (real engine handles), in ns per task: with every task timed (what a
   worker below 1,000 tasks per beat does) and above the timing budget (a stride: counts only
   for most tasks; what a worker at benchmark rates does).
2. One heartbeat (``Heartbeat.fields`` + its Redis pipeline to a local redis-server), in CPU
   ms, with 20 task names.
Then both as a share of a worker's CPU at a given CPU cost per task (``--cpu-us``, the Redis
benchmark's "CPU us/task" of ``ours_off``).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))


def noop() -> None:
    pass


class _Job:
    __slots__ = ("msg", "kinds", "handle", "error", "eid")

    def __init__(self, name: str, handle: object) -> None:
        self.msg = ["id", name, None, None]
        self.kinds = ("succeeded",)
        self.handle = handle
        self.error = None
        self.eid = b"%d-0" % int(time.time() * 1000)


def per_task_ns(timed_per_beat: int, jobs: list, rounds: int = 200) -> float:
    from catzilla_tasks.brokers.registry import TaskFigures

    f = TaskFigures(timed_per_beat=timed_per_beat)
    for _ in range(rounds):  # one beat's worth of tasks: the next beat's stride follows from it
        f.record(jobs, len(jobs))  # (all succeeded: the worker passes its commit's count)
    f.snapshot(1.0)
    t = time.thread_time_ns()
    for _ in range(rounds):
        f.record(jobs, len(jobs))  # (all succeeded: the worker passes its commit's count)
    return (time.thread_time_ns() - t) / (rounds * len(jobs))


def main() -> None:
    from catzilla_tasks import BackgroundTasks
    from catzilla_tasks.brokers.registry import TIMED_PER_BEAT

    with BackgroundTasks(workers=2) as eng:
        handles = [eng.add_task(noop) for _ in range(1000)]
        for h in handles:
            h.wait(5)
        jobs = [_Job(f"bench.task{i % 20}", h) for i, h in enumerate(handles)]
        all_timed = statistics.median(per_task_ns(10**9, jobs, 20) for _ in range(5))
        strided = statistics.median(per_task_ns(TIMED_PER_BEAT, jobs) for _ in range(5))
        beat_ms = heartbeat_ms(eng, jobs)
    print(f"record(), every task timed:     {all_timed:8.0f} ns/task")
    print(f"record(), above the budget:     {strided:8.0f} ns/task")
    print(f"one heartbeat (20 task names):  {beat_ms:8.2f} ms")
    cpu_us = float(sys.argv[sys.argv.index("--cpu-us") + 1]) if "--cpu-us" in sys.argv else 10.0
    rate = 1e6 / cpu_us  # a worker busy all the time
    share = (strided * rate / 1e9 + beat_ms / 1000 / 2.0) / 1.0
    print(f"a worker at {cpu_us:g} CPU us/task ({rate:,.0f} tasks per CPU second), beat every 2 s: "
          f"{share * 100:.2f} % more CPU")


def heartbeat_ms(eng: object, jobs: list) -> float:
    import redis

    from catzilla_tasks.brokers.registry import Heartbeat, TaskFigures

    exe = shutil.which("redis-server")
    if exe is None:
        return float("nan")
    d = tempfile.mkdtemp()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", d, "--save", ""],
                           stdout=subprocess.DEVNULL)
    try:
        r = redis.Redis(port=port)
        for _ in range(200):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.02)

        class W:  # what Heartbeat reads of a worker
            consumer = "bench-worker"
            concurrency = 1000
            figures = TaskFigures()
            tasks = eng

            class broker:  # noqa: N801
                prefix, queue, redis = "bench", "default", r

            @staticmethod
            def stats() -> dict:
                return {"in_flight": 0, "reclaimed": 0}

        W.figures.record(jobs)
        hb = Heartbeat(W(), 2.0)
        times = []
        for _ in range(50):
            t = time.thread_time()
            hb.beat()
            times.append((time.thread_time() - t) * 1000)
        return statistics.median(times)
    finally:
        srv.terminate()
        srv.wait()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
