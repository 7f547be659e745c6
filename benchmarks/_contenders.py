"""One measurement of one contender, in a fresh process.

    python benchmarks/_contenders.py CONTENDER FIGURE N [PARAM]

FIGURE (and the contenders that run it):
  throughput     ours, threadpool, catzilla: N no-op tasks end to end (submit, execute,
                 result available)
  critical       ours, threadpool, catzilla: N NORMAL no-ops queued, then PARAM CRITICAL
                 no-ops one at a time
  memory         ours, threadpool, catzilla: bytes per queued no-op task with N queued and
                 their handles held
  lateness       ours, asyncio: N tasks with delays spread evenly over 0..PARAM ms,
                 submitted at once in random order; lateness = start - (submit + delay)
  cpu_isolation  ours_process, ours_threads: N CPU-bound tasks of PARAM iterations of
                 _cpu_task.spin (run.py calibrates PARAM), wall time to all N results
  compile_add, compile_loop
                 ours_native, ours_python, threadpool: see benchmarks/_compile_bench.py

Prints exactly one JSON line on stdout (anything the contender itself prints goes to
stderr). A contender that cannot run prints {"error": "..."} and exits with status 3.
run.py spawns this once per (run, figure, contender), so peak RSS is per contender.
"""
import asyncio
import gc
import itertools
import json
import os
import platform
import random
import resource
import sys
import threading
import time
import traceback
import tracemalloc

try:
    import psutil
except ImportError:  # fall back to /proc and getrusage
    psutil = None

WORKERS = 4
RESULT_TIMEOUT_S = 600.0  # never hang forever on a contender that loses tasks
MAX_ROUNDS = 200  # CRITICAL figure: backlog refills allowed to collect the probes
perf = time.perf_counter


class Unavailable(Exception):
    """The contender cannot be measured in this environment (e.g. not installed)."""


# --------------------------------------------------------------------------- helpers

def noop():
    return None


def rss_bytes():
    """Current resident set size of this process."""
    if psutil is not None:
        return psutil.Process().memory_info().rss
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes():
    """High-water mark of the resident set size of this process."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def percentile(values, q):
    """Linear-interpolated percentile, q in [0, 100]."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class Backlog:
    """NORMAL tasks that count themselves, so we know how many are still queued.

    The task is a Python no-op plus one itertools.count step (atomic in CPython).
    Reading the count consumes a number too, so reads are subtracted again.
    """

    def __init__(self, size):
        self.size = size
        self.submitted = 0
        self._count = itertools.count()
        self._reads = 0
        step = self._count.__next__

        def normal_task():
            step()

        self.task = normal_task

    def executed(self):
        done = next(self._count) - self._reads
        self._reads += 1
        return done

    def remaining(self):
        return self.submitted - self.executed()

    def top_up(self, add):
        """Queue NORMAL tasks with add(task) until `size` are outstanding."""
        need = self.size - self.remaining()
        task = self.task
        for _ in range(need):
            add(task)
        self.submitted += need


class Blockers:
    """`count` tasks that each occupy one worker until release()."""

    def __init__(self, count):
        self.count = count
        self._started = itertools.count(1)
        self._all_started = threading.Event()
        self._release = threading.Event()

    def task(self):
        if next(self._started) == self.count:
            self._all_started.set()
        self._release.wait()

    def wait_started(self, timeout=30.0):
        if not self._all_started.wait(timeout):
            raise RuntimeError("blocker tasks did not all start")

    def release(self):
        self._release.set()


