"""Engine lifecycle (issue 12, items 7 and 9-15): options that do what they say, counters that
count what they name, an event loop a task cannot kill, work in worker batches seen by the
scaler, waits inside tasks, shutdown of work that spawns work, fork, slab caches of
short-lived threads."""

import asyncio
import os
import sys
import threading
import time

import pytest

import catzilla_tasks
from catzilla_tasks import (
    BackgroundTasks,
    ShutdownTimeout,
    TaskCancelled,
    TaskConfig,
    TaskResult,
    TaskStatus,
)

# -- item 14: options that do nothing or refuse the obvious -------------------------------------


@pytest.mark.timeout(60)
def test_one_worker_is_one_worker():
    with BackgroundTasks(workers=1, enable_auto_scaling=False) as eng:
        assert eng.min_workers == 1
        assert eng.stats()["workers"] == 1
        assert eng.add_task(lambda: 7).wait(10) == 7


@pytest.mark.timeout(60)
def test_memory_pool_mb_caps_the_bytes_queued_arguments_hold(make_tasks):
    eng = make_tasks(workers=2, enable_auto_scaling=False, memory_pool_mb=1)
    blob = b"x" * 300_000
    eng.pause()
    hs = [eng.add_task(len, blob + bytes([i])) for i in range(3)]  # 3 x ~300 kB: fits in 1 MiB
    held = eng.stats()["queued_arg_bytes"]
    assert 3 * 300_000 < held <= 2**20
    with pytest.raises(catzilla_tasks.QueueFull, match="memory_pool_mb=1 reached"):
        eng.add_task(len, blob + b"!")
    with pytest.raises(catzilla_tasks.QueueFull, match="memory_pool_mb"):
        eng.map(len, [blob, blob])  # all or nothing: none of the batch is queued
    assert eng.stats()["queued_arg_bytes"] == held and eng.stats()["queued_total"] == 3
    q = eng.monitor.get_stats()["queue_metrics"]
    assert q["queued_argument_bytes"] == held and q["memory_pool_bytes"] == 2**20
    eng.resume()
    assert [h.wait(10) for h in hs] == [300_001] * 3
    assert eng.stats()["queued_arg_bytes"] == 0  # given back when the tasks started
    assert eng.add_task(len, blob).wait(10) == 300_000
    small = make_tasks(workers=1, enable_auto_scaling=False, memory_pool_mb=0.001)
    with pytest.raises(catzilla_tasks.QueueFull, match="memory_pool_mb"):
        small.add_task(len, blob)
    assert small.add_task(int).wait(10) == 0  # no arguments, nothing to hold


def test_memory_pool_mb_validation():
    for bad in (0, -1, float("nan"), "10"):
        with pytest.raises(ValueError, match="memory_pool_mb"):
            BackgroundTasks(workers=1, memory_pool_mb=bad)


def test_monitor_and_autoscaler_at_the_package_root():
    from catzilla_tasks.monitor import AutoScaler, TaskMonitor

    assert catzilla_tasks.TaskMonitor is TaskMonitor
    assert catzilla_tasks.AutoScaler is AutoScaler
    assert {"TaskMonitor", "AutoScaler"} <= set(catzilla_tasks.__all__)
    from catzilla_tasks import AutoScaler as RootScaler
    from catzilla_tasks import TaskMonitor as RootMonitor

    assert RootScaler is AutoScaler and RootMonitor is TaskMonitor


# -- item 13: smaller lifecycle defects -------------------------------------------------------


def _until(pred, timeout=10.0):
    """Poll pred() until true or timeout (for states with no event to wait on); returns pred()."""
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.01)
    return pred()


@pytest.mark.timeout(60)
def test_task_id_from_stats_repr_or_failures_finds_the_task(make_tasks):
    eng = make_tasks(workers=2, enable_auto_scaling=False)
    gate = threading.Event()
    h = eng.add_task(gate.wait, 30)
    tid = h.get_stats()["task_id"]  # .task_id never read
    assert TaskResult(tid).status in (TaskStatus.PENDING, TaskStatus.RUNNING)
    h2 = eng.add_task(int)
    rid = repr(h2).split()[1]
    assert TaskResult(rid).wait(10) == 0

    def boom():
        raise ValueError("x")

    h3 = eng.add_task(boom)
    with pytest.raises(ValueError):
        h3.wait(10)
    fid = eng.monitor.get_stats()["recent_failures"][0]["task_id"]
    assert TaskResult(fid).status is TaskStatus.FAILED
    gate.set()
    assert TaskResult(tid).wait(10) is True


