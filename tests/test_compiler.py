"""Compiled (native) tasks: eligibility, equal results, failures, fallback, require, disk cache, map."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import textwrap
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catzilla_tasks import BackgroundTasks, TaskCancelled, TaskStatus, compiler, mapping, task
from catzilla_tasks.compiler import CompileError, TaskCompiler

numba = pytest.importorskip("numba", reason="the [compile] extra (numba) is part of the test extra")

SMALL = st.integers(min_value=-(2**31), max_value=2**31)


pytestmark = pytest.mark.usefixtures("compile_cache_dir")


@pytest.fixture(scope="module")
def tasks(compile_engine):
    # add_task compiles in the background (its first calls run as Python): compile ahead
    for f in (add, fmath, logic, loop, checked_sqrt, div_retried):
        assert compiler.precompile(f) is None, f
    for types_ in ((int, int), (float, float)):
        assert compiler.precompile(arith, types_) is None
    return compile_engine


# ---- tasks used below (module level: numba compiles plain module functions) ----------------

@task
def add(a: int, b: int) -> int:
    return a + b


@task
def arith(a, b):
    """Unannotated: specialised per argument types (int or float)."""
    q = a // b
    r = a % b
    return q * 3 - r + abs(a - b) + max(a, b) - min(a, 2 * b)


@task
def fmath(x: float, y: float) -> float:
    return math.sqrt(x * x + y * y) + math.sin(x) * math.cos(y) - x / (1.0 + y * y)


@task
def logic(a: bool, b: bool, n: int) -> bool:
    return (a and not b) or (n % 3 == 0)


@task
def loop(a: int, b: int) -> int:
    x = a
    for i in range(100):
        x = (x * x + b + i) % 1000003
    return x


@task
def checked_sqrt(x: float) -> float:
    if x < 0:
        raise ValueError("negative input")
    return math.sqrt(x)


@task(max_retries=2, retry_base_ms=1)
def div_retried(a: int, b: int) -> int:
    return a // b


COUNTER = [0]


def uses_print(a: int) -> int:
    print(a)
    return a


def builds_list(a: int) -> int:
    pair = [a, a]
    return pair[0]


def reads_global(a: int) -> int:
    return a + COUNTER[0]


def make_closure():
    k = 3

    def inner(a: int) -> int:
        return a * k

    return inner


async def coroutine(a: int) -> int:
    return a


def star_args(*a):
    return 0


def wants_str(s: str) -> int:
    return 1


def calls_method(a: int) -> int:
    return a.bit_length()


def numba_rejects(a: int) -> int:
    if a:
        return a
    return (a, a)  # numba cannot unify an int and a tuple


# ---- eligibility ----------------------------------------------------------------------

@pytest.mark.parametrize(
    "func, reason",
    [
        (uses_print, "calls print()"),
        (builds_list, "builds a list"),
        (reads_global, "reads the global 'COUNTER'"),
        (make_closure(), "closures are not compiled"),
        (coroutine, "async function"),
        (star_args, "*args"),
        (wants_str, "parameter 's' is annotated str"),
        (abs, "not a plain Python function"),
        (numba_rejects, "numba cannot compile it for (int)"),
        (calls_method, "calls the method .bit_length()"),
    ],
)
def test_ineligible_functions_say_why(func, reason):
    c = TaskCompiler()
    assert not c.can_compile_to_c(func)
    assert reason in c.explain(func)


def test_eligible_functions():
    c = TaskCompiler()
    for f in (add, fmath, logic, loop, checked_sqrt):
        assert c.explain(f) is None, f
    # unannotated: decided from its code; with argument types, by compiling
    assert c.can_compile_to_c(arith)
    assert c.can_compile_to_c(arith, (float, int))
    assert "do not match the annotations (int, int)" in c.explain(add, (float, int))
    assert "not all int, float or bool" in c.explain(arith, (str, int))


# ---- equal results, compiled vs Python -------------------------------------------------

def same(a, b):
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def outcome(f, *args):
    try:
        return f(*args)
    except Exception as exc:
        return type(exc)


def task_outcome(tasks, f, *args):
    r = tasks.add_task(f, *args)
    try:
        v = r.wait(10)
    except Exception as exc:
        v = type(exc)
    return v, r.get_stats()["native"]


@settings(max_examples=60, deadline=None)
@given(a=SMALL, b=SMALL)
def test_int_tasks_equal_python(tasks, a, b):
    for f in (add, arith, loop):
        got, native = task_outcome(tasks, f, a, b)
        assert native
        assert same(got, outcome(f, a, b)) or got is outcome(f, a, b), (f.__name__, a, b, got)


@settings(max_examples=60, deadline=None)
@given(x=st.floats(-1e6, 1e6), y=st.floats(-1e6, 1e6))
def test_float_tasks_equal_python(tasks, x, y):
    got, native = task_outcome(tasks, fmath, x, y)
    assert native
    want = outcome(fmath, x, y)
    assert same(got, want) or math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-300), (x, y, got, want)
    got, native = task_outcome(tasks, arith, x, y)  # the (float, float) specialisation
    assert native and (got is outcome(arith, x, y) or same(got, outcome(arith, x, y)))


@settings(max_examples=30, deadline=None)
@given(items=st.lists(st.tuples(st.booleans(), st.booleans(), SMALL), min_size=1, max_size=300))
def test_map_equal_python(tasks, items):
    assert tasks.map(logic, items) == [logic(*i) for i in items]
    pairs = [(n, n % 7 + 1) for _, _, n in items]  # divisors 1..7
    assert tasks.map(arith, pairs, chunk_size=7) == [arith(*p) for p in pairs]


# ---- failures inside native tasks ------------------------------------------------------

def test_native_failure_is_a_task_failure(tasks):
    r = tasks.add_task(arith, 7, 0)
    with pytest.raises(ZeroDivisionError):
        r.wait(10)
    assert r.status is TaskStatus.FAILED and r.get_stats()["native"]
    r = tasks.add_task(checked_sqrt, -1.0)
    with pytest.raises(ValueError, match="negative input"):
        r.wait(10)
    assert tasks.add_task(checked_sqrt, 4.0).wait(10) == 2.0


def test_native_failure_is_retried(tasks):
    r = tasks.add_task(div_retried, 1, 0)
    with pytest.raises(ZeroDivisionError):
        r.wait(10)
    assert r.get_stats()["attempts"] == 3 and r.get_stats()["native"]


@pytest.mark.stress
def test_raising_native_tasks_under_load(tasks):
    """Many threads map and add native tasks where every 7th call raises, all at once."""
    n = 50_000
    items = [(float(i) if i % 7 else -1.0,) for i in range(n)]
    errors = []

    def worker():
        try:
            for _ in range(3):
                out = tasks.map(checked_sqrt, items, chunk_size=97, return_exceptions=True)
                for i in (0, 1, 6, 7, 8, n - 1):
                    if i % 7:
                        assert out[i] == math.sqrt(float(i))
                    else:
                        assert isinstance(out[i], ValueError) and "negative input" in str(out[i])
                singles = [tasks.add_task(checked_sqrt, -1.0 if k % 2 else 9.0) for k in range(200)]
                for k, r in enumerate(singles):
                    if k % 2:
                        with pytest.raises(ValueError):
                            r.wait(30)
                    else:
                        assert r.wait(30) == 3.0
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_map_raises_first_failure_with_a_note(tasks):
    with pytest.raises(ZeroDivisionError) as info:
        tasks.map(arith, [(4, 2), (1, 0), (5, 0)])
    assert "item 1 (1, 0) failed" in "".join(getattr(info.value, "__notes__", []))


def test_native_error_path_needs_no_gil(tasks):
    """The measured pitfall: a numba cfunc whose exception escapes takes the GIL to report it.
    Our trampolines catch every exception in native code, so raising tasks finish while the
    waiting thread HOLDS the GIL (hold_gil_s: a test-only wait that does not release it)."""
    native = compiler.native_of(checked_sqrt)
    items = [(-1.0,) if i % 3 else (float(i),) for i in range(20_000)]
    out = mapping.map_native(tasks, native, items, 64, 2, True, _hold_gil=5.0)
    assert isinstance(out[1], ValueError) and out[3] == math.sqrt(3.0)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_gil_check_can_fail(tasks):
    """Control for the test above: a plain numba cfunc that raises does take the GIL, and the
    same wait reports it instead of deadlocking."""
    from numba import cfunc, types

    @cfunc(types.int64(*([types.voidptr] * 10), types.int64, types.int64))
    def raw(c0, c1, c2, c3, c4, c5, c6, c7, out, status, start, stop):
        raise ValueError("escapes")

    with pytest.raises(RuntimeError, match="needed the GIL"):
        tasks._map_native(raw.address, "", "i", [(), ()], 1, 2, 0.5)


# ---- fallback and require ---------------------------------------------------------------

def test_ineligible_task_runs_as_python_and_logs_why(tasks, caplog):
    caplog.set_level(logging.DEBUG, logger="catzilla_tasks.compiler")

    def fmt(a: int) -> int:
        return len(str(a))

    wrapped = task(fmt)
    assert "builtin 'len'" in caplog.text or "builtin 'str'" in caplog.text
    assert compiler.explain(wrapped)
    r = tasks.add_task(wrapped, 12345)
    assert r.wait(10) == 5 and not r.get_stats()["native"]
    assert r.get_stats()["compile_reason"] == compiler.explain(wrapped)


def test_arguments_that_do_not_fit_run_as_python(tasks, caplog):
    caplog.set_level(logging.DEBUG, logger="catzilla_tasks.compiler")
    big = 2**70
    r = tasks.add_task(add, big, 1)             # beyond int64: Python computes it exactly
    assert r.wait(10) == big + 1 and not r.get_stats()["native"]
    r = tasks.add_task(add, 1.5, 2)             # annotated int, got float: Python semantics
    assert r.wait(10) == 3.5 and not r.get_stats()["native"]
    assert "do not match the annotations" in caplog.text
    assert tasks.map(add, [(1, 2), (big, 1), (3, 4)]) == [3, big + 1, 7]   # the batch falls back
    reason = r.get_stats()["compile_reason"]
    assert "did not fit a compiled signature" in reason and "(float, int)" in reason and "64 bits" in reason
    assert tasks.add_task(add, 1, 2).get_stats()["compile_reason"] is None


def test_compile_to_c_false_and_options(tasks):
    @task(compile_to_c=False)
    def plain(a: int, b: int) -> int:
        return a + b

    assert not tasks.add_task(plain, 1, 2).get_stats()["native"]
    from catzilla_tasks import TaskPriority

    r = tasks.options(priority=TaskPriority.HIGH).add_task(add, 1, 2)
    assert r.wait(10) == 3 and r.get_stats()["native"] and r.get_stats()["priority"] is TaskPriority.HIGH
    r = tasks.add_task(add, 1, b=5)              # keywords are bound to positions
    assert r.wait(10) == 6 and r.get_stats()["native"]


def test_require_raises_when_it_cannot_compile():
    with pytest.raises(CompileError, match="calls print"):
        task(compile_to_c="require")(uses_print)
    with pytest.raises(ValueError, match="compile_to_c"):
        task(compile_to_c="yes")(_copy(add))


def _copy(f):
    import types as t

    g = t.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    g.__annotations__ = dict(f.__annotations__)
    return g


def test_require_compiles_annotated_functions_at_decoration():
    f = _copy(numba_rejects)
    with pytest.raises(CompileError, match="numba cannot compile"):
        task(compile_to_c="require")(f)


def test_require_unannotated_raises_at_first_unfit_call(tasks):
    g = task(compile_to_c="require")(_copy(arith))
    assert tasks.add_task(g, 7, 2).wait(10) == arith(7, 2)
    with pytest.raises(CompileError, match="only int, float and bool"):
        tasks.add_task(g, "a", "b")


def test_without_numba_everything_runs_as_python(tmp_path):
    code = textwrap.dedent(
        """
        import sys
        sys.modules["numba"] = None          # as if the [compile] extra were not installed
        from catzilla_tasks import BackgroundTasks, task, compiler

        @task
        def add(a: int, b: int) -> int:
            return a + b

        with BackgroundTasks(workers=1, min_workers=1) as t:
            r = t.add_task(add, 2, 3)
            print(r.wait(10), r.get_stats()["native"], t.map(add, [(1, 1), (2, 2)]))
        print(compiler.explain(add))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    first, reason = out.strip().splitlines()
    assert first == "5 False [2, 4]"
    assert "the compiler is missing: numba is not installed" in reason