def probe_rounds(stop_workers, start_workers, add_normal, backlog, run_probe, probes, max_rounds):
    """The CRITICAL-wait protocol, shared by all contenders.

    One round: stop the workers, top the backlog up to `backlog.size` queued NORMAL
    tasks, start the workers, then submit one probe at a time (submit, wait for it,
    next) for as long as NORMAL tasks are still queued. Rounds repeat until `probes`
    probes have run or `max_rounds` is reached, so every probe counted was submitted
    with a real backlog ahead of it (a fast engine drains 100,000 no-ops quickly).
    run_probe() -> (queue_wait_ms, harness_wait_ms).
    """
    waits, harness, at_submit = [], [], []
    rounds = 0
    left_at_last = None
    while len(waits) < probes and rounds < max_rounds:
        rounds += 1
        stop_workers()
        backlog.top_up(add_normal)
        start_workers()
        while len(waits) < probes:
            left = backlog.remaining()
            if left <= 0:
                break
            wait_ms, harness_ms = run_probe()
            at_submit.append(left)
            waits.append(wait_ms)
            harness.append(harness_ms)
            left_at_last = backlog.remaining()
    return {
        "backlog": backlog.size,
        "probes": len(waits),
        "rounds": rounds,
        "p50_ms": percentile(waits, 50),
        "p99_ms": percentile(waits, 99),
        "max_ms": max(waits) if waits else None,
        "min_backlog_at_submit": min(at_submit) if at_submit else None,
        "median_backlog_at_submit": percentile(at_submit, 50),
        "normal_remaining_at_last_probe": left_at_last,
        "p50_ms_harness": percentile(harness, 50),
        "p99_ms_harness": percentile(harness, 99),
    }


def _probe_with_event():
    """A probe task that records when it started and signals the waiting harness."""
    started = []
    event = threading.Event()

    def probe():
        started.append(perf())
        event.set()

    return probe, started, event


def harness_probe(submit_critical):
    """Submit one probe, wait until it ran; wait = submit call -> probe started."""
    probe, started, event = _probe_with_event()
    t_submit = perf()
    submit_critical(probe)
    if not event.wait(RESULT_TIMEOUT_S):
        raise RuntimeError("probe never ran")
    ms = (started[0] - t_submit) * 1000.0
    return ms, ms


def queued_memory(n, make_pool):
    """Bytes per queued no-op task, with the result handles held. Shared by all contenders.

    make_pool() creates the contender (after the first RSS reading, so "all-in"
    includes creating it) and returns an object with stop(), start(), fill(slots)
    (submit one no-op per slot, storing its handle there), wait_done(slots),
    engine_stats() (dict or None) and close(). The slot lists are allocated before
    each baseline reading, so list storage is not counted against the task.
    """
    slots = [None] * n
    gc.collect()
    rss_start = rss_bytes()
    pool = make_pool()
    pool.stop()
    gc.collect()
    rss_ready = rss_bytes()
    engine_ready = pool.engine_stats()
    pool.fill(slots)
    gc.collect()
    rss_queued = rss_bytes()
    engine_queued = pool.engine_stats()
    peak_queued = peak_rss_bytes()
    pool.start()
    pool.wait_done(slots)

    # Second pass for tracemalloc (kept apart: tracing itself costs RSS).
    slots = [None] * n
    pool.stop()
    gc.collect()
    tracemalloc.start()
    traced_before = tracemalloc.get_traced_memory()[0]
    pool.fill(slots)
    gc.collect()
    traced_bytes = tracemalloc.get_traced_memory()[0] - traced_before
    tracemalloc.stop()
    pool.start()
    pool.wait_done(slots)
    pool.close()

    out = {
        "n": n,
        "bytes_per_task_rss": (rss_queued - rss_ready) / n,
        "bytes_per_task_rss_all_in": (rss_queued - rss_start) / n,
        "bytes_per_task_tracemalloc": traced_bytes / n,
        "peak_rss_queued_bytes": peak_queued,
        "how_queued": pool.how_queued,
    }
    if engine_ready is not None:
        out["slab_bytes_per_task"] = (engine_queued["slab_bytes"] - engine_ready["slab_bytes"]) / n
        out["slab_nodes_in_use_queued"] = engine_queued["nodes_in_use"]
    return out


class BlockedWorkers:
    """stop()/start() for pools without pause(): occupy every worker with a blocker."""

    def __init__(self, submit_blocker):
        self._submit = submit_blocker
        self._blockers = None

    def stop(self):
        self._blockers = Blockers(WORKERS)
        for _ in range(WORKERS):
            self._submit(self._blockers.task)
        self._blockers.wait_started()

    def start(self):
        self._blockers.release()


