"""Process isolation under attack: limits at their extremes (huge values, a shared library that
cannot be mapped), a child that dies by itself with subprocesses of its own, cancel() racing
the hard timeout, random submit/cancel/timeout sequences, no pidfd with a dead forkserver, and
a failed workflow's running steps (they finish)."""

from __future__ import annotations

import os
import select
import signal
import time

import isolation_attack_helpers as h
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catzilla_tasks.errors import WorkerLost
from catzilla_tasks.isolation import ProcessPool


@pytest.fixture
def pool1():
    p = ProcessPool(1)
    try:
        yield p
    finally:
        p.shutdown(wait=False)


def _wait_dead(pid, timeout=30.0):
    """Whether process pid (not necessarily our child) exits within timeout (its pidfd)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _kill_quietly(*pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- memory_limit_mb at its extremes ------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("limit", [1e300, 2**70, 2**63 / 2**20])
def test_a_limit_beyond_any_address_space_is_no_limit(pool1, limit):
    """setrlimit cannot take it (OverflowError in the child: it died, the task was WorkerLost)."""
    assert pool1.run(h.allocate, (1,), memory_limit_mb=limit) == 1024 * 1024
    assert pool1.stats()["children_lost"] == 0


@pytest.mark.timeout(120)
def test_options_cache_does_not_let_an_invalid_value_through(make_tasks):
    """options(memory_limit_mb=True) is refused; a cached options(memory_limit_mb=1) (True == 1,
    same hash) used to be returned for it, unchecked."""
    t = make_tasks(workers=2)
    t.options(isolation="process", memory_limit_mb=1)
    t.options(max_retries=1)
    with pytest.raises(ValueError, match="memory_limit_mb: expected a number, got bool"):
        t.options(isolation="process", memory_limit_mb=True)
    with pytest.raises(ValueError, match="max_retries"):
        t.options(max_retries=True)


# ---- a child that dies by itself: its subprocesses die with it ---------------------------

@pytest.mark.timeout(180)
def test_a_dead_childs_subprocesses_are_killed(pool1, tmp_path):
    """A task's child that crashes (here os._exit) leaves its process group: the task's own
    subprocesses used to outlive it, orphaned."""
    pid_file = str(tmp_path / "pids")
    with pytest.raises(WorkerLost, match="exited with code 3"):
        pool1.run(h.spawn_sleeper_then_exit, (pid_file,))
    with open(pid_file) as f:
        _, grandchild = map(int, f.read().split())
    try:
        assert _wait_dead(grandchild), "the task's subprocess outlived its child's death"
    finally:
        _kill_quietly(grandchild)


# ---- cancel() racing the hard timeout ----------------------------------------------------

@pytest.mark.timeout(120)
def test_cancel_that_lands_as_the_deadline_passes_wins(pool1, monkeypatch):
    """cancel() returned True, so the call must end TaskCancelled (CANCELLED, never retried),
    not TaskTimeout (TIMED_OUT, retried with retry_on_timeout). The interleaving is forced: the
    wait for the reply is replaced by one whose deadline passes right after cancel() ran."""
    from catzilla_tasks import TaskCancelled, isolation

    token = isolation.CancelToken()
    took = []

    def receive(child, deadline):
        took.append(token.cancel())
        raise isolation._Deadline

    monkeypatch.setattr(pool1, "_receive", receive)
    with pytest.raises(TaskCancelled, match="while it ran"):
        pool1.run_pickled(isolation.pickle_task(h.allocate, (1,)), timeout_s=30, cancel=token)
    assert took == [True]
    assert pool1.stats()["timeouts"] == 0


# ---- random sequences of submit / cancel / timeout on a small pool -----------------------

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from(["quick", "slow", "fail", "async"]), st.booleans()),
        st.tuples(st.just("cancel"), st.integers(0, 7), st.floats(0, 0.3)),
    ),
    min_size=1, max_size=8,
)


@pytest.mark.timeout(600)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_random_submit_cancel_timeout_sequences(make_tasks, ops):
    """Whatever the interleaving: a task whose cancel() said True ends CANCELLED; every other
    ends with its own outcome (value, its error, TaskTimeout); the pool ends with no busy child."""
    from catzilla_tasks import TaskCancelled, TaskStatus
    from catzilla_tasks.errors import TaskTimeout

    t = make_tasks(workers=4, min_workers=4, enable_auto_scaling=False)
    t.process_workers = 2
    added, cancelled = [], {}
    for op in ops:
        if op[0] == "add":
            kind, timed = op[1], op[2]
            opts = t.options(isolation="process", max_retries=1, retry_on_timeout=True, retry_base_ms=1,
                             **({"timeout_ms": 300} if timed else {}))
            func, args = {"quick": (h.allocate, (0.01,)), "slow": (h.sleep_then, (0.6, "slept")),
                          "fail": (h.raise_value_error, ()), "async": (h.async_sleep, (0.2,))}[kind]
            added.append((kind, timed, opts.add_task(func, *args)))
        elif added:
            i = op[1] % len(added)
            time.sleep(op[2])
            took = added[i][2].cancel()
            cancelled[i] = cancelled.get(i, False) or took
    for i, (kind, timed, res) in enumerate(added):
        try:
            value = res.wait(120)
        except TaskCancelled:
            assert res.status is TaskStatus.CANCELLED
            continue
        except TaskTimeout:
            assert timed and not cancelled.get(i), (i, kind, res.status)
            continue
        except ValueError:
            assert kind == "fail" and not cancelled.get(i)
            continue
        finally:
            if cancelled.get(i):
                assert res.status is TaskStatus.CANCELLED, (i, kind, timed, res.status)
        assert not cancelled.get(i)
        assert value == {"quick": 10485, "slow": "slept", "async": 0.2}[kind]
    t.join(60)
    pool = t._process_pool()
    assert pool.busy == 0 and pool.alive <= 2


# ---- memory_limit_mb: a shared library that cannot be mapped under the limit -------------

@pytest.mark.timeout(120)
def test_extension_module_that_cannot_be_mapped_is_a_limit_hit(pool1):
    """dlopen fails under RLIMIT_AS ('failed to map segment from shared object'): the import
    raised ImportError, not MemoryLimitExceeded."""
    from catzilla_tasks.errors import MemoryLimitExceeded

    with pytest.raises(MemoryLimitExceeded, match="virtual memory"):
        pool1.run(h.import_module, ("_decimal",), memory_limit_mb=0.1)
    assert pool1.run(h.import_module, ("_decimal",)) == "_decimal"  # fine without the limit


@pytest.mark.timeout(120)
def test_ctypes_library_that_cannot_be_mapped_is_a_limit_hit(pool1):
    import ctypes.util

    from catzilla_tasks.errors import MemoryLimitExceeded

    lib = ctypes.util.find_library("sqlite3") or ctypes.util.find_library("ssl")
    if lib is None:
        pytest.skip("no shared library to load")
    pool1.run(h.import_module, ("ctypes",))  # ctypes itself loaded before the limit
    with pytest.raises(MemoryLimitExceeded, match="virtual memory"):
        pool1.run(h.dlopen, (lib,), memory_limit_mb=0.1)
    assert pool1.run(h.dlopen, (lib,)) == lib


@pytest.mark.timeout(120)
def test_a_missing_extension_under_a_limit_stays_an_import_error(pool1):
    with pytest.raises(ImportError, match="No module named"):
        pool1.run(h.import_module, ("no_such_module_anywhere",), memory_limit_mb=500)


# ---- a failed workflow lets its running isolated steps finish ----------------------------

@pytest.mark.timeout(180)
def test_a_failed_workflow_lets_its_running_isolated_steps_finish(make_tasks, tmp_path):
    """As documented (and as for thread steps): when a step fails, steps already running
    finish. Cancelling the unfinished steps killed the running isolated one's child."""
    from catzilla_tasks import TaskChain, task
    from catzilla_tasks.workflows import WorkflowError

    t = make_tasks(workers=4)
    pid_file, mark = str(tmp_path / "pid"), str(tmp_path / "mark")
    chain = TaskChain("wf", tasks=t)
    chain.step(task(isolation="process")(h.write_pid_then_sleep_and_mark), pid_file, mark, 2)
    chain.step(h.fail_once_file_exists, pid_file)
    with pytest.raises(WorkflowError, match="the other step failed"):
        chain.execute().wait(60)
    t.join(60)
    with open(mark) as f:  # it ran to its end, once
        assert len(f.read().split()) == 1


