"""Delays, retries with back-off, timeouts and cancellation (the engine's C timer)."""

import asyncio
import datetime
import threading
import time

import pytest

from catzilla_tasks import BackgroundTasks, TaskCancelled, TaskConfig, TaskStatus, task
from catzilla_tasks.errors import TaskTimeout


def test_delay_runs_after_the_delay_and_is_scheduled_meanwhile(tasks):
    t_submit = time.monotonic()  # (before the call: read after it, a test thread preempted in
    # between took it late, and the task seemed to run early: 0.1475 s under ASan and load)
    r = tasks.options(delay_ms=150).add_task(time.monotonic)
    assert r.status is TaskStatus.SCHEDULED
    assert tasks.stats()["scheduled"] == 1
    ran_at = r.wait(5)
    assert ran_at - t_submit >= 0.149
    s = r.get_stats()
    assert s["queue_wait_ms"] >= 149 and s["status"] is TaskStatus.SUCCEEDED
    assert tasks.stats()["scheduled"] == 0


def test_eta(tasks):
    eta = datetime.datetime.now(datetime.UTC) + datetime.timedelta(milliseconds=120)
    r = tasks.options(eta=eta).add_task(lambda: datetime.datetime.now(datetime.UTC))
    assert r.wait(5) >= eta - datetime.timedelta(milliseconds=2)
    with pytest.raises(TypeError, match="eta or delay_ms"):
        tasks.options(eta=eta, delay_ms=5)


def test_delays_fire_in_due_order(tasks):
    order = []
    handles = [tasks.options(delay_ms=d).add_task(order.append, d) for d in (90, 30, 60, 0, 120)]
    for h in handles:
        h.wait(5)
    assert order == [0, 30, 60, 90, 120]


def test_cancel_a_delayed_task_frees_it_at_once(tasks):
    ran = []
    r = tasks.options(delay_ms=60_000).add_task(ran.append, 1)
    assert r.cancel() is True
    assert r.status is TaskStatus.CANCELLED
    tasks.join(5)  # does not wait the minute: the cancelled task left the timer
    assert ran == [] and tasks.stats()["scheduled"] == 0
    with pytest.raises(TaskCancelled):
        r.wait(1)


def test_shutdown_runs_due_delayed_tasks_and_cancels_the_rest_on_timeout():
    eng = BackgroundTasks(workers=2)
    soon = eng.options(delay_ms=50).add_task(int, "1")
    late = eng.options(delay_ms=60_000).add_task(int, "2")
    with pytest.raises(TimeoutError):
        eng.shutdown(timeout=0.5)
    assert soon.wait(1) == 1 and late.status is TaskStatus.CANCELLED


def test_retries_with_exponential_backoff_then_success(tasks):
    calls = []

    @task(max_retries=3, retry_base_ms=20, retry_jitter=False)
    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError(f"attempt {len(calls)}")
        return "ok"

    r = tasks.add_task(flaky)
    assert r.wait(5) == "ok"
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert 0.019 <= gaps[0] < 0.2 and 0.039 <= gaps[1] < 0.3  # 20 ms, then 40 ms
    s = r.get_stats()
    assert s["attempts"] == 3
    assert [h["attempt"] for h in s["history"]] == [1, 2]
    assert all(isinstance(h["error"], ConnectionError) for h in s["history"])
    assert tasks.stats()["retried"] == 2


@pytest.mark.parametrize(
    "backoff, expected_ms",
    [("exponential", [10, 20, 40, 80]), ("linear", [10, 20, 30, 40]), ("fixed", [10, 10, 10, 10])],
)
def test_backoff_schedules(tasks, backoff, expected_ms):
    calls = []

    @task(max_retries=4, retry_backoff=backoff, retry_base_ms=10, retry_jitter=False)
    def always_fails():
        calls.append(time.monotonic())
        raise ValueError("no")

    with pytest.raises(ValueError):
        tasks.add_task(always_fails).wait(5)
    gaps_ms = [(b - a) * 1000 for a, b in zip(calls, calls[1:], strict=False)]
    assert len(gaps_ms) == 4
    for got, want in zip(gaps_ms, expected_ms, strict=False):
        assert want - 1 <= got <= want + 25, (backoff, gaps_ms)


def test_backoff_cap_and_full_jitter_bounds(tasks):
    calls = []

    @task(max_retries=6, retry_base_ms=10, retry_max_ms=30)  # exponential: full jitter by default
    def fails():
        calls.append(time.monotonic())
        raise ValueError

    with pytest.raises(ValueError):
        tasks.add_task(fails).wait(5)
    gaps_ms = [(b - a) * 1000 for a, b in zip(calls, calls[1:], strict=False)]
    caps = [10, 20, 30, 30, 30, 30]
    for got, cap in zip(gaps_ms, caps, strict=False):
        assert 0 <= got <= cap + 25
    assert TaskConfig(retry_backoff="linear").retry_jitter is None