# --------------------------------------------------------------------------- ours

def _ours_module():
    try:
        import catzilla_tasks
    except Exception as exc:  # ImportError, or a half-built package
        raise Unavailable(
            f"import catzilla_tasks failed ({type(exc).__name__}: {exc}); "
            "build it with `make -C <repo> build` and run with .venv/bin/python"
        ) from exc
    if not hasattr(catzilla_tasks, "BackgroundTasks"):
        where = list(getattr(catzilla_tasks, "__path__", [])) or catzilla_tasks.__file__
        raise Unavailable(f"catzilla_tasks at {where} has no BackgroundTasks (not built yet?)")
    return catzilla_tasks


_OURS_ENGINES = []  # engines this measurement created, for ours_engine_notes()


def ours_engine_notes():
    """Auto-scaling state of the engines this process created (read after the measurement):
    whether it was on (the default) and what it did, so a figure can be read knowing it."""
    notes = {}
    for tasks in _OURS_ENGINES:
        try:
            decisions = list(getattr(tasks.autoscaler, "decisions", []))
            notes["auto_scaling"] = bool(getattr(tasks, "enable_auto_scaling", False))
            notes["scaler_decisions"] = notes.get("scaler_decisions", 0) + len(decisions)
            targets = [d.get("target") for d in decisions if isinstance(d.get("target"), int)]
            if targets:
                notes["scaler_max_workers"] = max(targets + [notes.get("scaler_max_workers", 0)])
        except Exception as exc:  # an engine without an auto-scaler: nothing to note
            notes["engine_notes_error"] = f"{type(exc).__name__}: {exc}"
    return notes


def _ours_engine(queue_needed):
    ct = _ours_module()
    tasks = ct.BackgroundTasks(workers=WORKERS, queue_size=max(300_000, queue_needed + 10_000))
    _OURS_ENGINES.append(tasks)
    warm = [tasks.add_task(noop) for _ in range(1000)]
    tasks.join()
    warm[-1].wait(timeout=30)
    return ct, tasks


def ours_throughput(n, _probes):
    _ct, tasks = _ours_engine(n)
    add = tasks.add_task
    gc.collect()
    t0 = perf()
    handles = [add(noop) for _ in range(n)]
    t_submitted = perf()
    tasks.join()
    all_ready = all([r.is_ready() for r in handles])
    handles[-1].wait(timeout=RESULT_TIMEOUT_S)
    elapsed = perf() - t0
    tasks.shutdown(wait_for_completion=True, timeout=30)
    return {
        "n": n,
        "seconds": elapsed,
        "tasks_per_s": n / elapsed,
        "submit_tasks_per_s": n / (t_submitted - t0),
        "completed": n if all_ready else sum(1 for r in handles if r.is_ready()),
        "all_results_ready": all_ready,
    }


def ours_critical(backlog_n, probes):
    ct, tasks = _ours_engine(backlog_n + probes)
    critical = tasks.options(priority=ct.TaskPriority.CRITICAL)

    def run_probe():
        probe, started, _event = _probe_with_event()
        t_submit = perf()
        r = critical.add_task(probe)
        r.wait(timeout=RESULT_TIMEOUT_S)
        return r.get_stats()["queue_wait_ms"], (started[0] - t_submit) * 1000.0

    out = probe_rounds(tasks.pause, tasks.resume, tasks.add_task, Backlog(backlog_n),
                       run_probe, probes, max_rounds=MAX_ROUNDS)
    tasks.join()
    tasks.shutdown(wait_for_completion=True, timeout=30)
    out["source"] = "TaskResult.get_stats()['queue_wait_ms']; *_harness: add_task() call -> probe started"
    return out


class _OursPool:
    how_queued = "tasks.pause()"

    def __init__(self, n):
        _ct, self.tasks = _ours_engine(n)
        self.stop, self.start = self.tasks.pause, self.tasks.resume

    def fill(self, slots):
        add = self.tasks.add_task
        for i in range(len(slots)):
            slots[i] = add(noop)

    def wait_done(self, slots):
        self.tasks.join()
        slots[-1].wait(timeout=RESULT_TIMEOUT_S)

    def engine_stats(self):
        return self.tasks.memory_stats()

    def close(self):
        self.tasks.shutdown(wait_for_completion=True, timeout=30)