def _slow_then_fast(state):
    state["n"] += 1
    if state["n"] == 1:
        for _ in range(1000):  # Python-level sleep: the TaskTimeout is raised in here
            time.sleep(0.01)
    return "ok"


@pytest.mark.timeout(60)
def test_timed_out_counts_tasks_that_ended_timed_out(make_tasks):
    eng = make_tasks(workers=2, enable_auto_scaling=False)
    cfg = TaskConfig(timeout_ms=100, max_retries=1, retry_on_timeout=True, retry_base_ms=1, retry_jitter=False)
    a, b = {"n": 0}, {"n": 0}
    hs = [eng.options(config=cfg).add_task(_slow_then_fast, s) for s in (a, b)]
    assert [h.wait(30) for h in hs] == ["ok", "ok"]
    st = eng.monitor.get_stats()
    assert st["totals"]["timed_out"] == 0 and st["error_metrics"]["error_rate"] == 0.0
    assert st["totals"]["retried"] == 2
    h = eng.options(timeout_ms=100).add_task(_slow_then_fast, {"n": 0})
    with pytest.raises(catzilla_tasks.TaskTimeout):
        h.wait(30)
    assert h.status is TaskStatus.TIMED_OUT
    assert eng.stats()["timed_out"] == 1


def test_monitor_handle_size_is_the_real_one(tasks):
    from catzilla_tasks import monitor

    h = tasks.add_task(int)
    assert monitor.HANDLE_BYTES == sys.getsizeof(h)
    h.wait(10)


def _engine_threads(name):
    return [t for t in threading.enumerate() if t.name.startswith(name)]


@pytest.mark.timeout(60)
def test_timed_out_shutdown_stops_everything_once_tasks_end():
    eng = BackgroundTasks(workers=2, enable_auto_scaling=False, name="lc-timedout-a")
    gate = threading.Event()
    started = threading.Event()

    async def async_blocker():
        started.set()
        await asyncio.sleep(0)
        return 1

    eng.add_task(async_blocker).wait(10)  # the loop thread exists
    eng.add_task(gate.wait, 30)
    with pytest.raises(ShutdownTimeout):
        eng.shutdown(timeout=0.2)
    assert eng.is_shutdown
    assert eng.stats()["workers"] == 2  # still running the blocked task
    gate.set()
    # nobody calls shutdown() again: the engine stops its threads by itself
    assert _until(lambda: eng.stats()["workers"] == 0)
    assert _until(lambda: not _engine_threads("lc-timedout-a"))


@pytest.mark.timeout(60)
def test_second_shutdown_after_a_timeout_waits_again():
    eng = BackgroundTasks(workers=2, enable_auto_scaling=False, name="lc-timedout-b")
    gate = threading.Event()
    eng.add_task(gate.wait, 30)
    with pytest.raises(ShutdownTimeout):
        eng.shutdown(timeout=0.2)
    with pytest.raises(ShutdownTimeout, match="still running"):
        eng.shutdown(timeout=0.2)  # not silently nothing: the task still runs
    gate.set()
    eng.shutdown(timeout=10)
    assert eng.stats()["workers"] == 0
    eng.shutdown()  # stopped: nothing to do


# -- item 7: an async task cannot kill the engine's event loop ---------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("exc", [SystemExit, KeyboardInterrupt, "sys.exit"])
def test_async_task_raising_systemexit_fails_and_the_loop_lives(make_tasks, exc):
    eng = make_tasks(workers=2, enable_auto_scaling=False)
    other_started = threading.Event()
    box = {}

    async def other():
        box["ev"] = asyncio.Event()
        other_started.set()
        await box["ev"].wait()
        return "other done"

    async def killer():
        await asyncio.sleep(0)
        if exc == "sys.exit":
            sys.exit(3)
        raise exc()

    h_other = eng.add_task(other)
    assert other_started.wait(10)
    h = eng.add_task(killer)
    expected = SystemExit if exc in (SystemExit, "sys.exit") else KeyboardInterrupt
    with pytest.raises(expected):
        h.wait(10)
    assert h.status is TaskStatus.FAILED
    # the loop still runs: the waiting coroutine settles, later async tasks run
    eng.loop.call_soon_threadsafe(box["ev"].set)
    assert h_other.wait(10) == "other done"

    async def later():
        await asyncio.sleep(0)
        return 5

    assert eng.add_task(later).wait(10) == 5
    eng.shutdown(timeout=10)  # does not time out