def test_retry_on_filters_exceptions(tasks):
    calls = []

    @task(max_retries=5, retry_base_ms=1, retry_on=(ConnectionError,))
    def wrong_kind():
        calls.append(1)
        raise KeyError("not retried")

    with pytest.raises(KeyError):
        tasks.add_task(wrong_kind).wait(5)
    assert len(calls) == 1


def test_callback_order(tasks):
    events = []
    done = threading.Event()

    @task(
        max_retries=2,
        retry_base_ms=1,
        on_retry=lambda n: events.append(("retry", n)),
        on_failure=lambda e: (events.append(("failure", str(e))), done.set()),
        on_success=lambda v: events.append(("success", v)),
    )
    def fails():
        raise RuntimeError("boom")

    r = tasks.add_task(fails)
    r._on_done(lambda h: events.append(("done", h.status.name)))
    with pytest.raises(RuntimeError):
        r.wait(5)
    assert done.wait(5)
    tasks.join(5)
    assert events == [("retry", 1), ("retry", 2), ("failure", "boom"), ("done", "FAILED")]

    ok_events = []
    t2 = task(on_success=ok_events.append)(lambda: 7)
    assert tasks.add_task(t2).wait(5) == 7
    assert ok_events == [7]


def test_timeout_interrupts_a_busy_python_task_and_the_pool_keeps_working(tasks):
    @task(timeout_ms=100)
    def spin():
        while True:
            pass

    r = tasks.add_task(spin)
    with pytest.raises(TaskTimeout, match="timeout_ms=100"):
        r.wait(5)
    assert r.status is TaskStatus.TIMED_OUT
    s = r.get_stats()
    assert 95 <= s["execution_time_ms"] < 1000
    assert tasks.stats()["timed_out"] == 1
    # the worker that was interrupted runs tasks normally afterwards
    assert [tasks.add_task(abs, -i).wait(5) for i in range(50)] == list(range(50))
    barrier = threading.Barrier(4, timeout=5)
    waits = [tasks.add_task(barrier.wait) for _ in range(4)]
    assert sorted(w.wait(10) for w in waits) == [0, 1, 2, 3]  # all four workers alive


def test_timeout_cancels_an_async_task(tasks):
    @task(timeout_ms=100)
    async def sleeper():
        await asyncio.sleep(100)

    r = tasks.add_task(sleeper)
    with pytest.raises(TaskTimeout):
        r.wait(5)
    assert r.status is TaskStatus.TIMED_OUT
    assert tasks.add_task(abs, -3).wait(5) == 3


def test_timeouts_are_retried_only_when_asked(tasks):
    calls = []

    @task(timeout_ms=50, max_retries=2, retry_base_ms=1, retry_on_timeout=True)
    def slow_then_fast():
        calls.append(1)
        if len(calls) < 2:
            while True:
                pass
        return "second try"

    assert tasks.add_task(slow_then_fast).wait(5) == "second try"

    calls2 = []

    @task(timeout_ms=50, max_retries=2, retry_base_ms=1)
    def slow():
        calls2.append(1)
        while True:
            pass

    with pytest.raises(TaskTimeout):
        tasks.add_task(slow).wait(5)
    assert len(calls2) == 1


def test_a_task_stuck_in_c_code_is_reported_and_its_worker_replaced(make_tasks, caplog):
    eng = make_tasks(workers=2, min_workers=1, enable_auto_scaling=False)  # the replacement alone adds room
    gate = threading.Event()

    @task(timeout_ms=50)
    def stuck_in_c():
        gate.wait()  # a C-level wait: the injected TaskTimeout cannot land until it returns
        return "finished"

    r = eng.add_task(stuck_in_c)
    # capacity stays: two more blocking tasks still run side by side while the first is stuck
    barrier = threading.Barrier(2, timeout=5)
    waits = [eng.add_task(barrier.wait) for _ in range(2)]
    assert sorted(w.wait(10) for w in waits) == [0, 1]
    assert eng.stats()["replaced"] == 1
    said = "cannot be interrupted"
    assert any(said in str(rec.args) or said in rec.getMessage() for rec in caplog.records)
    gate.set()
    with pytest.raises(TaskTimeout):
        r.wait(5)  # the pending TaskTimeout lands as soon as the C call returns
    assert eng.stats()["workers"] == 2
    assert [eng.add_task(abs, -i).wait(5) for i in range(20)] == list(range(20))