def ours_memory(n, _probes):
    return queued_memory(n, lambda: _OursPool(n))


# --------------------------------------------------------------------------- ThreadPoolExecutor

def _threadpool():
    from concurrent.futures import ThreadPoolExecutor, wait

    ex = ThreadPoolExecutor(WORKERS)
    wait([ex.submit(noop) for _ in range(1000)])
    return ex, wait


def threadpool_throughput(n, _probes):
    ex, wait = _threadpool()
    submit = ex.submit
    gc.collect()
    t0 = perf()
    futures = [submit(noop) for _ in range(n)]
    t_submitted = perf()
    done, not_done = wait(futures, timeout=RESULT_TIMEOUT_S)
    elapsed = perf() - t0
    ex.shutdown(wait=True)
    return {
        "n": n,
        "seconds": elapsed,
        "tasks_per_s": n / elapsed,
        "submit_tasks_per_s": n / (t_submitted - t0),
        "completed": len(done),
        "all_results_ready": not not_done,
    }


def threadpool_critical(backlog_n, probes):
    # ThreadPoolExecutor has one FIFO queue and no priorities: a probe waits for the
    # whole backlog, and the next one finds the queue empty, so each round yields one
    # probe. Rounds are capped at 3 (each costs a full drain of the backlog).
    ex, _wait = _threadpool()
    workers = BlockedWorkers(ex.submit)
    out = probe_rounds(workers.stop, workers.start, ex.submit, Backlog(backlog_n),
                       lambda: harness_probe(ex.submit), probes, max_rounds=3)
    ex.shutdown(wait=True)
    out["source"] = "harness: submit() call -> probe started (FIFO, no priorities)"
    return out


class _ThreadPool:
    how_queued = f"all {WORKERS} workers blocked on an Event"

    def __init__(self):
        self.ex, self._wait = _threadpool()
        workers = BlockedWorkers(self.ex.submit)
        self.stop, self.start = workers.stop, workers.start

    def fill(self, slots):
        submit = self.ex.submit
        for i in range(len(slots)):
            slots[i] = submit(noop)

    def wait_done(self, slots):
        self._wait(slots, timeout=RESULT_TIMEOUT_S)

    def engine_stats(self):
        return None

    def close(self):
        self.ex.shutdown(wait=True)


def threadpool_memory(n, _probes):
    return queued_memory(n, _ThreadPool)


# --------------------------------------------------------------------------- catzilla 0.2.3

def _catzilla(queue_needed):
    """Catzilla's background task system, sized so that nothing is dropped.

    catzilla 0.2.3 splits queue_size over four PriorityQueues (NORMAL gets
    queue_size // 2) and silently drops tasks that do not fit, so queue_size is
    2x what we queue. Its TaskResult.wait() never returns (nothing sets
    _completed), so completion is counted through side effects instead.
    """
    try:
        import catzilla
        from catzilla import Catzilla
        from catzilla.background_tasks import TaskPriority
    except Exception as exc:
        raise Unavailable(
            f"import catzilla failed ({type(exc).__name__}: {exc}); pip install catzilla==0.2.3"
        ) from exc
    app = Catzilla()
    app.enable_background_tasks(workers=WORKERS, queue_size=2 * (queue_needed + 10_000))
    warm = Counted()
    warm.expect(1000)
    for _ in range(1000):
        app.add_task(warm.task)
    warm.wait()
    return app, TaskPriority, getattr(catzilla, "__version__", "?")