# -- item 15: tasks waiting in a worker's batch are waiting --------------------------------------


@pytest.mark.timeout(60)
def test_batched_tasks_count_as_queued_not_running(make_tasks):
    eng = make_tasks(workers=4, enable_auto_scaling=False)
    gate = threading.Event()
    lock = threading.Lock()
    started = {"n": 0}
    four = threading.Event()

    def blocker():
        with lock:
            started["n"] += 1
            if started["n"] == 4:
                four.set()
        gate.wait(30)

    hs = [eng.add_task(blocker) for _ in range(40)]
    assert four.wait(10)
    try:
        # the 36 not started sit in queues or in workers' batches: either way they wait
        assert _until(lambda: eng.stats()["running"] == 4)
        st = eng.stats()
        assert st["queued_total"] == 36 and st["running"] == 4
        q = eng.monitor.get_stats()["queue_metrics"]
        assert q["total_queued"] == 36
        assert 0 <= q["in_worker_batches"] <= 36
    finally:
        gate.set()
    for h in hs:
        h.wait(30)


@pytest.mark.timeout(60)
def test_burst_of_blocking_tasks_scales_up(make_tasks):
    eng = make_tasks(workers=4, min_workers=4, max_workers=40)
    eng.autoscaler.enable_auto_scaling(cooldown_seconds=60)
    t0 = time.monotonic()
    hs = [eng.add_task(time.sleep, 0.5) for _ in range(40)]
    for h in hs:
        h.wait(30)
    elapsed = time.monotonic() - t0
    ups = [d for d in eng.autoscaler.decisions if d["action"] == "up"]
    assert ups, f"no scaling decision in {elapsed:.2f} s"
    # without scaling: 10 rounds of 0.5 s on 4 workers, 5 s
    assert elapsed < 4.0, f"40 x 0.5 s sleeps took {elapsed:.2f} s ({eng.autoscaler.decisions})"
    assert ups[0]["at"] - (time.time() - elapsed) < 1.5


@pytest.mark.timeout(60)
def test_cancelled_running_async_task_says_so(make_tasks):
    eng = make_tasks(workers=2, enable_auto_scaling=False)
    running = threading.Event()

    async def forever():
        running.set()
        await asyncio.sleep(60)

    h = eng.add_task(forever)
    assert running.wait(10)
    assert h.cancel()
    with pytest.raises(TaskCancelled, match="while it ran") as info:
        h.wait(10)
    assert "before it ran" not in str(info.value)
    gate = threading.Event()
    eng2 = make_tasks(workers=1, enable_auto_scaling=False)
    eng2.add_task(gate.wait, 30)
    queued = eng2.add_task(int)
    assert queued.cancel()
    gate.set()
    with pytest.raises(TaskCancelled, match="before it ran"):
        queued.wait(10)


# -- item 11: waiting on a task from inside a task ----------------------------------------------


@pytest.mark.timeout(60)
def test_tasks_waiting_on_queued_tasks_get_stand_in_workers(make_tasks):
    eng = make_tasks(workers=2, enable_auto_scaling=False)
    both = threading.Barrier(2, timeout=20)

    def child(x):
        return x * 10

    def parent(x):
        both.wait()  # both workers are now busy with a parent
        return eng.add_task(child, x).wait(5)  # the child is queued behind nobody

    hs = [eng.add_task(parent, x) for x in (1, 2)]
    assert [h.wait(20) for h in hs] == [10, 20]
    assert _until(lambda: eng.stats()["workers"] == 2)  # the stand-ins are gone


@pytest.mark.timeout(60)
def test_task_waiting_for_itself_is_an_error(tasks):
    from catzilla_tasks import current_task

    def me():
        return current_task().wait(5)

    with pytest.raises(RuntimeError, match="cannot wait\\(\\) for itself"):
        tasks.add_task(me).wait(10)


