"""Instructions per in-process task, for valgrind callgrind (benchmarks/RESULTS.md).

    valgrind --tool=callgrind python benchmarks/_callgrind_add_task.py ROUNDS MODE

ROUNDS rounds of 10,000 no-op ``add_task`` + ``join()`` after a warm-up round, from a fresh
thread that builds the engine (one worker). MODE ``empty``: the thread never touches
contextvars; ``var``: it sets one ContextVar first. Per task: (Ir at ROUNDS=3 - Ir at
ROUNDS=1) / 20,000, which cancels start-up and shutdown.
"""

import contextvars
import sys
import threading

from catzilla_tasks import BackgroundTasks

ROUNDS = int(sys.argv[1])
MODE = sys.argv[2]
VAR: contextvars.ContextVar[int] = contextvars.ContextVar("bench_var")


def noop() -> None:
    pass


def body() -> None:
    if MODE == "var":
        VAR.set(1)
    with BackgroundTasks(workers=1, min_workers=1, max_workers=1, queue_size=20000, handle_sigterm=False) as t:
        for _ in range(10000):  # warm-up
            t.add_task(noop)
        t.join()
        for _ in range(ROUNDS):
            for _ in range(10000):
                t.add_task(noop)
            t.join()


if MODE not in ("empty", "var"):
    raise SystemExit(f"MODE: empty or var, got {MODE!r}")
th = threading.Thread(target=body)
th.start()
th.join()