class Counted:
    """Tasks that count themselves; the one reaching the expected total sets an Event."""

    def __init__(self):
        self.target = 0
        self._count = itertools.count(1)
        self._reads = 0
        self._done = threading.Event()
        step, done = self._count.__next__, self._done

        def counted_task():
            if step() == self.target:
                done.set()

        self.task = counted_task

    def expect(self, k):
        """Call before submitting k more tasks (with none running)."""
        self._done.clear()
        self.target += k

    def wait(self, stall_s=10.0):
        """Wait for the expected total; give up (False) once no task ran for stall_s.

        The Event does the waiting; the count is only read when a stall_s slice
        passes without it, so a contender that drops tasks cannot hang the run.
        """
        seen = self.executed()
        while not self._done.wait(stall_s):
            now = self.executed()
            if now == seen:
                return False
            seen = now
        return True

    def executed(self):
        done = next(self._count) - 1 - self._reads
        self._reads += 1
        return done


def catzilla_throughput(n, _probes):
    app, _prio, version = _catzilla(n)
    counted = Counted()
    counted.expect(n)
    add = app.add_task
    gc.collect()
    t0 = perf()
    handles = [add(counted.task) for _ in range(n)]
    t_submitted = perf()
    finished = counted.wait()
    elapsed = perf() - t0
    executed = counted.executed()
    ready = sum(1 for r in handles if r.is_ready())
    app.tasks.shutdown(wait_for_completion=True, timeout=30)
    return {
        "n": n,
        "seconds": elapsed,
        "tasks_per_s": n / elapsed if finished else None,
        "submit_tasks_per_s": n / (t_submitted - t0),
        "completed": executed,
        "all_results_ready": False,
        "handles_reporting_ready": ready,  # catzilla's TaskResult.is_ready() never turns True
        "catzilla_version": version,
        "how_waited": "side-effect counter; the last task sets a threading.Event",
    }


def catzilla_critical(backlog_n, probes):
    app, prio, version = _catzilla(backlog_n + probes)
    # catzilla has no pause(): occupy its workers with CRITICAL blockers instead
    def add_critical(func):
        return app.add_task(func, priority=prio.CRITICAL)

    workers = BlockedWorkers(add_critical)
    out = probe_rounds(workers.stop, workers.start, app.add_task, Backlog(backlog_n),
                       lambda: harness_probe(add_critical), probes, max_rounds=MAX_ROUNDS)
    app.tasks.shutdown(wait_for_completion=True, timeout=30)
    out["source"] = "harness: add_task() call -> probe started (its TaskStats are never filled)"
    out["catzilla_version"] = version
    return out


class _CatzillaPool:
    how_queued = f"all {WORKERS} workers blocked by CRITICAL tasks waiting on an Event"

    def __init__(self, n):
        self.app, prio, self.version = _catzilla(n)
        workers = BlockedWorkers(lambda f: self.app.add_task(f, priority=prio.CRITICAL))
        self.stop, self.start = workers.stop, workers.start
        self.counted = Counted()

    def fill(self, slots):
        add, task = self.app.add_task, self.counted.task
        self.counted.expect(len(slots))
        for i in range(len(slots)):
            slots[i] = add(task)

    def wait_done(self, slots):
        self.counted.wait()  # its result handles never report completion

    def engine_stats(self):
        return None

    def close(self):
        self.app.tasks.shutdown(wait_for_completion=True, timeout=30)


def catzilla_memory(n, _probes):
    return queued_memory(n, lambda: _CatzillaPool(n))


# --------------------------------------------------------------------------- lateness (delayed tasks)

LATENESS_SEED = 20_240_601  # the same shuffled delays in every run and for every contender


def lateness_plan(n, spread_ms):
    """n delays spread evenly over 0..spread_ms, in a random (but fixed) order."""
    step = spread_ms / (n - 1) if n > 1 else 0.0
    delays = [i * step for i in range(n)]
    random.Random(LATENESS_SEED).shuffle(delays)
    return delays


class StartRecorder:
    """task(i) stores time.monotonic() at its start; the n-th task to run sets `done`."""

    def __init__(self, n):
        self.starts = [None] * n
        self.done = threading.Event()
        starts, step, done, mono = self.starts, itertools.count(1).__next__, self.done, time.monotonic

        def record(i):
            starts[i] = mono()
            if step() == n:
                done.set()

        self.task = record


