"""Many producers, many tasks: nothing lost, nothing run twice, no memory growth.

Sizes scale with CATZILLA_TASKS_STRESS_N (1,000,000 by default; CI's sanitizer run uses less).
"""

import gc
import os
import random
import threading

import pytest

from catzilla_tasks import BackgroundTasks, TaskPriority, TaskStatus

STRESS_N = int(os.environ.get("CATZILLA_TASKS_STRESS_N", "1000000"))

pytestmark = pytest.mark.stress


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_four_producers_every_task_runs_exactly_once():
    n = STRESS_N
    counts = bytearray(n)
    eng = BackgroundTasks(workers=4, queue_size=50_000)
    prios = list(TaskPriority)

    def bump(i):
        counts[i] += 1

    def produce(start, stop, seed):
        rnd = random.Random(seed)
        blocking = {p: eng.options(priority=p, block_timeout=-1) for p in prios}
        for i in range(start, stop):
            blocking[prios[rnd.randrange(4)]].add_task(bump, i)

    step = n // 4
    threads = [threading.Thread(target=produce, args=(k * step, n if k == 3 else (k + 1) * step, k)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        eng.join(600)
        s = eng.stats()
    finally:
        eng.shutdown()
    missing = counts.count(0)
    twice = n - missing - counts.count(1)
    assert missing == 0 and twice == 0, f"{missing} tasks never ran, {twice} ran more than once"
    assert s["submitted"] == n and s["succeeded"] == n and s["failed"] == 0


def test_cancel_race_every_task_runs_or_is_cancelled_never_both():
    n = max(STRESS_N // 10, 10_000)
    ran = bytearray(n)
    eng = BackgroundTasks(workers=4, queue_size=n)
    handles = [None] * n
    cancelled = bytearray(n)
    produced = threading.Event()

    def mark(i):
        ran[i] += 1

    made = [0]
    # The race is timing-dependent (under a sanitizer the producer may keep the GIL until the
    # newest tasks have run): halfway, the engine is paused until the canceller has cancelled
    # at least one queued task, so every run exercises a successful cancel too.
    first_cancel = threading.Event()

    def produce():
        for i in range(n):
            handles[i] = eng.add_task(mark, i)
            made[0] = i + 1
            if i == n // 2:
                eng.pause()
                first_cancel.wait(60)
                eng.resume()
        produced.set()

    def cancel():
        # aim at the newest tasks (likely still queued) and at random older ones (likely
        # running or done), while the producer goes on and after it stops
        rnd = random.Random(7)
        k = -1
        while True:
            k += 1
            if k >= n // 2 and (first_cancel.is_set() or produced.is_set()):
                break
            top = made[0]
            if top == 0:
                continue
            i = top - 1 - rnd.randrange(min(top, 64)) if k % 2 else rnd.randrange(top)
            if handles[i].cancel():
                cancelled[i] = 1
                first_cancel.set()

    p, c = threading.Thread(target=produce), threading.Thread(target=cancel)
    try:
        p.start()
        c.start()
        p.join()
        c.join()
        eng.join(120)
    finally:
        eng.shutdown()
    for i in range(n):
        assert ran[i] + cancelled[i] == 1, f"task {i}: ran {ran[i]} times, cancelled={cancelled[i]}"
        expected = TaskStatus.CANCELLED if cancelled[i] else TaskStatus.SUCCEEDED
        assert handles[i].status is expected
    assert first_cancel.is_set() and sum(cancelled) > 0


def test_no_memory_growth_over_a_million_tasks():
    eng = BackgroundTasks(workers=4, queue_size=100_000)
    n = STRESS_N
    gc.collect()  # the node count is process-wide: earlier tests' garbage must not be freed mid-test
    base_nodes = eng.memory_stats()["nodes_in_use"]

    def noop(x=None):
        return x

    def round_():
        for start in range(0, n, 50_000):
            keep = [eng.add_task(noop, i) for i in range(start, min(start + 50_000, n))]
            if start % 100_000 == 0:
                keep = None  # half the rounds drop their handles before the tasks run
            eng.join(120)
            del keep
        gc.collect()

    try:
        round_()  # warm-up: the slab and the allocators reach their steady size
        rss1, slab1 = _rss_bytes(), eng.memory_stats()["slab_bytes"]
        round_()
        round_()
        rss3, slab3 = _rss_bytes(), eng.memory_stats()["slab_bytes"]
        nodes = eng.memory_stats()["nodes_in_use"]
    finally:
        eng.shutdown()
    assert nodes == base_nodes, f"{nodes - base_nodes} task nodes never freed"
    assert slab3 == slab1, f"node slab grew from {slab1} to {slab3} bytes"
    if not os.environ.get("CATZILLA_TASKS_SANITIZER"):
        # (AddressSanitizer holds freed memory in quarantine: RSS says nothing there)
        assert rss3 - rss1 < 8 * 2**20, f"RSS grew by {(rss3 - rss1) / 2**20:.1f} MB over {2 * n} tasks"