@pytest.mark.timeout(60)
def test_join_inside_a_task_is_an_error(tasks):
    with pytest.raises(RuntimeError, match="join\\(\\) inside a task"):
        tasks.add_task(tasks.join, 5).wait(10)


@pytest.mark.timeout(60)
def test_async_task_calling_wait_is_told_to_await(make_tasks):
    eng = make_tasks(workers=2, enable_auto_scaling=False)
    gate = threading.Event()

    async def waits_wrongly():
        h = eng.add_task(gate.wait, 30)
        try:
            return h.wait()
        finally:
            gate.set()

    with pytest.raises(RuntimeError, match="await"):
        eng.add_task(waits_wrongly).wait(10)

    async def waits_rightly():
        return await eng.add_task(int, "7")

    assert eng.add_task(waits_rightly).wait(10) == 7


# -- item 12: shutdown finishes work in flight, including the work it creates -------------------


def _shutdown_in_thread(eng, **kw):
    box = {}

    def run():
        try:
            eng.shutdown(**kw)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            box["exc"] = exc

    th = threading.Thread(target=run)
    th.start()
    assert _until(lambda: eng.is_shutdown or not eng.stats()["accepting"])
    return th, box


@pytest.mark.timeout(60)
def test_shutdown_runs_tasks_that_running_tasks_add():
    eng = BackgroundTasks(workers=2, enable_auto_scaling=False)
    gate = threading.Event()
    children = []

    def child(x):
        return x + 1

    def parent():
        gate.wait(30)
        children.append(eng.add_task(child, 41))
        return "parent"

    h = eng.add_task(parent)
    th, box = _shutdown_in_thread(eng, timeout=30)
    with pytest.raises(RuntimeError, match="shut down"):
        eng.add_task(child, 0)  # from outside: refused
    gate.set()
    th.join(30)
    assert not th.is_alive() and "exc" not in box, box
    assert h.wait(0) == "parent"
    assert children and children[0].wait(0) == 42
    with pytest.raises(RuntimeError, match="shut down"):
        eng.add_task(child, 0)


@pytest.mark.timeout(60)
def test_shutdown_finishes_workflows_in_flight():
    from catzilla_tasks import TaskChain, result_of

    eng = BackgroundTasks(workers=2, enable_auto_scaling=False)
    gate = threading.Event()

    def first():
        gate.wait(30)
        return 1

    def plus(x):
        return x + 1

    wf = TaskChain("lifecycle-shutdown", tasks=eng)
    wf.add_task(first, step_name="a")
    wf.add_task(plus, result_of("a"), step_name="b")
    wf.add_task(plus, result_of("b"), step_name="c")
    r = wf.execute()
    th, box = _shutdown_in_thread(eng, timeout=30)
    gate.set()
    th.join(30)
    assert not th.is_alive() and "exc" not in box, box
    assert r.wait(0)["c"] == 3


@pytest.mark.timeout(60)
def test_shutdown_without_waiting_refuses_spawned_work():
    eng = BackgroundTasks(workers=2, enable_auto_scaling=False)
    gate = threading.Event()
    started = threading.Event()
    errors = []

    def parent():
        started.set()
        gate.wait(30)
        try:
            eng.add_task(int)
        except RuntimeError as exc:
            errors.append(exc)

    h = eng.add_task(parent)
    assert started.wait(10)  # running: shutdown(wait_for_completion=False) lets it finish
    th, _ = _shutdown_in_thread(eng, wait_for_completion=False, timeout=30)
    gate.set()
    th.join(30)
    h.wait(0)
    assert len(errors) == 1 and "shut down" in str(errors[0])


# -- item 10: fork ---------------------------------------------------------------------------------


def _double(x):
    return 2 * x


def _in_child(eng, queued):
    """What a forked child sees of an engine its parent made (and whether a new one works)."""
    out = {}
    try:
        eng.add_task(_double, 1)
        out["add_task"] = "accepted"
    except RuntimeError as exc:
        out["add_task"] = str(exc)
    out["workers"] = eng.stats()["workers"]
    out["monitor_workers"] = eng.monitor.get_stats()["worker_metrics"]["total_workers"]
    try:
        queued.wait(5)
        out["wait"] = "returned"
    except RuntimeError as exc:
        out["wait"] = str(exc)
    except TimeoutError:
        out["wait"] = "timed out"
    try:
        eng.join(5)
        out["join"] = "returned"
    except RuntimeError as exc:
        out["join"] = str(exc)
    except TimeoutError:
        out["join"] = "timed out"
    eng.shutdown(timeout=5)  # nothing to stop here: returns at once
    with BackgroundTasks(workers=2, enable_auto_scaling=False) as fresh:
        out["fresh"] = fresh.add_task(_double, 21).wait(10)
    return out


