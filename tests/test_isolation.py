"""Process isolation (catzilla_tasks.isolation): ProcessPool and check_picklable."""

from __future__ import annotations

import os
import pickle
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import isolation_helpers as h
import pytest

from catzilla_tasks.errors import MemoryLimitExceeded, TaskExceptionNotPicklable, TaskTimeout, WorkerLost
from catzilla_tasks.isolation import ChildTraceback, ProcessPool, check_picklable, pickle_task

UNDER_ASAN = os.environ.get("CATZILLA_TASKS_SANITIZER") == "asan"
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def pool():
    p = ProcessPool(2)
    try:
        yield p
    finally:
        p.shutdown(wait=False)


@pytest.fixture
def pool1():
    p = ProcessPool(1)
    try:
        yield p
    finally:
        p.shutdown(wait=False)


class PidChannel:
    """A Unix socket a task connects to, to tell the test its pid (isolation_helpers.report_pid_*).
    The test blocks in accept() with a timeout: no polling, no sleeps."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="ctiso-")  # short: AF_UNIX paths are limited to 108 bytes
        self.path = os.path.join(self.dir, "pid.sock")
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(16)
        self.server.settimeout(30)
        self.conns: list[socket.socket] = []

    def accept_pid(self) -> int:
        conn, _ = self.server.accept()
        conn.settimeout(30)
        self.conns.append(conn)
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(64)
            assert chunk, "the task closed the channel without sending its pid"
            data += chunk
        return int(data)

    def release_all(self) -> None:
        for conn in self.conns:
            conn.close()
        self.conns.clear()

    def close(self) -> None:
        self.release_all()
        self.server.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def channel():
    ch = PidChannel()
    try:
        yield ch
    finally:
        ch.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def run_in_thread(pool, *args, **kwargs):
    """Start pool.run in a thread; return a function giving (value, exception) once it ends."""
    box: dict = {}

    def target():
        try:
            box["value"] = pool.run(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()

    def result(timeout=30.0):
        t.join(timeout)
        assert not t.is_alive(), "pool.run did not return"
        return box.get("value"), box.get("error")

    return result


# ----------------------------------------------------------------------------- round trips

def test_values_round_trip(pool):
    assert pool.run(h.add, (2, 3), {}) == 5
    assert pool.run(h.add, (), {"a": "x", "b": "y"}) == "xy"
    assert pool.run(h.echo, (1, [2, {3: 4}]), {"k": (5,)}) == ((1, [2, {3: 4}]), {"k": (5,)})
    assert pool.run(h.getpid) != os.getpid()


def test_task_exception_is_reraised_with_child_traceback(pool):
    with pytest.raises(ValueError, match="^bad input$") as info:
        pool.run(h.raise_value_error, ("bad input",), {})
    cause = info.value.__cause__
    assert isinstance(cause, ChildTraceback)
    assert "raise_value_error" in cause.text and "isolation_helpers.py" in cause.text
    assert "ValueError: bad input" in str(cause)

    with pytest.raises(h.CustomError) as info:
        pool.run(h.raise_custom, ("custom", 42), {})
    assert info.value.code == 42 and info.value.args == ("custom", 42)
    assert pool.run(h.add, (1, 1), {}) == 2  # the child is still in service


@pytest.mark.parametrize("func", [h.raise_unpicklable, h.raise_with_lock])
def test_unpicklable_task_exception_gives_a_clear_error(pool, func):
    with pytest.raises(TaskExceptionNotPicklable) as info:
        pool.run(func, ("the message",), {})
    err = info.value
    assert err.type_name.endswith(("UnpicklableError", "LockError"))
    assert "the message" in str(err) and "cannot be sent back" in str(err)
    assert func.__name__ in err.child_traceback
    assert isinstance(err.__cause__, ChildTraceback)
    assert pool.run(h.add, (1, 2), {}) == 3


def test_unpicklable_result_gives_a_clear_type_error(pool):
    with pytest.raises(TypeError, match="result cannot be pickled.*lock"):
        pool.run(h.return_lock)
    assert pool.run(h.add, (1, 2), {}) == 3


def test_large_argument_and_result(pool):
    n = 48 * 1024 * 1024
    data = pool.run(h.big_bytes, (n, 9), {})
    assert len(data) == n and data[:3] == b"\t\t\t" and data[-1] == 9
    assert pool.run(h.byte_sum_and_len, (data,), {}) == (n, 9 * len(range(0, n, 4096)))


def test_run_pickled_with_pickle_task(pool):
    payload = pickle_task(h.add, (20,), {"b": 22})
    assert isinstance(payload, bytes)
    assert pool.run_pickled(payload) == 42
    assert pool.run_pickled(payload, timeout_s=10) == 42  # the same bytes run again


def test_function_not_importable_in_the_child(pool):
    ghost = types.ModuleType("ghost_module_only_in_the_parent")
    exec("def f():\n    return 1\n", ghost.__dict__)
    sys.modules[ghost.__name__] = ghost
    try:
        with pytest.raises(ModuleNotFoundError) as info:
            pool.run(ghost.f)
    finally:
        del sys.modules[ghost.__name__]
    assert any("must be importable" in note for note in info.value.__notes__)
    assert pool.run(h.add, (1, 2), {}) == 3


# ----------------------------------------------------------------------------- picklability

def test_check_picklable_names_the_offending_argument():
    check_picklable(h.add, (1, 2), {})  # fine: returns None

    with pytest.raises(TypeError) as info:
        check_picklable(h.add, (1, lambda: 0), {})
    msg = str(info.value)
    assert msg.startswith("argument 2 (a lambda) cannot be pickled")
    assert "process-isolated tasks need picklable functions, arguments and results" in msg
    assert "define the function at module level" in msg

    def inner():
        return 1

    local_fn = r"^the task function \(a local function '.*<locals>\.inner'\) cannot be pickled"
    with pytest.raises(TypeError, match=local_fn):
        check_picklable(inner, (), {})

    with pytest.raises(TypeError, match=r"^keyword argument 'guard' \(a _thread\.lock\) cannot be pickled.*plain data"):
        check_picklable(h.echo, (1,), {"guard": threading.Lock()})

    with pytest.raises(TypeError, match="must be callable"):
        check_picklable(42, (), {})


def test_run_refuses_unpicklable_tasks_before_starting_a_child(pool):
    with pytest.raises(TypeError, match=r"^argument 1 \(a lambda\)"):
        pool.run(h.echo, (lambda: 0,), {})
    assert pool.alive == 0 and pool.stats()["children_started"] == 0


def test_argument_validation():
    with pytest.raises(ValueError, match="size"):
        ProcessPool(0)
    with pytest.raises(ValueError, match="fork"):
        ProcessPool(1, mp_context="fork")
    with ProcessPool(1) as p:
        with pytest.raises(ValueError, match="timeout_s"):
            p.run(h.add, (1, 2), {}, timeout_s=0)
        with pytest.raises(ValueError, match="memory_limit_mb"):
            p.run(h.add, (1, 2), {}, memory_limit_mb=-5)
        assert p.alive == 0


# ----------------------------------------------------------------------------- timeouts

def test_hard_timeout_kills_the_child_and_the_pool_goes_on(pool1):
    first_pid = pool1.run(h.getpid)
    t0 = time.monotonic()
    with pytest.raises(TaskTimeout, match="0.5 s") as info:
        pool1.run(h.spin_forever, timeout_s=0.5)
    elapsed = time.monotonic() - t0
    assert isinstance(info.value, TimeoutError)
    assert 0.5 <= elapsed < 5.0
    assert str(first_pid) in str(info.value)
    assert not pid_alive(first_pid)  # killed and reaped before run() returned
    assert pool1.alive == 0

    second_pid = pool1.run(h.getpid)
    assert second_pid != first_pid
    assert pool1.run(h.add, (1, 2), {}, timeout_s=5) == 3  # a timeout that is not reached
    stats = pool1.stats()
    assert stats["timeouts"] == 1 and stats["children_started"] == 2


# ----------------------------------------------------------------------------- memory

def test_memory_limit(pool1):
    pid = pool1.run(h.getpid)
    with pytest.raises(MemoryLimitExceeded, match="memory_limit_mb=200") as info:
        pool1.run(h.allocate, (4000,), {}, memory_limit_mb=200)
    assert isinstance(info.value, MemoryError)
    assert "allocate" in info.value.__cause__.text  # the child's traceback
    assert not pid_alive(pid)  # a child that ran out of memory is retired

    # the pool goes on; the limit is per task and leaves room for the task's own memory
    assert pool1.run(h.allocate, (120,), {}, memory_limit_mb=200) == 120
    assert pool1.run(h.allocate, (600,), {}) == 600  # no limit: the child's own limit is back
    import resource

    assert pool1.run(h.address_space_limit) == resource.getrlimit(resource.RLIMIT_AS)


def test_memory_error_without_a_limit_is_the_tasks_own(pool1):
    # a MemoryError the task raises itself (no memory_limit_mb) is not a limit hit
    with pytest.raises(MemoryError) as info:
        pool1.run(bytes, (2**62,), {})
    assert not isinstance(info.value, MemoryLimitExceeded)


def test_oom_kill_of_a_limited_task_is_reported_as_memory():
    from catzilla_tasks.isolation import _death_error

    err = _death_error(123, -9, "", memory_limit_mb=200.0, oom_kills_before=4, oom_kills_after=5)
    assert isinstance(err, MemoryLimitExceeded) and "out-of-memory killer" in str(err)
    err = _death_error(123, -9, "", memory_limit_mb=200.0, oom_kills_before=5, oom_kills_after=5)
    assert isinstance(err, WorkerLost) and "SIGKILL" in str(err)
    err = _death_error(123, -9, "", memory_limit_mb=None, oom_kills_before=None, oom_kills_after=None)
    assert isinstance(err, WorkerLost) and err.pid == 123 and err.exitcode == -9


# ----------------------------------------------------------------------------- lost children

def test_kill_9_of_a_child_mid_task(pool, channel):
    result = run_in_thread(pool, h.report_pid_and_block, (channel.path,), {})
    pid = channel.accept_pid()  # the task is running in child `pid`
    os.kill(pid, signal.SIGKILL)
    value, error = result()
    assert value is None
    assert isinstance(error, WorkerLost), error
    assert error.pid == pid and error.exitcode == -signal.SIGKILL
    assert f"pid {pid}" in str(error) and "SIGKILL" in str(error)
    assert not pid_alive(pid)
    # the pool recovers: a new child runs the next task
    assert pool.run(h.add, (1, 2), {}) == 3
    assert pid not in pool.pids()
    assert pool.stats()["children_lost"] == 1


def test_segfault_in_the_child(pool):
    with pytest.raises(WorkerLost) as info:
        pool.run(h.segfault)
    err = info.value
    if not UNDER_ASAN:  # ASan turns the SIGSEGV into its own report and an abort
        assert err.exitcode == -signal.SIGSEGV and "SIGSEGV" in str(err)
    # the child's faulthandler names the crashing Python function
    assert "faulthandler" in str(err) and "segfault" in str(err)
    assert pool.run(h.add, (1, 2), {}) == 3


def test_child_exit_code(pool):
    with pytest.raises(WorkerLost, match="exited with code 3") as info:
        pool.run(h.exit_now, (3,), {})
    assert info.value.exitcode == 3
    assert pool.run(h.add, (1, 2), {}) == 3


def test_idle_child_killed_from_outside_is_replaced_transparently(pool1):
    pid = pool1.run(h.getpid)
    pidfd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGKILL)
        ready, _, _ = select.select([pidfd], [], [], 10)  # wait until it is really gone
        assert ready
    finally:
        os.close(pidfd)
    assert pool1.run(h.add, (1, 2), {}) == 3  # no WorkerLost: that task never reached the dead child
    assert pool1.pids() != [pid]


# ----------------------------------------------------------------------------- concurrency

def test_two_children_run_two_tasks_at_the_same_time(channel):
    # Parallelism shown by a rendezvous, not by timing: each task reports from its child and
    # blocks until the test releases it, which it does only once both are running at once
    # (run one after the other, the second accept() would time out). The speed-up itself is
    # the benchmark's figure (benchmarks/run.py --figures cpu_isolation).
    with ProcessPool(2) as pool:
        first = run_in_thread(pool, h.report_pid_and_block, (channel.path,), {})
        second = run_in_thread(pool, h.report_pid_and_block, (channel.path,), {})
        pids = {channel.accept_pid(), channel.accept_pid()}
        assert len(pids) == 2 and pids == set(pool.pids())
        channel.release_all()
        assert first() == ("released", None) and second() == ("released", None)
        assert pool.stats()["children_started"] == 2


def test_many_callers_share_two_children():
    """8 threads call run at once on a pool of 2: every call gets its answer, no child runs
    two tasks at once, at most 2 children exist, and the waiting costs no CPU."""
    with ProcessPool(2) as pool:
        n_threads, per_thread, task_s = 8, 3, 0.05
        barrier = threading.Barrier(n_threads)

        def caller(i):
            barrier.wait()
            return [pool.run(h.timed_sleep, (task_s, (i, j)), {}) for j in range(per_thread)]

        cpu0 = time.process_time()
        t0 = time.monotonic()
        with ThreadPoolExecutor(n_threads) as ex:
            results = list(ex.map(caller, range(n_threads)))
        wall = time.monotonic() - t0
        cpu = time.process_time() - cpu0

        runs = [r for rs in results for r in rs]
        assert [r[0] for r in runs] == [(i, j) for i in range(n_threads) for j in range(per_thread)]
        pids = {r[1] for r in runs}
        assert len(pids) <= 2 and pool.alive <= 2
        # per child, its tasks never overlap in time
        for pid in pids:
            spans = sorted((r[2], r[3]) for r in runs if r[1] == pid)
            for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
                assert start >= end
        # 24 tasks of 50 ms on 2 children: ~0.6 s; the 8 callers block without polling
        assert wall >= n_threads * per_thread * task_s / 2
        assert cpu < 0.5 * wall, (cpu, wall)
        assert pool.stats()["busy"] == 0


def test_waiting_releases_the_gil(pool1, channel):
    result = run_in_thread(pool1, h.report_pid_and_block, (channel.path,), {})
    channel.accept_pid()  # the other thread is now blocked in run()
    t0 = time.perf_counter()
    h.spin(300_000)  # needs the GIL; would stall if the waiting thread held it
    spin_s = time.perf_counter() - t0
    channel.release_all()
    assert result() == ("released", None)
    assert spin_s < 2.0


def test_mixed_outcomes_from_many_threads():
    """Timeouts, crashes, errors and values interleaved from 8 threads on 2 children."""
    with ProcessPool(2) as pool:
        barrier = threading.Barrier(8)

        def caller(i):
            barrier.wait()
            seen = []
            for kind in ("value", "error", "timeout" if i % 2 else "crash", "value"):
                try:
                    if kind == "value":
                        seen.append(pool.run(h.add, (i, 1), {}) == i + 1)
                    elif kind == "error":
                        pool.run(h.raise_custom, ("x", i), {})
                    elif kind == "timeout":
                        pool.run(h.spin_forever, timeout_s=0.2)
                    else:
                        pool.run(h.exit_now, (5,), {})
                except h.CustomError as exc:
                    seen.append(kind == "error" and exc.code == i)
                except TaskTimeout:
                    seen.append(kind == "timeout")
                except WorkerLost as exc:
                    seen.append(kind == "crash" and exc.exitcode == 5)
            return seen

        with ThreadPoolExecutor(8) as ex:
            outcomes = list(ex.map(caller, range(8)))
        assert outcomes == [[True] * 4] * 8
        stats = pool.stats()
        assert stats["busy"] == 0 and stats["alive"] <= 2 and stats["waiting"] == 0
        assert stats["timeouts"] == 4 and stats["children_lost"] == 4
        assert pool.run(h.add, (1, 2), {}) == 3


# ----------------------------------------------------------------------------- shutdown

def test_shutdown_waits_for_running_tasks(channel):
    pool = ProcessPool(1)
    result = run_in_thread(pool, h.report_pid_and_block, (channel.path,), {})
    pid = channel.accept_pid()
    stopper = threading.Thread(target=pool.shutdown, kwargs={"wait": True})
    stopper.start()
    stopper.join(0.3)
    assert stopper.is_alive()  # still waiting for the running task
    with pytest.raises(RuntimeError, match="shut down"):
        pool.run(h.add, (1, 2), {})
    channel.release_all()  # the task returns
    assert result() == ("released", None)
    stopper.join(10)
    assert not stopper.is_alive()
    assert pool.alive == 0 and not pid_alive(pid)


def test_shutdown_without_wait_kills_running_tasks_and_refuses_waiting_ones(channel):
    pool = ProcessPool(1)
    running = run_in_thread(pool, h.report_pid_and_block, (channel.path,), {})
    pid = channel.accept_pid()
    waiting = run_in_thread(pool, h.add, (1, 2), {})  # no free child: waits on the condition
    t0 = time.monotonic()
    pool.shutdown(wait=False)
    assert time.monotonic() - t0 < 5
    _, error = running()
    assert isinstance(error, WorkerLost) and "shut down" in str(error)
    value, error = waiting()
    # the waiting caller either never got a child (RuntimeError), or won the race for the
    # freed slot before shutdown marked the pool (then its task ran normally)
    assert isinstance(error, RuntimeError) or value == 3
    assert pool.alive == 0 and not pid_alive(pid)
    pool.shutdown()  # idempotent


def test_shutdown_timeout_kills_what_is_still_running(channel):
    pool = ProcessPool(1)
    result = run_in_thread(pool, h.report_pid_and_block, (channel.path,), {})
    pid = channel.accept_pid()
    t0 = time.monotonic()
    pool.shutdown(wait=True, timeout=0.3)
    assert 0.3 <= time.monotonic() - t0 < 5
    _, error = result()
    assert isinstance(error, WorkerLost)
    assert not pid_alive(pid)


# ----------------------------------------------------------------------------- process life

def run_script(body: str, *args: str, timeout: float = 60, as_file: bool = False) -> subprocess.CompletedProcess:
    """Run a Python script in a new interpreter (as ``-c``, or as a file: children then import
    it as their main module)."""
    script = textwrap.dedent(body)
    with tempfile.TemporaryDirectory(prefix="ctiso-") as tmp:
        if as_file:
            path = os.path.join(tmp, "main_script.py")
            with open(path, "w") as f:
                f.write(script)
            cmd = [sys.executable, path, *args]
        else:
            cmd = [sys.executable, "-c", script, *args]
        return subprocess.run(cmd, cwd=TESTS_DIR, capture_output=True, text=True, timeout=timeout)


def test_children_exit_when_the_parent_is_killed(channel):
    """A parent killed with SIGKILL cannot clean up: its children notice and exit, even one
    spinning in a task."""
    script = textwrap.dedent(
        """
        import sys, threading
        sys.path.insert(0, %r)
        import isolation_helpers
        from catzilla_tasks.isolation import ProcessPool

        def main():
            pool = ProcessPool(1)
            threading.Thread(target=pool.run, args=(isolation_helpers.report_pid_and_spin, (sys.argv[1],), {}),
                             daemon=True).start()
            threading.Event().wait()

        if __name__ == "__main__":
            main()
        """  # noqa: UP031 - a script template: %r leaves its braces alone
        % TESTS_DIR
    )
    path = os.path.join(channel.dir, "parent.py")
    with open(path, "w") as f:
        f.write(script)
    parent = subprocess.Popen([sys.executable, path, channel.path])
    try:
        child_pid = channel.accept_pid()
        pidfd = os.pidfd_open(child_pid)
    finally:
        parent.kill()
        parent.wait(timeout=30)
    try:
        ready, _, _ = select.select([pidfd], [], [], 15)
        if not ready:
            os.kill(child_pid, signal.SIGKILL)
        assert ready, "the child outlived its parent"
    finally:
        os.close(pidfd)
        os.unlink(path)


def test_os_fork_child_leaves_the_parents_pool_alone():
    proc = run_script(
        """
        import os, sys
        sys.path.insert(0, %r)
        import isolation_helpers
        from catzilla_tasks.isolation import ProcessPool

        def main():
            pool = ProcessPool(1)
            pid1 = pool.run(isolation_helpers.getpid)
            child = os.fork()
            if child == 0:
                try:
                    pool.run(isolation_helpers.getpid)
                    code = 1
                except RuntimeError as exc:
                    code = 0 if "os.fork" in str(exc) else 2
                sys.exit(code)  # a normal exit: atexit hooks run in the fork child
            _, status = os.waitpid(child, 0)
            assert os.waitstatus_to_exitcode(status) == 0, status
            assert pool.run(isolation_helpers.getpid) == pid1  # our child was not touched
            pool.shutdown()
            print("ok")

        if __name__ == "__main__":
            main()
        """  # noqa: UP031 - a script template: %r leaves its braces alone
        % TESTS_DIR
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert "Error" not in proc.stderr and "Exception" not in proc.stderr, proc.stderr


def test_in_pool_child(pool):
    from catzilla_tasks.isolation import in_pool_child

    assert in_pool_child() is False
    assert pool.run(h.in_pool_child) is True


def test_in_pool_child_while_the_child_imports_the_main_module():
    """A child imports the main script (as __mp_main__) before its first task: code that runs
    at import there (e.g. a module-level engine) can tell it is in a child."""
    proc = run_script(
        """
        import sys
        sys.path.insert(0, %r)
        from catzilla_tasks.isolation import ProcessPool, in_pool_child

        AT_IMPORT = in_pool_child()

        def flag_at_import():
            return AT_IMPORT

        if __name__ == "__main__":
            with ProcessPool(1) as pool:
                print(AT_IMPORT, pool.run(flag_at_import))
        """  # noqa: UP031 - a script template: %r leaves its braces alone
        % TESTS_DIR,
        as_file=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]


def test_spawn_start_method_works():
    with ProcessPool(1, mp_context="spawn") as pool:
        assert pool.start_method == "spawn"
        assert pool.run(h.add, (1, 2), {}) == 3
        with pytest.raises(TaskTimeout):
            pool.run(h.spin_forever, timeout_s=0.3)
        assert pool.run(h.add, (2, 2), {}) == 4


def test_exceptions_pickle():
    err = pickle.loads(pickle.dumps(WorkerLost("gone", pid=5, exitcode=-9)))
    assert (str(err), err.pid, err.exitcode) == ("gone", 5, -9)