def submit_delayed(delays, submit_one):
    """Submit every task at once; submitted[i] = time.monotonic() just before its call.

    submit_one(delay_ms, i) makes the contender's submit call. Returns
    (submitted, first_submit, submit_end) on the monotonic clock.
    """
    n = len(delays)
    submitted = [0.0] * n
    mono = time.monotonic
    gc.collect()
    first = mono()
    for i, d in enumerate(delays):
        submitted[i] = mono()
        submit_one(d, i)
    return submitted, first, mono()


def lateness_summary(delays, submitted, starts, first_submit, submit_end):
    """p50/p99/max lateness in ms, plus the same over tasks that fell due after the last
    submit (the submit loop holds the GIL, so tasks due during it can be late for that)."""
    late, late_after = [], []
    for d, t_sub, t_start in zip(delays, submitted, starts):
        if t_start is None:
            continue
        due = t_sub + d / 1000.0
        ms = (t_start - due) * 1000.0
        late.append(ms)
        if due > submit_end:
            late_after.append(ms)
    n = len(delays)
    return {
        "n": n,
        "spread_ms": max(delays) if delays else 0.0,
        "started": len(late),
        "p50_ms": percentile(late, 50),
        "p90_ms": percentile(late, 90),
        "p99_ms": percentile(late, 99),
        "max_ms": max(late) if late else None,
        "min_ms": min(late) if late else None,
        "mean_ms": sum(late) / len(late) if late else None,
        "early": sum(1 for x in late if x < 0),  # started before it was due: would be a bug
        "over_2ms": sum(1 for x in late if x > 2.0),
        "submit_s": submit_end - first_submit,
        "submit_us_per_task": (submit_end - first_submit) / n * 1e6,
        "due_after_submit": len(late_after),
        "p50_ms_due_after_submit": percentile(late_after, 50),
        "p99_ms_due_after_submit": percentile(late_after, 99),
        "max_ms_due_after_submit": max(late_after) if late_after else None,
    }


def ours_lateness(n, spread_ms):
    _ct, tasks = _ours_engine(n)
    # start the engine's timer thread (started on first use) before measuring
    warm = [tasks.options(delay_ms=1).add_task(noop) for _ in range(100)]
    tasks.join()
    warm[-1].wait(timeout=30)

    delays = lateness_plan(n, spread_ms)
    rec = StartRecorder(n)
    options, task = tasks.options, rec.task

    def submit_one(d, i):
        options(delay_ms=d).add_task(task, i)

    submitted, first, end = submit_delayed(delays, submit_one)
    in_timer = tasks.stats()["scheduled"]
    if not rec.done.wait(spread_ms / 1000.0 + RESULT_TIMEOUT_S):
        raise RuntimeError(f"only {sum(s is not None for s in rec.starts)} of {n} delayed tasks ran")
    tasks.join()
    stats = tasks.stats()
    tasks.shutdown(wait_for_completion=True, timeout=30)
    out = lateness_summary(delays, submitted, rec.starts, first, end)
    out.update({
        "scheduled_after_submit": in_timer,  # stats()['scheduled']: tasks in the C timer then
        "succeeded": stats["succeeded"] - len(warm) - 1000,
        "rejected": stats["rejected"],
        "how": "tasks.options(delay_ms=d).add_task(task, i)",
    })
    return out


def asyncio_lateness(n, spread_ms):
    loop = asyncio.new_event_loop()  # the standard loop (not uvloop), as most code gets it
    thread = threading.Thread(target=loop.run_forever, name="asyncio-loop", daemon=True)
    thread.start()
    later, soon = loop.call_later, loop.call_soon_threadsafe
    warmed = threading.Event()
    soon(later, 0.001, warmed.set)
    if not warmed.wait(30):
        raise RuntimeError("the asyncio loop did not start")

    delays = lateness_plan(n, spread_ms)
    rec = StartRecorder(n)
    task = rec.task

    def submit_one(d, i):
        soon(later, d / 1000.0, task, i)

    submitted, first, end = submit_delayed(delays, submit_one)
    if not rec.done.wait(spread_ms / 1000.0 + RESULT_TIMEOUT_S):
        raise RuntimeError(f"only {sum(s is not None for s in rec.starts)} of {n} delayed callbacks ran")
    soon(loop.stop)
    thread.join(30)
    loop.close()
    out = lateness_summary(delays, submitted, rec.starts, first, end)
    out.update({
        "loop": f"{type(loop).__module__}.{type(loop).__name__}",
        "how": "loop.call_soon_threadsafe(loop.call_later, d, task, i), loop.run_forever() in a thread",
    })
    return out