def test_memory_limit_needs_process_isolation():
    with pytest.raises(ValueError, match="isolation='process'"):
        TaskConfig(memory_limit_mb=100)
    assert TaskConfig(memory_limit_mb=100, isolation="process").memory_limit_mb == 100


def test_periodic_every_fires_on_schedule(tasks):
    stamps = []
    enough = threading.Event()

    @tasks.periodic(every=datetime.timedelta(milliseconds=40))
    def tick():
        stamps.append(time.monotonic())
        if len(stamps) == 6:
            enough.set()

    assert enough.wait(5)
    tick.periodic.cancel()
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert all(0.025 <= g <= 0.12 for g in gaps), gaps
    assert sum(gaps) / len(gaps) == pytest.approx(0.040, abs=0.012)
    tasks.join(5)  # periodic ticks are not tasks: join returns


def test_periodic_does_not_overlap_itself(tasks):
    active = [0]
    peak = [0]
    runs = []
    enough = threading.Event()

    @tasks.periodic(every=0.02, first_run_now=True)
    def slow():
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        time.sleep(0.07)  # longer than the period
        active[0] -= 1
        runs.append(1)
        if len(runs) == 3:
            enough.set()

    assert enough.wait(5)
    slow.periodic.cancel()
    assert peak[0] == 1
    assert slow.periodic.skipped >= 3


def test_periodic_skips_missed_runs():
    from catzilla_tasks.periodic import PeriodicTask

    class FakeEngine:
        is_shutdown = False

        def _call_later(self, delay, fn):
            return True

    p = PeriodicTask(FakeEngine(), print, every=1.0)
    t0 = p._due_mono  # the first run's due time
    # its tick comes 4.5 periods late (the process was paused): the runs due at t0+1..t0+4
    # are skipped, not piled up, and the next is the next slot on the grid, t0+5
    delay = p.next_delay(t0 + 4.5, datetime.datetime.now(datetime.UTC))
    assert delay == pytest.approx(0.5) and p.missed == 4


def test_periodic_cron_schedule():
    from catzilla_tasks.periodic import PeriodicTask

    class FakeEngine:
        is_shutdown = False

        def _call_later(self, delay, fn):
            return True

    p = PeriodicTask(FakeEngine(), print, cron="*/5 * * * *")
    now = datetime.datetime(2026, 1, 1, 12, 3, 30, tzinfo=datetime.UTC)
    assert p.next_delay(0.0, now) == pytest.approx(90.0)
    with pytest.raises(ValueError, match="not a valid cron"):
        PeriodicTask(FakeEngine(), print, cron="61 * * * *")
    with pytest.raises(ValueError, match="exactly one"):
        PeriodicTask(FakeEngine(), print)


def test_cancel_a_running_async_task(tasks):
    started = threading.Event()

    async def forever():
        started.set()
        await asyncio.sleep(100)

    r = tasks.add_task(forever)
    assert started.wait(5)
    assert r.cancel() is True
    with pytest.raises(TaskCancelled):
        r.wait(5)
    assert r.status is TaskStatus.CANCELLED


def test_cancel_a_running_sync_task_is_cooperative(tasks):
    from catzilla_tasks import current_task

    started = threading.Event()

    def polite():
        me = current_task()
        started.set()
        while not me.cancel_requested:
            time.sleep(0.001)
        return "stopped early"

    r = tasks.add_task(polite)
    assert started.wait(5)
    assert r.cancel() is False  # not stopped by force: asked
    assert r.cancel_requested
    assert r.wait(5) == "stopped early"
    assert current_task() is None


def test_current_task_in_async_task(tasks):
    from catzilla_tasks import current_task

    async def who():
        return current_task().task_id

    r = tasks.add_task(who)
    assert r.wait(5) == r.task_id


def test_process_isolated_tasks_through_the_engine(tasks):
    import isolation_helpers as h

    from catzilla_tasks import MemoryLimitExceeded

    r = tasks.options(isolation="process").add_task(pow, 3, 4)
    assert r.wait(30) == 81
    with pytest.raises(TypeError, match="pickle"):
        tasks.options(isolation="process").add_task(lambda: 1)
    assert tasks.stats()["submitted"] == 1  # the refused one was never queued
    hog = tasks.options(isolation="process", memory_limit_mb=100).add_task(h.allocate, 400)
    with pytest.raises(MemoryLimitExceeded):
        hog.wait(60)
    spin = tasks.options(isolation="process", timeout_ms=300).add_task(h.spin_forever)
    with pytest.raises(TaskTimeout):
        spin.wait(30)
    assert spin.status is TaskStatus.TIMED_OUT
    assert tasks.options(isolation="process").add_task(pow, 2, 5).wait(30) == 32
