import asyncio
import threading
import time

import pytest

import catzilla_tasks
from catzilla_tasks import (
    BackgroundTasks,
    QueueFull,
    ShutdownTimeout,
    TaskCancelled,
    TaskConfig,
    TaskPriority,
    TaskStatus,
    task,
)


def test_zero_argument_engine_just_works():
    with BackgroundTasks() as eng:
        assert eng.add_task(pow, 2, 10).wait(5) == 1024
        assert eng.stats()["workers"] >= 1
    assert eng.is_shutdown


def test_add_task_forwards_args_and_every_keyword(tasks):
    def f(a, b, *rest, priority=None, timeout=None, **extra):
        return a, b, rest, priority, timeout, extra

    r = tasks.add_task(f, 1, 2, 3, priority="mine", timeout=9, config="also mine")
    # FastAPI/Starlette semantics: every keyword belongs to the function, even ones that
    # look like options.
    assert r.wait(5) == (1, 2, (3,), "mine", 9, {"config": "also mine"})


def test_add_task_with_dict_kwargs_via_options(tasks):
    r = tasks.options(priority=TaskPriority.HIGH).add_task(dict, a=1, b=2)
    assert r.wait(5) == {"a": 1, "b": 2}
    assert r.priority is TaskPriority.HIGH


def test_non_callable_is_refused_at_the_call_site(tasks):
    with pytest.raises(TypeError, match="needs a callable.*not add_task"):
        tasks.add_task(42)
    with pytest.raises(TypeError, match="needs the function"):
        tasks.add_task()
    assert tasks.stats()["submitted"] == 0


def test_add_after_shutdown_raises_runtime_error():
    eng = BackgroundTasks(workers=2)
    eng.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        eng.add_task(print)
    eng.shutdown()  # idempotent


def test_queue_full_raises_at_once_and_nothing_is_half_enqueued(make_tasks):
    eng = make_tasks(workers=2, queue_size=10)
    eng.pause()
    handles = [eng.add_task(int) for _ in range(10)]
    with pytest.raises(QueueFull, match="queue_size=10"):
        eng.add_task(int)
    s = eng.stats()
    assert s["queued_total"] == 10 and s["rejected"] == 1 and s["submitted"] == 10
    eng.resume()
    eng.join(5)
    assert all(h.status is TaskStatus.SUCCEEDED for h in handles)


def test_blocking_add_waits_for_room(make_tasks):
    eng = make_tasks(workers=2, queue_size=2)
    eng.pause()
    first = [eng.add_task(int), eng.add_task(int)]
    with pytest.raises(QueueFull):
        eng.options(block_timeout=0.05).add_task(int)
    timer = threading.Timer(0.1, eng.resume)  # room appears once the workers run again
    timer.start()
    r = eng.options(block_timeout=10).add_task(int, "7")
    assert r.wait(5) == 7
    assert all(h.wait(5) == 0 for h in first)
    timer.join()


def test_strict_priority_order_single_worker():
    eng = BackgroundTasks(workers=1, min_workers=1)
    try:
        eng.pause()
        order = []
        for prio in (TaskPriority.LOW, TaskPriority.NORMAL, TaskPriority.HIGH, TaskPriority.CRITICAL) * 5:
            eng.options(priority=prio).add_task(order.append, prio)
        eng.resume()
        eng.join(5)
        assert order == sorted(order)
    finally:
        eng.shutdown()


def test_ageing_serves_low_work_under_a_steady_higher_stream():
    eng = BackgroundTasks(workers=1, min_workers=1, aging_ms=50)
    try:
        eng.pause()
        busy = lambda: time.sleep(0.001)  # noqa: E731
        for _ in range(1500):  # ~1.5 s of HIGH work queued
            eng.options(priority=TaskPriority.HIGH).add_task(busy)
        seen = {}

        def low():
            seen["high_left"] = eng.stats()["queued"]["HIGH"]

        r = eng.options(priority=TaskPriority.LOW).add_task(low)
        eng.resume()
        r.wait(10)
        # It ran while plenty of HIGH work was still waiting: ageing, not the end of the stream.
        assert seen["high_left"] > 500
        assert r.get_stats()["queue_wait_ms"] < 1000
    finally:
        eng.shutdown(wait_for_completion=False)