# --------------------------------------------------------------------------- cpu_isolation

def _cpu_module():
    import _cpu_task  # benchmarks/ is sys.path[0]; the pool's children get the same sys.path

    return _cpu_task


def _cpu_figure(tasks_n, iterations, submit, label):
    """Time one task alone on this thread, then `tasks_n` tasks: first submit -> all results."""
    cpu = _cpu_module()
    t0 = perf()
    cpu.spin(iterations)
    alone = perf() - t0

    gc.collect()
    t0 = perf()
    handles = [submit(cpu.spin, iterations) for _ in range(tasks_n)]
    values = [r.wait(timeout=RESULT_TIMEOUT_S) for r in handles]
    elapsed = perf() - t0
    pids = sorted({pid for pid, _x in values})
    return {
        "n": tasks_n,
        "iterations": iterations,
        "seconds": elapsed,
        "one_task_alone_s": alone,
        "seconds_over_one_task": elapsed / alone,
        "distinct_pids": len(pids),
        "ran_in_parent": os.getpid() in pids,
        "how": label,
    }


def ours_process_cpu_isolation(tasks_n, iterations):
    _ct, tasks = _ours_engine(0)
    cpu = _cpu_module()
    # The engine starts its process pool on first use: warm it with two overlapping
    # tiny process tasks so the children's start-up is not measured.
    try:
        warm = [tasks.options(isolation="process").add_task(cpu.warm, 0.3) for _ in range(2)]
        warm_pids = sorted({r.wait(timeout=120) for r in warm})
    except Exception as exc:
        tasks.shutdown(wait_for_completion=False, timeout=30)
        raise Unavailable(f"options(isolation='process') failed: {type(exc).__name__}: {exc}") from exc

    def submit(fn, arg):
        return tasks.options(isolation="process").add_task(fn, arg)

    out = _cpu_figure(tasks_n, iterations, submit, 'tasks.options(isolation="process").add_task(spin, n)')
    out["warm_child_pids"] = len(warm_pids)
    out["process_workers"] = getattr(tasks, "process_workers", None)
    tasks.shutdown(wait_for_completion=True, timeout=60)
    return out


def ours_threads_cpu_isolation(tasks_n, iterations):
    _ct, tasks = _ours_engine(0)
    out = _cpu_figure(tasks_n, iterations, tasks.add_task, "tasks.add_task(spin, n) (thread tasks)")
    tasks.shutdown(wait_for_completion=True, timeout=60)
    return out


# --------------------------------------------------------------------------- main

# --------------------------------------------------------------------------- auto-scaling

AUTOSCALE_COOLDOWN_S = 2.0


def _scaling_engine(auto):
    ct = _ours_module()
    tasks = ct.BackgroundTasks(workers=2, min_workers=2, max_workers=64, queue_size=300_000,
                               enable_auto_scaling=False)
    if auto:
        tasks.autoscaler.enable_auto_scaling(cooldown_seconds=AUTOSCALE_COOLDOWN_S)
    return tasks


