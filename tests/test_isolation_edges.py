"""Process isolation at its edges: async tasks, a task's own subprocesses, cancel() of a
running task, a dead forkserver, SIGTERM to the process group, memory limits."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time

import isolation_edge_helpers as h
import pytest

from catzilla_tasks import TaskStatus
from catzilla_tasks.errors import MemoryLimitExceeded, TaskTimeout
from catzilla_tasks.isolation import ProcessPool

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
UNDER_ASAN = os.environ.get("CATZILLA_TASKS_SANITIZER") == "asan"


@pytest.fixture
def pool1():
    p = ProcessPool(1)
    try:
        yield p
    finally:
        p.shutdown(wait=False)


def _wait_file(path, timeout=60.0):
    """The content of a file another process writes atomically (os.replace), once it exists."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):  # another process writes it: nothing to wait on but the file
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)
    with open(path) as f:
        return f.read()


def _wait_dead(pid, timeout=30.0):
    """Whether process pid (not necessarily our child) exits within timeout: its pidfd
    becomes readable when it does."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


# ---- 12: async def with isolation="process" -----------------------------------------------

@pytest.mark.timeout(120)
def test_async_task_runs_on_an_event_loop_in_the_child(pool1):
    assert pool1.run(h.async_add, (2, 3)) == (5, True)


@pytest.mark.timeout(120)
def test_async_isolated_task_through_the_engine(make_tasks, recwarn):
    t = make_tasks(workers=2)
    assert t.options(isolation="process").add_task(h.async_add, 4, 5).wait(60) == (9, True)
    with pytest.raises(ValueError, match="boom"):
        t.options(isolation="process").add_task(h.async_fail, "boom").wait(60)
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


# ---- 10: a task's subprocesses die with it; cancel() of a running isolated task kills it -----

def _kill_quietly(*pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


@pytest.mark.timeout(180)
def test_hard_timeout_kills_the_tasks_subprocesses(pool1, tmp_path):
    pid_file = str(tmp_path / "pids")
    with pytest.raises(TaskTimeout):
        pool1.run(h.spawn_sleeper_then_block, (pid_file,), timeout_s=8)
    child, grandchild, pgid = map(int, _wait_file(pid_file).split())
    try:
        assert pgid == child, "the task's child leads a process group of its own"
        assert _wait_dead(grandchild), "the task's own subprocess outlived its hard timeout"
    finally:
        _kill_quietly(grandchild)


PARENT = textwrap.dedent("""
    import sys, threading
    sys.path.insert(0, sys.argv[2])
    import isolation_edge_helpers as h
    from catzilla_tasks.isolation import ProcessPool
    pool = ProcessPool(1)
    threading.Thread(target=pool.run, args=(h.spawn_sleeper_then_block, (sys.argv[1],))).start()
    threading.Event().wait()