# ---- disk cache -------------------------------------------------------------------------

def test_second_process_loads_from_disk_cache(tmp_path):
    mod = tmp_path / "cached_task.py"
    mod.write_text(textwrap.dedent(
        """
        import json, time
        from catzilla_tasks import BackgroundTasks, task, compiler

        @task
        def poly(x: float, n: int) -> float:
            s = 0.0
            for k in range(n):
                s = s * x + k
            return s

        t0 = time.perf_counter()
        spec = compiler.native_of(poly).spec_for((float, int))
        took = time.perf_counter() - t0
        with BackgroundTasks(workers=1, min_workers=1) as t:
            r = t.add_task(poly, 0.5, 10)
            value = r.wait(10)
            print(json.dumps({"hit": spec.cache_hit, "value": value, "native": r.get_stats()["native"], "s": took}))
        """
    ))
    env = dict(os.environ, CATZILLA_TASKS_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(tmp_path))

    def run():
        p = subprocess.run([sys.executable, str(mod)], capture_output=True, text=True, timeout=300, env=env, check=True)
        return json.loads(p.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["hit"] is False and second["hit"] is True
    assert first["value"] == second["value"] and first["native"] and second["native"]
    # a changed function is a different entry: it is compiled, not loaded
    mod.write_text(mod.read_text().replace("s * x + k", "s * x - k"))
    third = run()
    assert third["hit"] is False and third["value"] != first["value"]


# ---- map --------------------------------------------------------------------------------

def test_map_python_tasks_in_order(tasks):
    def py(a, b=10):
        if a == 3:
            raise KeyError(a)
        return f"{a}-{b}"

    assert tasks.map(py, [1, 2, (4, 5)]) == ["1-10", "2-10", "4-5"]
    out = tasks.map(py, range(5), return_exceptions=True)
    assert out[:3] == ["0-10", "1-10", "2-10"] and isinstance(out[3], KeyError)
    with pytest.raises(KeyError):
        tasks.map(py, range(5))
    assert tasks.map(py, []) == []


def test_map_native_single_values_and_small_queue():
    with BackgroundTasks(workers=2, min_workers=1, queue_size=4, enable_auto_scaling=False) as t:
        xs = [float(i) for i in range(10_000)]
        assert t.map(checked_sqrt, xs, chunk_size=10) == [math.sqrt(x) for x in xs]   # 1000 nodes, 4 fit at once
        assert t.map(loop, [(i, 1) for i in range(500)]) == [loop(i, 1) for i in range(500)]


def test_map_bad_arguments(tasks):
    with pytest.raises(TypeError, match="callable"):
        tasks.map(42, [1])
    with pytest.raises(ValueError, match="chunk_size"):
        tasks.map(add, [(1, 2)], chunk_size=0)
    with pytest.raises(TypeError):
        tasks.map(add, [(1, 2, 3)])   # Python's own TypeError: the wrong number of arguments


def test_map_after_shutdown_raises():
    t = BackgroundTasks(workers=1, min_workers=1)
    t.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        t.map(add, [(1, 2)])
    with pytest.raises(RuntimeError, match="shut down"):
        t.map(lambda a: a, [1])


def test_map_cancelled_by_shutdown():
    t = BackgroundTasks(workers=1, min_workers=1, enable_auto_scaling=False)
    gate, started = threading.Event(), threading.Event()

    def blocker():
        started.set()
        gate.wait(30)

    t.add_task(blocker)          # the only worker is busy: the map's nodes stay queued
    started.wait(10)
    result: dict = {}

    def run():
        try:
            result["out"] = t.map(loop, [(i, 1) for i in range(1000)], chunk_size=10)
        except Exception as exc:
            result["exc"] = exc

    th = threading.Thread(target=run)
    th.start()
    while t.stats()["queued_total"] < 100:   # the map queued its 100 nodes
        th.join(0.01)
    stopper = threading.Thread(target=t.shutdown, kwargs={"wait_for_completion": False})
    stopper.start()
    while t.stats()["cancelled"] < 100:      # shutdown cancelled them (it now waits for the blocker)
        stopper.join(0.01)
    gate.set()
    stopper.join(30)
    th.join(30)
    assert isinstance(result.get("exc"), TaskCancelled), result


# ---- compile_to_c="require" raises at every call that cannot run natively -------------------

def test_require_raises_every_time(tasks):
    """Before: only the first call per argument types raised; later calls and a map batch with
    one item that does not fit ran as Python."""
    g = task(compile_to_c="require")(_copy(add))
    for _ in range(3):
        with pytest.raises(CompileError, match="do not match the annotations"):
            tasks.add_task(g, 1.5, 2)
        with pytest.raises(CompileError, match="does not fit in 64 bits"):
            tasks.add_task(g, 2**70, 1)
    with pytest.raises(CompileError, match="do not match the annotations") as info:
        tasks.map(g, [(1, 2), (1.5, 2), (3, 4)])
    assert "item 1 (1.5, 2)" in "".join(info.value.__notes__)
    with pytest.raises(CompileError, match="64 bits"):
        tasks.map(g, [(1, 2), (2**70, 1)])
    assert tasks.map(g, [(1, 2), (3, 4)]) == [3, 7]
    r = tasks.add_task(g, 1, 2)
    assert r.wait(10) == 3 and r.get_stats()["native"]

    h = task(compile_to_c="require")(_copy(arith))
    assert tasks.add_task(h, 7, 2).wait(10) == arith(7, 2)
    for _ in range(2):
        with pytest.raises(CompileError, match="only int, float and bool"):
            tasks.add_task(h, "a", "b")
        with pytest.raises(CompileError, match="do not bind"):
            tasks.add_task(h, 1)


def test_require_refuses_a_map_that_would_run_as_python(tasks):
    g = task(compile_to_c="require", max_retries=1)(_copy(add))
    with pytest.raises(CompileError, match="retries, a timeout or hooks"):
        tasks.map(g, [(1, 2)])


# ---- add_task never compiles on the caller's thread -----------------------------------------

def fresh_poly(x: float, n: int) -> float:
    s = 0.5
    for k in range(n):
        s = s * x + k
    return s


def fresh_unannotated(a, b):
    return a * 3 + b


def test_add_task_never_compiles_on_the_callers_thread(tasks, monkeypatch):
    """Before: the first add_task imported numba and compiled on the caller's thread (0.7-1 s)."""
    gate, started = threading.Event(), threading.Event()
    threads = []
    real = TaskCompiler._build

    def slow_build(self, func, codes, key):
        threads.append(threading.current_thread())
        started.set()
        if threading.current_thread() is not threading.main_thread():
            assert gate.wait(60)   # the compile is "slow" until the test lets it finish
        return real(self, func, codes, key)

    monkeypatch.setattr(TaskCompiler, "_build", slow_build)
    f = task(fresh_poly)
    r = tasks.add_task(f, 2.0, 3)           # returns while the compile is held
    assert r.wait(10) == fresh_poly(2.0, 3) and not r.get_stats()["native"]
    assert "compiled in the background" in r.get_stats()["compile_reason"]
    assert started.wait(30)
    assert threads and threads[0] is not threading.main_thread()
    assert threads[0].name == "catzilla_tasks-compile"
    gate.set()
    assert compiler.precompile(f) is None    # waits for the background compile
    r = tasks.add_task(f, 2.0, 3)
    assert r.wait(10) == fresh_poly(2.0, 3) and r.get_stats()["native"]
    assert len(threads) == 1                 # compiled once


def test_map_waits_for_the_native_version(tasks):
    f = task(fresh_unannotated)
    assert tasks.map(f, [(1, 2), (3, 4)]) == [5, 13]
    r = tasks.add_task(f, 5, 6)              # compiled by the map: native from its first call
    assert r.wait(10) == 21 and r.get_stats()["native"]


def test_precompile_and_explain_without_argument_types():
    def greet(name):
        return "hi " + name

    def bump(user_id: int):
        user_id += 1

    assert "str constant 'hi '" in compiler.explain(greet)
    assert "returns no value" in compiler.explain(bump)     # decided without numba
    assert compiler.explain(fresh_unannotated) is None       # types come from the calls
    assert "only functions decorated with @task" in compiler.precompile(greet)
    with pytest.raises(TypeError, match="pass arg_types"):
        compiler.precompile(task(_copy(fresh_unannotated)))
    assert compiler.precompile(task(_copy(fresh_unannotated)), (float, int)) is None


def test_fork_during_a_background_compile(tmp_path):
    """A fork while the compile thread imports numba or compiles must not leave the child's
    compiler locked: the fork waits for the compile, and the child compiles on its own."""
    code = textwrap.dedent(
        """
        import os
        from catzilla_tasks import BackgroundTasks, task, compiler

        @task
        def f(a: int, b: int) -> int:
            return a * b + 1

        with BackgroundTasks(workers=1, min_workers=1) as t:
            t.add_task(f, 2, 3).wait(10)          # queues the compile, which starts at once
        pid = os.fork()
        if pid == 0:
            import faulthandler
            faulthandler.dump_traceback_later(60, exit=True)   # a hung child does not outlive the test
            with BackgroundTasks(workers=1, min_workers=1) as t:
                ready = compiler.precompile(f)
                r = t.add_task(f, 2, 3)
                print(ready, r.wait(10), r.get_stats()["native"], flush=True)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("child exit", status)
        """
    )
    script = tmp_path / "fork_compile.py"   # a file: a compiled task needs its source
    script.write_text(code)
    env = dict(os.environ, CATZILLA_TASKS_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env,
                         check=True).stdout
    assert out.split("\n")[:2] == ["None 7 True", "child exit 0"], out
