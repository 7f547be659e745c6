"""Engine lifecycle: adding and retiring workers, handles, timeouts, cancellation, times.

Each test here was written against a defect of issue 12 and failed before its fix."""

import subprocess
import sys
import textwrap

import pytest

import catzilla_tasks
from catzilla_tasks import BackgroundTasks, TaskResult, TaskStatus


def _run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (a hang must fail this test, not the whole run)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout
    )


# ---- 1: adding a worker while a retired one is leaving must not deadlock -------------------------


@pytest.mark.timeout(120)
def test_adding_a_worker_while_a_retired_one_leaves_does_not_hang():
    # The retired worker leaves its loop and then needs the GIL to drop its thread state; the
    # caller of _add_worker holds the GIL the whole time (a huge switch interval keeps it), so
    # a join of that thread under the GIL never returns.
    code = """
        import sys, time
        from catzilla_tasks import BackgroundTasks
        eng = BackgroundTasks(workers=3, min_workers=1, enable_auto_scaling=False)
        eng.add_task(int).wait(10)           # every worker has taken the GIL once
        sys.setswitchinterval(1000)
        for _ in range(20):
            assert eng._retire_worker()
            t0 = time.monotonic()
            while time.monotonic() - t0 < 0.05:   # hold the GIL while the worker leaves
                pass
            assert eng._add_worker()
        sys.setswitchinterval(0.005)
        assert eng.add_task(pow, 2, 5).wait(10) == 32
        assert eng._live_workers() == 3
        eng.shutdown(timeout=10)
        print("ok")
    """
    try:
        out = _run_python(code, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("adding a worker deadlocked (the process hung)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ---- 2: more handles on one task than a 16-bit count holds ---------------------------------------


@pytest.mark.timeout(300)
def test_more_handles_than_a_16_bit_count_never_free_the_node(tasks):
    first = tasks.add_task(str, "first")
    assert first.wait(10) == "first"
    tid = first.task_id
    many = [TaskResult(tid) for _ in range(65_536)]  # 65,537 references with `first`
    del many[-1]  # dropping one must not free the node the others still use
    # a new task would reuse a freed node: the old handles must still read their own task
    other = [tasks.add_task(str, "other") for _ in range(64)]
    for h in other:
        assert h.wait(10) == "other"
    assert first.task_id == tid and first.wait(0) == "first"
    assert many[0].task_id == tid and many[-1].wait(0) == "first"
    del many
    assert first.wait(0) == "first"


# ---- 4: every path that ends a task runs its callbacks -------------------------------------------


def _watched(eng, n, **options):
    """n queued tasks, each with a done-callback and a TaskFuture.then chain."""
    from catzilla_tasks import TaskFuture

    done = []
    handles, chains = [], []
    for i in range(n):
        r = (eng.options(**options) if options else eng).add_task(int, i)
        r._on_done(lambda h: done.append(h.status))
        chains.append(TaskFuture(r).then(lambda v: v))
        handles.append(r)
    return handles, chains, done


def _assert_all_released(handles, chains, done):
    assert len(done) == len(handles)
    assert set(done) == {TaskStatus.CANCELLED}
    for c in chains:
        with pytest.raises(catzilla_tasks.TaskCancelled):
            c.wait(5)  # the chain learnt of it: it does not wait forever


@pytest.mark.timeout(60)
def test_shutdown_without_waiting_runs_the_callbacks_of_what_it_cancels():
    eng = BackgroundTasks(workers=2, enable_auto_scaling=False)
    eng.pause()
    watched = _watched(eng, 50)
    eng.shutdown(wait_for_completion=False, timeout=10)
    _assert_all_released(*watched)


@pytest.mark.timeout(60)
def test_delayed_tasks_cancelled_at_shutdown_run_their_callbacks():
    eng = BackgroundTasks(workers=2, enable_auto_scaling=False)
    watched = _watched(eng, 20, delay_ms=600_000)
    eng.shutdown(wait_for_completion=False, timeout=10)
    _assert_all_released(*watched)


@pytest.mark.timeout(60)
def test_a_timed_out_shutdown_runs_the_callbacks_of_what_it_cancels():
    import threading

    eng = BackgroundTasks(workers=1, min_workers=1, enable_auto_scaling=False)
    gate, started = threading.Event(), threading.Event()
    eng.add_task(lambda: (started.set(), gate.wait(30)))
    assert started.wait(10)
    watched = _watched(eng, 30)
    try:
        with pytest.raises(catzilla_tasks.ShutdownTimeout):
            eng.shutdown(timeout=0.2)
        _assert_all_released(*watched)
    finally:
        gate.set()
        eng.join(10)


# ---- 3: a timeout never goes off after its task returned -----------------------------------------


@pytest.mark.timeout(60)
def test_a_timeout_never_fires_inside_the_on_success_hook():
    from catzilla_tasks import TaskConfig

    hook_done, hook_errors = [], []

    def on_success(value):
        try:
            time_sleep(0.4)  # the task's timeout (50 ms) passes while the hook runs
            hook_done.append(value)
        except BaseException as exc:  # a TaskTimeout raised here was meant for the task
            hook_errors.append(exc)
            raise

    eng = BackgroundTasks(workers=1, min_workers=1, enable_auto_scaling=False)
    try:
        r = eng.options(config=TaskConfig(timeout_ms=50, on_success=on_success)).add_task(int, 7)
        assert r.wait(10) == 7
        eng.join(10)
        assert hook_errors == [] and hook_done == [7]
        assert r.status is TaskStatus.SUCCEEDED
    finally:
        eng.shutdown(timeout=10)


@pytest.mark.timeout(60)
def test_a_timeout_never_fires_inside_the_next_task_on_that_worker():
    import time

    from catzilla_tasks import TaskConfig

    eng = BackgroundTasks(workers=1, min_workers=1, enable_auto_scaling=False)
    try:
        # the hook is C code (no Python instruction runs in it): a TaskTimeout injected while
        # it runs would go off at the next instruction of this worker, in the next task on
        # it. (The hook returns before the stuck-worker check, 100 ms past the timeout, would
        # replace the worker.)
        cfg = TaskConfig(timeout_ms=20, on_success=time.sleep)
        first = eng.options(config=cfg).add_task(float, 0.06)
        nxt = [eng.add_task(lambda i=i: [i] * 3) for i in range(5)]
        assert first.wait(10) == 0.06
        assert [h.wait(10) for h in nxt] == [[i] * 3 for i in range(5)]
    finally:
        eng.shutdown(timeout=10)


def time_sleep(s):
    import time

    time.sleep(s)


# ---- 6: huge, infinite and NaN times -------------------------------------------------------------

INF, NAN = float("inf"), float("nan")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("timeout", [1e11, 1e300, INF])
def test_a_huge_or_infinite_wait_waits(tasks, timeout):
    import threading

    gate = threading.Event()
    r = tasks.add_task(gate.wait, 30)
    got, returned = [], threading.Event()

    def waiter():
        try:
            got.append(r.wait(timeout))
        except BaseException as exc:
            got.append(exc)
        returned.set()

    th = threading.Thread(target=waiter)
    th.start()
    try:
        assert not returned.wait(0.3), f"wait({timeout}) returned at once: {got}"
    finally:
        gate.set()
    assert returned.wait(10)
    th.join()
    assert got == [True]


@pytest.mark.timeout(60)
def test_nan_times_are_refused_at_the_call_site(tasks):
    from catzilla_tasks import TaskConfig

    r = tasks.add_task(int)
    for call in (lambda: r.wait(NAN), lambda: tasks.join(NAN)):
        with pytest.raises(ValueError, match="NaN"):
            call()
    for field in ("delay_ms", "timeout_ms", "retry_base_ms", "retry_max_ms"):
        with pytest.raises(ValueError, match=field):
            TaskConfig(**{field: NAN})
        with pytest.raises(ValueError, match=field):
            tasks.options(**{field: NAN})
    with pytest.raises(ValueError, match="block_timeout"):
        tasks.options(block_timeout=NAN)
    with pytest.raises(ValueError, match="NaN"):
        tasks.shutdown(timeout=NAN)
    assert not tasks.is_shutdown


@pytest.mark.timeout(60)
def test_an_infinite_shutdown_runs_everything_queued():
    import threading

    eng = BackgroundTasks(workers=1, min_workers=1, enable_auto_scaling=False)
    gate = threading.Event()
    first = eng.add_task(gate.wait, 30)
    rest = [eng.add_task(int, i) for i in range(20)]
    threading.Timer(0.2, gate.set).start()
    eng.shutdown(timeout=INF)
    assert first.wait(0) is True
    assert [h.wait(0) for h in rest] == list(range(20))


@pytest.mark.timeout(60)
def test_delays_past_what_the_engine_can_represent_are_refused(tasks):
    import datetime

    from catzilla_tasks import TaskConfig

    for delay in (1e13, INF):
        with pytest.raises(ValueError, match="delay_ms"):
            TaskConfig(delay_ms=delay)
        with pytest.raises(ValueError, match="delay_ms"):
            tasks.options(delay_ms=delay).add_task(int)
    with pytest.raises(ValueError, match="eta"):
        tasks.options(eta=datetime.datetime(9999, 1, 1)).add_task(int)
    assert tasks.stats()["submitted"] == 0
    # the longest delay accepted is far, not run at once
    r = tasks.options(delay_ms=3e12).add_task(int)  # ~95 years
    assert r.status is TaskStatus.SCHEDULED
    assert r.cancel()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("timeout_ms", [INF, 1e300])
def test_an_infinite_or_huge_timeout_is_no_limit(tasks, timeout_ms):
    from catzilla_tasks import TaskConfig

    cfg = TaskConfig(timeout_ms=timeout_ms)
    assert cfg.timeout_ms is None
    r = tasks.options(timeout_ms=timeout_ms).add_task(time_sleep, 0.05)
    assert r.wait(10) is None and r.status is TaskStatus.SUCCEEDED
    assert tasks.stats()["timed_out"] == 0


# ---- 5: a failure nobody reads is logged, once ------------------------------------------------


class _Failures:
    """Records of 'task ... failed' logged by the engine; wait_for(n) waits for n of them."""

    def __init__(self):
        import logging
        import threading

        self.records = []
        self.cond = threading.Condition()
        outer = self

        class H(logging.Handler):
            def emit(self, record):
                if "failed" in record.getMessage():
                    with outer.cond:
                        outer.records.append(record)
                        outer.cond.notify_all()

        self.handler = H(level=logging.ERROR)

    def __enter__(self):
        import logging

        logging.getLogger("catzilla_tasks").addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        import logging

        logging.getLogger("catzilla_tasks").removeHandler(self.handler)

    def wait_for(self, n, timeout=10):
        with self.cond:
            return self.cond.wait_for(lambda: len(self.records) >= n, timeout)

    def messages(self):
        # the exception's message: from the record's exception, or the last line of its text
        return [str(r.exc_info[1]) if r.exc_info else r.getMessage().rsplit(": ", 1)[-1] for r in self.records]


def _boom(tag):
    raise ValueError(f"boom {tag}")


@pytest.mark.timeout(60)
def test_a_failure_with_a_pending_timeout_is_logged_at_once(tasks):
    with _Failures() as f:
        tasks.options(timeout_ms=600_000).add_task(_boom, "timeout")
        assert f.wait_for(1), "a failure nobody reads was not logged (its timeout entry kept it)"
        tasks.join(10)
    assert f.messages() == ["boom timeout"]


@pytest.mark.timeout(60)
def test_a_failure_with_only_a_success_callback_is_logged(tasks):
    with _Failures() as f:
        r = tasks.add_task(_boom, "callback")
        r.add_callback(print)  # called on success only: it never sees the failure
        del r
        assert f.wait_for(1), "a failure with only a success callback was not logged"
        tasks.join(10)
    assert f.messages() == ["boom callback"]


@pytest.mark.timeout(60)
def test_a_failure_is_logged_once_when_its_unread_handles_go(tasks):
    import gc

    with _Failures() as f:
        kept = tasks.add_task(_boom, "kept")
        read = tasks.add_task(_boom, "read")
        with pytest.raises(ValueError):
            read.wait(10)
        twin = TaskResult(kept.task_id)
        tasks.join(10)
        assert kept.status is TaskStatus.FAILED  # (reading the status is not reading the outcome)
        assert f.records == []  # handles can still read them
        del kept
        assert f.records == []
        del twin  # the last handle of an outcome nobody read
        assert f.wait_for(1)
        del read
        gc.collect()
        tasks.join(10)
    assert f.messages() == ["boom kept"]


# ---- 8: cycles through task records are collected ------------------------------------------------


class _Marker:
    """Something a frame holds: alive as long as that frame is."""


def _nodes():
    import gc

    gc.collect()
    return catzilla_tasks._engine.memory_stats()["nodes_in_use"]


@pytest.fixture
def quiet_engine():
    eng = BackgroundTasks(workers=2, enable_auto_scaling=False)
    try:
        yield eng
    finally:
        eng.shutdown(timeout=10)


@pytest.mark.timeout(120)
def test_a_failed_task_caught_by_a_frame_with_two_handles_is_collected(quiet_engine):
    import gc
    import weakref

    def caught(eng):
        marker = _Marker()
        r = eng.add_task(_boom, "two handles")
        twin = TaskResult(r.task_id)
        try:
            r.wait(10)
        except ValueError:
            pass
        assert twin.status is TaskStatus.FAILED
        return weakref.ref(marker)

    before = _nodes()
    markers = [caught(quiet_engine) for _ in range(50)]
    quiet_engine.join(10)
    gc.collect()
    assert sum(m() is not None for m in markers) == 0, "frames kept alive by a cycle through the task"
    assert _nodes() == before


@pytest.mark.timeout(120)
def test_a_failed_task_with_a_then_chain_leaves_no_record(quiet_engine):
    from catzilla_tasks import TaskFuture

    def chained(eng):
        f = TaskFuture(eng.add_task(_boom, "chain")).then(lambda v: v).then(str)
        with pytest.raises(ValueError):
            f.wait(10)

    before = _nodes()
    for _ in range(20):
        chained(quiet_engine)
    quiet_engine.join(10)
    assert _nodes() == before


@pytest.mark.timeout(120)
def test_a_retried_task_whose_traceback_holds_its_handle_is_collected(quiet_engine):
    import gc
    import weakref

    from catzilla_tasks import current_task

    markers = []

    def flaky():
        me = current_task()  # the frame holds the task's own handle
        marker = _Marker()
        markers.append(weakref.ref(marker))
        raise ConnectionError(me.task_id)

    before = _nodes()
    rs = [quiet_engine.options(max_retries=2, retry_base_ms=1).add_task(flaky) for _ in range(10)]
    for r in rs:
        with pytest.raises(ConnectionError):
            r.wait(10)
    assert len(rs[0].get_stats()["history"]) == 3
    del r, rs
    quiet_engine.join(10)
    gc.collect()
    assert sum(m() is not None for m in markers) == 0
    assert _nodes() == before


@pytest.mark.timeout(120)
def test_an_unread_failure_freed_by_the_cycle_collector_is_logged_without_crashing(quiet_engine):
    # The task's own handle sits in a frame of its exception's traceback, and nobody read the
    # failure: its last owner lets go inside a collection, where the traceback may already be
    # torn apart. Found by the state machine (a segfault in the log call).
    import gc

    from catzilla_tasks import current_task

    def fails_holding_itself(i):
        me = current_task()
        raise ValueError(f"self {i} {me is not None}")

    n = 40
    with _Failures() as f:
        rs = [quiet_engine.add_task(fails_holding_itself, i) for i in range(n)]
        quiet_engine.join(10)
        assert all(r.status is TaskStatus.FAILED for r in rs)
        del rs
        for _ in range(3):
            gc.collect()
        assert len(f.records) == n  # each logged once, as text (its traceback, or a summary)
        assert all(not r.exc_info and "ValueError" in r.getMessage() for r in f.records)


# ---- the shared handle with ids registered wherever they leave the engine (merge of i12a/i12b) ---


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shown_by", ["repr", "get_stats", "wait_timeout"])
def test_an_id_shown_before_task_id_was_read_still_finds_the_shared_handle(tasks, shown_by):
    # The id is registered as it leaves the engine (repr, get_stats(), an error message) with no
    # shared handle yet; reading task_id later makes that handle the shared one.
    import threading

    gate = threading.Event()
    r = tasks.add_task(gate.wait, 30)
    if shown_by == "repr":
        repr(r)
    elif shown_by == "get_stats":
        r.get_stats()
    else:
        with pytest.raises(TimeoutError):
            r.wait(0.01)
    tid = r.task_id
    try:
        assert TaskResult(tid) is r
    finally:
        gate.set()
    assert r.wait(10) is True and TaskResult(tid) is r


@pytest.mark.timeout(60)
def test_an_id_from_the_failures_list_gives_one_shared_handle(tasks):
    # A failure registers its id for the monitor before any handle read it; the first
    # TaskResult(task_id) becomes the shared handle, later ones return that same object.
    def boom():
        raise KeyError("x")

    r = tasks.add_task(boom)
    with pytest.raises(KeyError):
        r.wait(10)
    tid = tasks.monitor.get_stats()["recent_failures"][0]["task_id"]
    h = TaskResult(tid)
    assert h is r or h.task_id == tid
    assert TaskResult(tid) is h