""")


@pytest.mark.timeout(180)
def test_parent_death_kills_the_tasks_subprocesses(tmp_path):
    pid_file = str(tmp_path / "pids")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, pid_file, TESTS_DIR], env=env)
    try:
        child, grandchild, _ = map(int, _wait_file(pid_file).split())
        parent.kill()
        parent.wait(30)
        try:
            assert _wait_dead(child) and _wait_dead(grandchild), "a task's subprocess outlived the parent"
        finally:
            _kill_quietly(child, grandchild)
    finally:
        parent.kill()
        parent.wait(30)


@pytest.mark.timeout(180)
def test_cancel_kills_a_running_isolated_task(make_tasks, tmp_path):
    t = make_tasks(workers=2)
    pid_file, mark = str(tmp_path / "pid"), str(tmp_path / "mark")
    res = t.options(isolation="process", max_retries=2).add_task(h.write_pid_then_sleep_and_mark, pid_file, mark, 60)
    pid = int(_wait_file(pid_file))
    assert res.status is TaskStatus.RUNNING
    assert res.cancel() is True
    from catzilla_tasks import TaskCancelled

    with pytest.raises(TaskCancelled, match="while it ran"):
        res.wait(60)
    assert res.status is TaskStatus.CANCELLED
    assert _wait_dead(pid)
    assert res.cancel() is False  # already final
    t.join(60)
    assert not os.path.exists(mark)  # not retried, not finished
    # the pool still runs tasks
    assert t.options(isolation="process").add_task(h.async_add, 1, 1).wait(60) == (2, True)


@pytest.mark.timeout(180)
def test_cancel_of_an_isolated_task_waiting_for_a_child(make_tasks, tmp_path):
    t = make_tasks(workers=4)
    t.process_workers = 1
    pid_file, mark = str(tmp_path / "pid"), str(tmp_path / "mark")
    first = t.options(isolation="process").add_task(h.write_pid_then_sleep_and_mark, pid_file, mark, 60)
    _wait_file(pid_file)
    second = t.options(isolation="process").add_task(h.write_pid_then_sleep_and_mark, pid_file + "2", mark, 0)
    deadline = time.monotonic() + 60
    while second.status is not TaskStatus.RUNNING:  # its worker thread waits for the only child
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert second.cancel() is True
    with pytest.raises(Exception, match="before it started"):
        second.wait(60)
    assert second.status is TaskStatus.CANCELLED and not os.path.exists(pid_file + "2")
    assert first.cancel() is True
    assert first.status is not TaskStatus.SUCCEEDED


# ---- 11: a dead forkserver does not make a live child's task "lost" -----------------------

@pytest.mark.timeout(180)
def test_forkserver_killed_while_a_task_runs(pool1, tmp_path):
    from multiprocessing import forkserver

    pid_file, mark = str(tmp_path / "pid"), str(tmp_path / "mark")
    out = {}
    th = threading.Thread(
        target=lambda: out.update(r=_capture(pool1.run, h.write_pid_then_sleep_and_mark, (pid_file, mark, 3))))
    th.start()
    _wait_file(pid_file)
    fs_pid = forkserver._forkserver._forkserver_pid
    os.kill(fs_pid, signal.SIGKILL)
    th.join(120)
    assert out["r"] == ("ok", "done"), out["r"]
    with open(mark) as f:
        assert len(f.read().split()) == 1  # ran once
    assert pool1.run(h.async_add, (1, 2)) == (3, True)  # a new forkserver starts new children


def _capture(fn, *args):
    try:
        return ("ok", fn(*args))
    except BaseException as exc:  # noqa: BLE001
        return ("error", repr(exc))


# ---- 9: SIGTERM to the whole process group drains isolated tasks -------------------------

DRAINED = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[2])
    import isolation_edge_helpers as h
    from catzilla_tasks import BackgroundTasks
    d = sys.argv[1]
    tasks = BackgroundTasks(workers=4, min_workers=4, enable_auto_scaling=False)
    tasks.process_workers = 2
    results = [tasks.options(isolation="process").add_task(h.write_pid_then_sleep_and_mark,
                                                           f"{d}/pid{i}", f"{d}/mark", 4) for i in range(3)]
    try:
        while not (os.path.exists(f"{d}/pid0") and os.path.exists(f"{d}/pid1")):
            time.sleep(0.02)
        from multiprocessing import forkserver
        print("ready", forkserver._forkserver._forkserver_pid, flush=True)
        time.sleep(120)
    finally:
        fs = forkserver._forkserver._forkserver_pid
        with open(f"{d}/outcomes", "w") as f:
            f.write(f"forkserver {'alive' if os.waitpid(fs, os.WNOHANG) == (0, 0) else 'dead'}\\n")
            for r in results:
                try:
                    f.write(f"{r.wait(0)}\\n")
                except BaseException as exc:
                    f.write(f"{type(exc).__name__}: {exc}\\n")
""")


@pytest.mark.timeout(180)
def test_sigterm_to_the_process_group_drains_isolated_tasks(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", DRAINED, str(tmp_path), TESTS_DIR], env=env,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline().split()
        assert line[:1] == ["ready"], line
        children = [int(_wait_file(str(tmp_path / f"pid{i}"))) for i in range(2)]
        os.killpg(proc.pid, signal.SIGTERM)          # Ctrl-C-style: the whole group
        for pid in children + [int(line[1])]:        # systemd-style: every process of the service
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        assert proc.wait(120) == 143
        with open(tmp_path / "outcomes") as f:
            assert f.read().split("\n")[:4] == ["forkserver alive"] + ["done"] * 3
        with open(tmp_path / "mark") as f:
            assert len(f.read().split()) == 3        # each ran once, to its end
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


# ---- 13: memory_limit_mb is a virtual-memory limit; hitting it is MemoryLimitExceeded -------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("func, args", [
    (h.start_threads, (200,)),           # thread stacks are address space: "can't start new thread"
    (h.map_anonymous, (400,)),           # mmap: OSError ENOMEM
    (h.wrap_memory_error, (400,)),       # a MemoryError the task turned into another error
])
def test_every_limit_hit_is_memory_limit_exceeded(pool1, func, args):
    if UNDER_ASAN and func is h.wrap_memory_error:
        pytest.skip("ASan's allocator aborts when it cannot map memory (no MemoryError)")
    with pytest.raises(MemoryLimitExceeded, match="virtual memory"):
        pool1.run(func, args, memory_limit_mb=50)
    if func is not h.wrap_memory_error:
        assert pool1.run(func, args) == args[0]  # fine without the limit


@pytest.mark.timeout(120)
def test_other_errors_under_a_limit_stay_themselves(pool1):
    with pytest.raises(RuntimeError, match="can't start new thread"):  # not near the limit: the task's own
        pool1.run(h.raise_runtime_error, ("can't start new thread",), memory_limit_mb=500)
    with pytest.raises(ValueError, match="plain"):
        pool1.run(h.async_fail, ("plain",), memory_limit_mb=500)