def _check_child_report(out):
    assert "forked" in out["add_task"] and "Create a new BackgroundTasks in the child" in out["add_task"]
    assert "forked" in out["wait"] and "forked" in out["join"]
    assert out["workers"] == 0 and out["monitor_workers"] == 0
    assert out["fresh"] == 42


@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_engine_in_a_forked_child_fails_clearly_and_a_new_one_works():
    import json

    eng = BackgroundTasks(workers=2, enable_auto_scaling=False)
    try:
        eng.pause()
        queued = eng.add_task(_double, 5)  # queued in the parent: the parent runs it, once
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.close(r)
                os.write(w, json.dumps(_in_child(eng, queued)).encode())
                code = 0
            except BaseException as exc:  # noqa: BLE001
                os.write(w, json.dumps({"error": repr(exc)}).encode())
            finally:
                os._exit(code)
        os.close(w)
        deadline = time.monotonic() + 40
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung")
            time.sleep(0.02)
        with os.fdopen(r, "rb") as f:
            out = json.loads(f.read() or b"{}")
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, out
        _check_child_report(out)
        eng.resume()
        assert queued.wait(10) == 10  # the parent's engine is untouched
        assert eng.stats()["succeeded"] == 1  # run once, in the parent
    finally:
        eng.shutdown(timeout=10)


def _mp_child(eng, queued, q):
    try:
        q.put(_in_child(eng, queued))
    except BaseException as exc:  # noqa: BLE001
        q.put({"error": repr(exc)})


@pytest.mark.timeout(90)
def test_multiprocessing_fork_child():
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork start method")
    ctx = mp.get_context("fork")
    eng = BackgroundTasks(workers=2, enable_auto_scaling=False)
    try:
        eng.pause()
        queued = eng.add_task(_double, 5)
        q = ctx.Queue()
        p = ctx.Process(target=_mp_child, args=(eng, queued, q))
        p.start()
        try:
            out = q.get(timeout=40)
        finally:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        assert "error" not in out, out
        _check_child_report(out)
        assert p.exitcode == 0
        eng.resume()
        assert queued.wait(10) == 10
    finally:
        eng.shutdown(timeout=10)


# -- item 9: node memory of threads that only drop handles -----------------------------------------


def _drop_on_short_lived_threads(handles, per_thread):
    chunks = [handles[i : i + per_thread] for i in range(0, len(handles), per_thread)]
    handles.clear()
    threads = []
    for c in chunks:
        t = threading.Thread(target=c.clear)  # the last reference of each node dies here
        threads.append(t)
    del chunks
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)


@pytest.mark.timeout(120)
def test_nodes_freed_by_short_lived_threads_are_not_stranded(make_tasks):
    eng = make_tasks(workers=2, enable_auto_scaling=False, queue_size=100_000)

    def round_():
        hs = [eng.add_task(int) for _ in range(10_000)]
        eng.join(60)
        _drop_on_short_lived_threads(hs, 100)  # 100 threads, 100 nodes each: below a cache batch

    round_()  # warm up: the slab grows to what the workload needs
    slab0 = eng.memory_stats()["slab_bytes"]
    for _ in range(3):
        round_()
    grown = eng.memory_stats()["slab_bytes"] - slab0
    # stranded: 10,000 nodes (~1 MiB) per round, for good
    assert grown <= 256 * 1024, f"the slab grew by {grown} bytes over 3 identical rounds"
    m = eng.memory_stats()
    assert m["nodes_cached"] >= 0 and m["nodes_free"] >= 0
    assert (m["nodes_in_use"] + m["nodes_cached"] + m["nodes_free"]) * m["node_size"] <= m["slab_bytes"]
    perf = eng.monitor.get_stats()["performance_metrics"]
    assert perf["memory_cached_mb"] == pytest.approx(m["nodes_cached"] * m["node_size"] / 2**20, rel=0.5, abs=0.1)
