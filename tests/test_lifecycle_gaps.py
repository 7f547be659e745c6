"""Issue 12, the gaps left: tasks waiting on tasks (help while waiting), a task's timeout
during its own wait, the wait() timeout message, and cycles through a workflow step.

Each test failed before its fix."""

import gc
import threading
import time
import weakref

import pytest

from catzilla_tasks import TaskStatus, current_task
from catzilla_tasks.errors import TaskTimeout

# ---- item 11: a chain of tasks waiting on tasks does not deadlock the pool --------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("depth", [30, 200])
def test_a_chain_of_tasks_waiting_on_tasks_finishes_quickly(make_tasks, depth):
    eng = make_tasks(workers=2, enable_auto_scaling=False)

    def chain(n):
        return 0 if n == 0 else eng.add_task(chain, n - 1).wait(10) + 1

    t0 = time.monotonic()
    assert eng.add_task(chain, depth).wait(60) == depth
    assert time.monotonic() - t0 < 10
    assert eng.stats()["succeeded"] >= depth + 1


@pytest.mark.timeout(120)
def test_many_tasks_each_waiting_on_a_queued_task_finish(make_tasks):
    # more waiters than stand-ins could ever cover (max_workers + 16)
    eng = make_tasks(workers=2, max_workers=2, enable_auto_scaling=False)
    go = threading.Event()

    def child(x):
        return x + 1

    def parent(x):
        go.wait(30)
        return eng.add_task(child, x).wait(20)

    hs = [eng.add_task(parent, x) for x in range(60)]
    go.set()
    assert [h.wait(60) for h in hs] == [x + 1 for x in range(60)]


@pytest.mark.timeout(60)
def test_a_task_run_by_its_waiter_keeps_its_callbacks_stats_and_failure(make_tasks):
    eng = make_tasks(workers=1, enable_auto_scaling=False)
    seen = []

    def boom():
        raise ValueError("child failed")

    def parent():
        ok = eng.add_task(int, "4")
        ok.add_callback(seen.append)
        bad = eng.add_task(boom)
        try:
            bad.wait(10)
        except ValueError as exc:
            return (ok.wait(10), str(exc), bad.status, bad.get_stats()["worker_id"])
        return None

    value, msg, status, wid = eng.add_task(parent).wait(20)
    assert (value, msg, status, wid) == (4, "child failed", TaskStatus.FAILED, 0)
    eng.join(10)
    assert seen == [4]
    st = eng.stats()
    assert (st["failed"], st["succeeded"], st["queued_total"], st["running"]) == (1, 2, 0, 0)
    assert st["workers"] == 1  # no stand-in was needed: the worker ran both children itself


@pytest.mark.timeout(60)
def test_async_task_joining_is_told_to_await(make_tasks):
    eng = make_tasks(workers=2, enable_auto_scaling=False)

    async def waits_wrongly():
        return eng.add_task(int, "3").wait(5)

    with pytest.raises(RuntimeError, match="await"):
        eng.add_task(waits_wrongly).wait(10)


# ---- a task's timeout_ms applies while it waits on another task ------------------------------


@pytest.mark.timeout(60)
def test_timeout_ms_interrupts_a_task_blocked_in_wait(make_tasks):
    eng = make_tasks(workers=2, enable_auto_scaling=False)
    gate = threading.Event()
    long = eng.add_task(gate.wait, 20)

    def waiter():
        return long.wait()

    t0 = time.monotonic()
    h = eng.options(timeout_ms=200).add_task(waiter)
    with pytest.raises(TaskTimeout):
        h.wait(10)
    took = time.monotonic() - t0
    gate.set()
    assert h.status == TaskStatus.TIMED_OUT
    assert took < 3, took
    assert long.wait(10) is True


# ---- the wait() timeout message matches the outcome ------------------------------------------


@pytest.mark.timeout(60)
def test_wait_timeout_message_names_a_status_the_task_had(make_tasks):
    eng = make_tasks(workers=1, enable_auto_scaling=False)
    gate = threading.Event()
    eng.add_task(gate.wait, 20)
    h = eng.add_task(int, "5")
    with pytest.raises(TimeoutError, match="status TaskStatus.PENDING|status PENDING"):
        h.wait(0.05)
    gate.set()
    assert h.wait(10) == 5


# ---- item 8: a cycle through a workflow step and a handle of its task ------------------------


class _Marker:
    pass


@pytest.mark.timeout(120)
@pytest.mark.parametrize("read_id", [False, True])
def test_failed_step_holding_its_own_handle_is_collected(make_tasks, read_id):
    from catzilla_tasks.workflows import WorkflowError

    eng = make_tasks(workers=2, enable_auto_scaling=False)
    refs = []

    def step(m):
        h = current_task()  # noqa: F841 - the frame holds the handle: traceback -> frame -> handle
        if read_id:
            _ = h.task_id
        raise ValueError("step failed")

    def run_once():
        m = _Marker()
        refs.append(weakref.ref(m))
        wf = eng.chain("wf")
        wf.add_task(step, m, step_name="s")
        with pytest.raises(WorkflowError):
            wf.execute().wait(10)

    for _ in range(200):
        run_once()
    eng.join(10)
    gc.collect()
    gc.collect()
    alive = sum(r() is not None for r in refs)
    assert alive == 0, f"{alive} of {len(refs)} runs leaked"


@pytest.mark.timeout(120)
def test_wait_timeout_never_names_a_final_status(make_tasks):
    # The task ends right as the wait gives up (the collector's pressure lets it end while the
    # error is built): the error must name a status the task had when the wait ended, never a
    # final one; a task that ended meanwhile gives its outcome.
    from gc_helpers import gc_pressure_on

    eng = make_tasks(workers=2, enable_auto_scaling=False)
    wrong, outcomes = [], 0
    with gc_pressure_on(pause=0.004):
        for _ in range(40):
            h = eng.add_task(time.sleep, 0.003)
            try:
                h.wait(0.001)
                outcomes += 1
            except TimeoutError as exc:
                if any(s in str(exc) for s in ("SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT")):
                    wrong.append(str(exc))
    assert not wrong, wrong[:3]


@pytest.mark.timeout(60)
def test_a_poll_from_a_task_runs_nothing(make_tasks):
    eng = make_tasks(workers=1, enable_auto_scaling=False)
    ran = threading.Event()

    def parent():
        h = eng.add_task(ran.set)
        try:
            h.wait(0)
        except TimeoutError:
            return ran.is_set()
        return "returned"

    assert eng.add_task(parent).wait(10) is False
    assert ran.wait(10)


@pytest.mark.timeout(60)
def test_a_task_with_retries_is_left_to_a_stand_in(make_tasks):
    eng = make_tasks(workers=1, enable_auto_scaling=False)
    tries = []

    def flaky():
        tries.append(1)
        if len(tries) < 2:
            raise ValueError("once")
        return len(tries)

    def parent():
        return eng.options(max_retries=2, retry_base_ms=1).add_task(flaky).wait(20)

    assert eng.add_task(parent).wait(30) == 2