# ---- no pidfd (Linux < 5.3, other systems): a dead forkserver --------------------------

def _state(pid):
    """'gone', 'exiting' (a zombie, or the kernel tearing it down: PF_EXITING in its flags) or
    its state letter (R, S...) while it still runs."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return "gone"
    return "exiting" if fields[0] in "ZX" or int(fields[6]) & 0x4 else fields[0]


@pytest.mark.timeout(180)
def test_without_pidfd_a_task_is_reported_lost_only_once_its_child_is_killed(monkeypatch, tmp_path):
    """Without a pidfd the forkserver's EOF cannot be told from the child's death: the task is
    reported lost, but its child must be dead by then (it kept running the task: with retries,
    twice at once)."""
    import threading
    from multiprocessing import forkserver

    from catzilla_tasks.isolation import _children

    monkeypatch.setattr(_children, "_pidfd_open", lambda pid: None)
    pool = ProcessPool(1)
    pid_file, mark = str(tmp_path / "pid"), str(tmp_path / "mark")
    out = {}

    def run():
        try:
            out["r"] = pool.run(h.write_pid_then_sleep_and_mark, (pid_file, mark, 30))
        except BaseException as exc:  # noqa: BLE001
            out["r"] = exc
            out["state"] = _state(child)

    th = threading.Thread(target=run)
    th.start()
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(pid_file):  # written by the child
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with open(pid_file) as f:
            child = int(f.read())
        os.kill(forkserver._forkserver._forkserver_pid, signal.SIGKILL)
        th.join(120)
        assert isinstance(out["r"], WorkerLost), out
        state = out["state"]
        assert state in ("gone", "exiting"), f"the child still ran ({state}) when its task was reported lost"
    finally:
        pool.shutdown(wait=False)
        _kill_quietly(child)


@pytest.mark.timeout(120)
def test_a_failed_workflow_does_not_ask_its_running_thread_steps_to_stop(make_tasks):
    """The same for a step in a thread: it used to see current_task().cancel_requested."""
    import threading

    from catzilla_tasks import TaskChain, current_task
    from catzilla_tasks.workflows import WorkflowError

    t = make_tasks(workers=4)
    started, release, asked = threading.Event(), threading.Event(), []

    def slow():
        started.set()
        release.wait(60)
        asked.append(current_task().cancel_requested)

    def fail():
        started.wait(60)
        raise ValueError("the other step failed")

    chain = TaskChain("wf", tasks=t)
    chain.step(slow)
    chain.step(fail)
    with pytest.raises(WorkflowError, match="the other step failed"):
        chain.execute().wait(60)
    release.set()
    t.join(60)
    assert asked == [False]