def test_shutdown_runs_every_queued_task():
    eng = BackgroundTasks(workers=4, queue_size=50_000)
    done = []
    eng.pause()
    for i in range(20_000):
        eng.add_task(done.append, i)
    eng.shutdown(wait_for_completion=True, timeout=60)
    assert len(done) == 20_000 and sorted(done) == list(range(20_000))


def test_shutdown_without_waiting_cancels_queued_tasks():
    eng = BackgroundTasks(workers=2)
    eng.pause()
    handles = [eng.add_task(int) for _ in range(100)]
    eng.shutdown(wait_for_completion=False)
    assert {h.status for h in handles} == {TaskStatus.CANCELLED}
    with pytest.raises(TaskCancelled):
        handles[0].wait(1)


def test_shutdown_timeout_says_what_did_not_finish():
    eng = BackgroundTasks(workers=2)
    gate = threading.Event()
    eng.add_task(gate.wait)
    eng.add_task(gate.wait)
    queued = [eng.add_task(int) for _ in range(5)]
    with pytest.raises(ShutdownTimeout) as info:
        eng.shutdown(timeout=0.2)
    assert info.value.running == 2 and info.value.cancelled == 5
    assert "5 queued tasks were cancelled" in str(info.value)
    assert all(h.status is TaskStatus.CANCELLED for h in queued)
    gate.set()


def test_failing_tasks_and_callbacks_never_kill_a_worker(tasks, caplog):
    def boom(i):
        raise RuntimeError(f"boom {i}")

    for i in range(200):
        tasks.add_task(boom, i)  # handles dropped: failures are logged
    r = tasks.add_task(boom, -1)
    r.add_callback(lambda v: 1 / 0)
    ok = tasks.add_task(int, "5")
    ok.add_callback(lambda v: 1 / 0)  # raising callback: reported, not raised
    tasks.join(10)
    with pytest.raises(RuntimeError, match="boom -1"):
        r.wait(1)
    assert ok.wait(1) == 5
    # all four workers still run tasks at the same time
    barrier = threading.Barrier(4, timeout=5)
    waits = [tasks.add_task(barrier.wait) for _ in range(4)]
    assert sorted(w.wait(10) for w in waits) == [0, 1, 2, 3]
    assert tasks.stats()["failed"] == 201
    assert any("boom 7" in str(rec.exc_info[1]) for rec in caplog.records if rec.exc_info)


def test_async_tasks_run_concurrently_on_the_engine_loop(tasks):
    n = 200
    state = {"count": 0}
    gate = asyncio.Event()

    async def job(i):
        state["count"] += 1
        if state["count"] == n:
            gate.set()
        await gate.wait()  # only returns if all n are in flight at once
        await asyncio.sleep(0)
        return i, threading.current_thread().name

    handles = [tasks.add_task(job, i) for i in range(n)]
    results = [h.wait(10) for h in handles]
    assert [r[0] for r in results] == list(range(n))
    assert {r[1] for r in results} == {f"{tasks.name}-asyncio"}
    assert handles[0].get_stats()["is_async"] is True


def test_async_task_failure_and_value(tasks):
    async def bad():
        await asyncio.sleep(0)
        raise KeyError("nope")

    with pytest.raises(KeyError):
        tasks.add_task(bad).wait(5)
    s = tasks.stats()
    assert s["failed"] == 1 and s["running"] == 0


def test_decorators_attach_config(tasks):
    @tasks.task(priority=TaskPriority.CRITICAL)
    def urgent(x):
        return x * 2

    @task(priority="low")
    def chore():
        return "done"

    @tasks.task
    def plain():
        return 1

    assert urgent(2) == 4  # still a plain function
    r = tasks.add_task(urgent, 21)
    assert r.wait(5) == 42 and r.priority is TaskPriority.CRITICAL
    assert tasks.add_task(chore).priority is TaskPriority.LOW
    assert tasks.add_task(plain).priority is TaskPriority.NORMAL
    assert f"{urgent.__module__}.{urgent.__qualname__}" in tasks.registered_tasks
    # per-call override wins over the decorator
    assert tasks.options(priority=TaskPriority.LOW).add_task(urgent, 1).priority is TaskPriority.LOW