def _autoscale_sleepers(n, sleep_ms, auto):
    """n tasks each sleeping sleep_ms, pool starting at 2 workers: wall time to run them all,
    and (with auto-scaling) how long until the pool is back at min_workers once they ended."""
    tasks = _scaling_engine(auto)
    t0 = perf()
    for _ in range(n):
        tasks.add_task(time.sleep, sleep_ms / 1000.0)
    tasks.join()
    wall = perf() - t0
    peak = max([d.get("target", 2) for d in tasks.autoscaler.decisions] or [2])
    back = 0.0
    if auto:
        # bounded wait for the scaler's own decisions (no event to wait on from outside)
        t1 = perf()
        while tasks.stats()["workers"] > 2 and perf() - t1 < AUTOSCALE_COOLDOWN_S + 10:
            time.sleep(0.05)
        back = perf() - t1
    out = {"seconds": wall, "tasks_per_s": n / wall, "peak_workers": peak,
           "back_to_min_s": back, "workers_after": tasks.stats()["workers"],
           "cooldown_s": AUTOSCALE_COOLDOWN_S if auto else 0.0}
    tasks.shutdown(wait_for_completion=True, timeout=30)
    return out


def _autoscale_noop(n, auto):
    tasks = _scaling_engine(auto)
    add = tasks.add_task
    warm = [add(noop) for _ in range(1000)]
    tasks.join()
    del warm
    gc.collect()
    t0 = perf()
    handles = [add(noop) for _ in range(n)]
    tasks.join()
    handles[-1].wait(timeout=RESULT_TIMEOUT_S)
    wall = perf() - t0
    out = {"seconds": wall, "tasks_per_s": n / wall, "workers_after": tasks.stats()["workers"],
           "scale_ups": sum(d["action"] == "up" for d in tasks.autoscaler.decisions)}
    tasks.shutdown(wait_for_completion=True, timeout=30)
    return out


MEASUREMENTS = {
    ("ours_autoscale", "autoscale"): lambda n, ms: _autoscale_sleepers(n, ms, True),
    ("ours_fixed", "autoscale"): lambda n, ms: _autoscale_sleepers(n, ms, False),
    ("ours_autoscale", "autoscale_noop"): lambda n, _p: _autoscale_noop(n, True),
    ("ours_fixed", "autoscale_noop"): lambda n, _p: _autoscale_noop(n, False),
    ("ours", "throughput"): ours_throughput,
    ("ours", "critical"): ours_critical,
    ("ours", "memory"): ours_memory,
    ("threadpool", "throughput"): threadpool_throughput,
    ("threadpool", "critical"): threadpool_critical,
    ("threadpool", "memory"): threadpool_memory,
    ("catzilla", "throughput"): catzilla_throughput,
    ("catzilla", "critical"): catzilla_critical,
    ("catzilla", "memory"): catzilla_memory,
    ("ours", "lateness"): ours_lateness,
    ("asyncio", "lateness"): asyncio_lateness,
    ("ours_process", "cpu_isolation"): ours_process_cpu_isolation,
    ("ours_threads", "cpu_isolation"): ours_threads_cpu_isolation,
}

# compile_add, compile_loop: compiled tasks vs Python tasks vs ThreadPoolExecutor
import _compile_bench  # noqa: E402

_compile_bench.Unavailable = Unavailable
MEASUREMENTS.update(_compile_bench.MEASUREMENTS)


def main(argv):
    if len(argv) not in (4, 5) or (argv[1], argv[2]) not in MEASUREMENTS:
        sys.stderr.write(__doc__)
        return 2
    contender, figure, n = argv[1], argv[2], int(argv[3])
    probes = int(argv[4]) if len(argv) == 5 else 0

    # Contenders print banners (catzilla does, even from C): send fd 1 to stderr
    # and keep a private copy of the real stdout for our one JSON line.
    sys.stdout.flush()
    result_fd = os.dup(1)
    os.dup2(2, 1)

    status = 0
    try:
        result = MEASUREMENTS[(contender, figure)](n, probes)
    except Unavailable as exc:
        result, status = {"error": str(exc), "unavailable": True}, 3
    except Exception as exc:
        traceback.print_exc()
        result, status = {"error": f"{type(exc).__name__}: {exc}"}, 3
    if _OURS_ENGINES:
        result.update(ours_engine_notes())
    result.update({
        "contender": contender,
        "figure": figure,
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_source": "psutil" if psutil is not None else "/proc/self/statm",
        "python": platform.python_version(),
    })
    sys.stdout.flush()
    with os.fdopen(result_fd, "w") as out:
        out.write(json.dumps(result) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