def test_bound_methods_and_callable_objects_keep_their_config(tasks):
    class Job:
        @task(priority=TaskPriority.HIGH)
        def run(self):
            return "m"

        def __call__(self):
            return "c"

    job = Job()
    assert tasks.add_task(job.run).priority is TaskPriority.HIGH
    callable_job = task(priority=TaskPriority.LOW)(Job())
    r = tasks.add_task(callable_job)
    assert r.priority is TaskPriority.LOW and r.wait(5) == "c"


def test_constructor_validation():
    with pytest.raises(ValueError, match="^workers"):
        BackgroundTasks(workers=0)
    with pytest.raises(ValueError, match="min_workers"):
        BackgroundTasks(workers=2, min_workers=3, max_workers=4)
    for bad in (0, -1, float("nan"), "10", True):
        with pytest.raises(ValueError, match="memory_pool_mb"):
            BackgroundTasks(memory_pool_mb=bad)


def test_pause_resume_and_stats(tasks):
    tasks.pause()
    hs = [tasks.options(priority=p).add_task(int) for p in TaskPriority for _ in range(3)]
    s = tasks.stats()
    assert s["paused"] and s["queued"] == {"CRITICAL": 3, "HIGH": 3, "NORMAL": 3, "LOW": 3}
    assert s["queued_total"] == 12
    tasks.resume()
    tasks.join(5)
    s = tasks.stats()
    assert s["succeeded"] == 12 and s["queued_total"] == 0 and s["running"] == 0
    assert all(h.is_ready() for h in hs)


def test_join_timeout(tasks):
    gate = threading.Event()
    tasks.add_task(gate.wait)
    with pytest.raises(TimeoutError, match="1 running"):
        tasks.join(0.05)
    gate.set()
    tasks.join(5)


def test_idle_engine_costs_no_cpu():
    from catzilla_tasks import compiler

    # compiled tasks of earlier tests may still be compiling in the background: not the engine
    assert compiler.wait_for_background(120)
    eng = BackgroundTasks(workers=16, min_workers=2)
    try:
        eng.add_task(int).wait(5)  # workers started and gone idle
        c0, t0 = time.process_time(), time.monotonic()
        time.sleep(3.0)  # the measurement window
        used = time.process_time() - c0
        elapsed = time.monotonic() - t0
        assert used / elapsed < 0.01, f"idle engine used {used:.4f} s CPU in {elapsed:.2f} s"
    finally:
        eng.shutdown()


def test_public_surface():
    assert sorted(catzilla_tasks.__all__) == sorted(
        [
            "BackgroundTasks",
            "CatzillaTasksError",
            "QueueFull",
            "ShutdownTimeout",
            "TaskCancelled",
            "TaskConfig",
            "TaskFuture",
            "TaskPriority",
            "TaskResult",
            "TaskStatus",
            "TaskTimeout",
            "MemoryLimitExceeded",
            "WorkerLost",
            "current_task",
            "task",
            "TaskChain",
            "WorkflowError",
            "call",
            "chain",
            "chord",
            "group",
            "result_of",
            "results_of",
            "workflow",
            "CompileError",
            "TaskMonitor",
            "AutoScaler",
        ]
    )
    for name in catzilla_tasks.__all__:
        obj = getattr(catzilla_tasks, name)
        assert obj.__doc__, f"{name} has no docstring"


def test_options_lay_fields_over_the_decorator_config(tasks):
    @task(priority=TaskPriority.HIGH, retry_backoff="linear")
    def job():
        return "ok"

    r = tasks.options(block_timeout=1).add_task(job)
    assert r.priority is TaskPriority.HIGH
    with pytest.raises(TypeError, match="unknown option"):
        tasks.options(prio=1)
    with pytest.raises(ValueError, match="^priority"):
        tasks.options(priority=9)
    assert tasks.options(config=TaskConfig(priority="low")).add_task(job).priority is TaskPriority.LOW
