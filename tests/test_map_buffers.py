"""tasks.map with buffer-protocol inputs and array outputs (compiled tasks read and write them
in place; Python tasks get Python numbers). numpy is optional: most tests use array.array."""

from __future__ import annotations

import array
import math
import random
import threading

import pytest

from catzilla_tasks import BackgroundTasks, compiler, mapping, task

numba = pytest.importorskip("numba", reason="the [compile] extra (numba) is part of the test extra")


pytestmark = pytest.mark.usefixtures("compile_cache_dir")


@pytest.fixture(scope="module")
def tasks(compile_engine):
    return compile_engine


@task
def add(a: int, b: int) -> int:
    return a + b


@task
def div(a: int, b: int) -> int:
    return a // b


@task
def hyp(x: float, y: float) -> float:
    return math.sqrt(x * x + y * y) - x / (1.0 + y * y)


@task
def mixed(a: int, x: float, flag: bool) -> float:
    return a * x if flag else a - x


@task
def is_odd(n: int) -> bool:
    return n % 2 == 1


@task
def arith(a, b):
    """Unannotated: the buffers' formats pick the signature."""
    return a * 3 - b + abs(a - b)


@task
def loop(a: int, b: int) -> int:
    x = a
    for i in range(100):
        x = (x * x + b + i) % 1000003
    return x


@task(compile_to_c=False)
def py_add(a: int, b: int) -> int:
    return a + b


def _ints(n, seed, lo=-(2**40), hi=2**40):
    r = random.Random(seed)
    return [r.randint(lo, hi) for _ in range(n)]


def _floats(n, seed):
    r = random.Random(seed)
    return [r.uniform(-1e6, 1e6) for _ in range(n)]


def _resizable(arr: array.array) -> None:
    """The buffer was released: an exported array.array cannot be resized (BufferError)."""
    arr.append(arr[0] if len(arr) else 0)
    arr.pop()


# ---- equal results ---------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 7, 4096, 10_001])
def test_columns_equal_list_input(tasks, n):
    a, b = _ints(n, n), _ints(n, n + 1)
    expect = tasks.map(add, list(zip(a, b, strict=True)))
    assert expect == [x + y for x, y in zip(a, b, strict=True)]
    ca, cb = array.array("q", a), array.array("q", b)
    assert tasks.map(add, ca, cb) == expect
    assert tasks.map(add, ca, cb, chunk_size=3) == expect
    out = tasks.map(add, ca, cb, out="array")
    assert isinstance(out, array.array) and out.typecode == "q" and out.tolist() == expect
    mine = array.array("q", bytes(8 * n))
    assert tasks.map(add, ca, cb, out=mine) is mine and mine.tolist() == expect
    assert tasks.map(add, memoryview(ca), memoryview(cb), out="array").tolist() == expect
    _resizable(ca)
    _resizable(cb)
    _resizable(mine)


def test_floats_bools_and_mixed_columns(tasks):
    n = 5000
    x, y = _floats(n, 1), _floats(n, 2)
    flags = [v > 0 for v in _floats(n, 3)]
    a = _ints(n, 4, -1000, 1000)
    assert tasks.map(hyp, array.array("d", x), array.array("d", y)) == tasks.map(hyp, list(zip(x, y, strict=True)))
    got = tasks.map(hyp, array.array("d", x), array.array("d", y), out="array")
    assert got.typecode == "d" and got.tolist() == [hyp(*p) for p in zip(x, y, strict=True)]
    fl = memoryview(bytes(flags)).cast("?")        # a bool buffer without numpy
    expect = [mixed(*t) for t in zip(a, x, flags, strict=True)]
    assert tasks.map(mixed, array.array("q", a), array.array("d", x), fl) == expect
    assert tasks.map(mixed, array.array("q", a), array.array("d", x), fl, out="array").tolist() == expect
    odd = tasks.map(is_odd, array.array("q", a), out="array")   # bool results: 'B' (0/1)
    assert odd.typecode == "B" and odd.tolist() == [int(v % 2 == 1) for v in a]
    assert tasks.map(is_odd, array.array("q", a)) == [v % 2 == 1 for v in a]


def test_unannotated_function_takes_the_buffers_types(tasks):
    a, b = _ints(300, 5, -1000, 1000), _ints(300, 6, -1000, 1000)
    assert tasks.map(arith, array.array("q", a), array.array("q", b)) == [arith(*p) for p in zip(a, b, strict=True)]
    fa, fb = [float(v) for v in a], [float(v) for v in b]
    got = tasks.map(arith, array.array("d", fa), array.array("d", fb), out="array")
    assert got.typecode == "d" and got.tolist() == [arith(*p) for p in zip(fa, fb, strict=True)]


def test_two_dimensional_and_strided_buffers(tasks):
    n = 3000
    a, b = _ints(n, 7), _ints(n, 8)
    expect = [x + y for x, y in zip(a, b, strict=True)]
    rows = array.array("q", [v for p in zip(a, b, strict=True) for v in p])
    m2 = memoryview(rows).cast("B").cast("q", (n, 2))                # 2-D, one row per item
    assert tasks.map(add, m2) == expect
    assert tasks.map(add, m2, out="array").tolist() == expect
    both = array.array("q", [v for p in zip(a, a, strict=True) for v in p])
    even = memoryview(both)[::2]                                       # strided 1-D columns
    assert tasks.map(add, even, memoryview(array.array("q", b))) == expect
    even.release()
    m2.release()
    _resizable(rows)
    _resizable(both)


def test_numpy_arrays_if_installed(tasks):
    np = pytest.importorskip("numpy")
    n = 20_000
    rng = np.random.default_rng(1)
    a = rng.integers(-(2**40), 2**40, n)
    b = rng.integers(-(2**40), 2**40, n)
    expect = (a + b).tolist()
    assert tasks.map(add, a, b) == expect
    assert tasks.map(add, np.stack([a, b], axis=1), out="array").tolist() == expect     # C order
    assert tasks.map(add, np.asfortranarray(np.stack([a, b], axis=1))) == expect      # any strides
    assert tasks.map(add, a[::-1], b[::-1]) == expect[::-1]
    out = np.empty(n, np.int64)
    assert tasks.map(add, a, b, out=out) is out and (out == a + b).all()
    x = rng.random(n)
    flags = x > 0.5
    got = np.empty(n, np.float64)
    tasks.map(mixed, a % 1000, x, flags, out=got)
    assert got.tolist() == [mixed(int(i), float(f), bool(g)) for i, f, g in zip(a % 1000, x, flags, strict=True)]
    res = np.empty(n, np.bool_)
    tasks.map(is_odd, a, out=res)
    assert (res == (a % 2 == 1)).all()
    with pytest.raises(TypeError, match=r"shape \(3, 0\)"):
        tasks.map(add, np.empty((3, 0), np.int64))
    with pytest.raises(TypeError, match=r"'f' \(float32, 4 bytes\).*compiled for int64"):
        tasks.map(add, a.astype(np.float32), b)
    # formats memoryview cannot read still work for Python tasks (iterated as the array)
    objs = np.array([1, "x", 2.5], dtype=object)
    assert tasks.map(lambda v: repr(v), objs) == ["1", "'x'", "2.5"]
    assert tasks.map(lambda v: float(v) * 2, np.arange(3, dtype=np.float16)) == [0.0, 2.0, 4.0]
    assert tasks.map(lambda x, y: x + y, np.arange(4, dtype=np.float16).reshape(2, 2)) == [1.0, 5.0]


# ---- errors before anything runs --------------------------------------------------------

def _submitted(t):
    return t.stats()["submitted"]


@pytest.mark.parametrize("cols, match", [
    ((array.array("i", [1, 2]), array.array("q", [1, 2])),
     r"argument 0 \('a'\).*'i' \(int32, 4 bytes\).*int64.*array.array\('q'"),
    ((array.array("q", [1, 2]), array.array("d", [1.0, 2.0])),
     r"argument 1 \('b'\).*'d' \(float64.*compiled for int64"),
    ((array.array("q", [1, 2]),), r"add takes 2 arguments, a 1-D buffer gives 1 per item.*shape \(n, 2\)"),
    ((array.array("q", [1, 2]),) * 3, r"add takes 2 arguments, 3 1-D buffers give 3 per item"),
    ((memoryview(array.array("q", range(6))).cast("B").cast("q", (2, 3)),), r"a 2-D buffer of 3 columns"),
    ((memoryview(array.array("d", range(4))).cast("B").cast("d", (2, 2)),),
     r"column 0 of the 2-D buffer.*one 1-D buffer per argument"),
])
def test_wrong_formats_and_shapes_raise_type_error(tasks, cols, match):
    before = _submitted(tasks)
    with pytest.raises(TypeError, match=match):
        tasks.map(add, *cols)
    assert _submitted(tasks) == before           # nothing half-enqueued
    for c in cols:
        if isinstance(c, array.array):
            _resizable(c)


def test_more_shape_and_out_errors(tasks):
    a, b = array.array("q", [1, 2, 3]), array.array("q", [1, 2])
    before = _submitted(tasks)
    with pytest.raises(ValueError, match=r"differ in length \(3, 2\)"):
        tasks.map(add, a, b)
    with pytest.raises(ValueError, match=r"differ in length"):
        tasks.map(add, [1, 2, 3], b)
    cube = memoryview(array.array("q", range(8))).cast("B").cast("q", (2, 2, 2))
    with pytest.raises(TypeError, match="1-D .* or 2-D"):
        tasks.map(add, cube)
    with pytest.raises(TypeError, match="out= must hold int64.*'d' \\(float64"):
        tasks.map(add, a, a, out=array.array("d", [0.0] * 3))
    with pytest.raises(TypeError, match="of 3 items, got 1-D buffer of 2 items"):
        tasks.map(add, a, a, out=array.array("q", [0, 0]))
    with pytest.raises(TypeError, match="read-only"):
        tasks.map(add, a, a, out=bytes(24))
    with pytest.raises(ValueError, match="return_exceptions=True needs the results as a list"):
        tasks.map(add, a, a, out="array", return_exceptions=True)
    with pytest.raises(ValueError, match="out must be None, 'array'"):
        tasks.map(add, a, a, out="list")
    with pytest.raises(TypeError, match="out must be None, 'array' or a writable buffer"):
        tasks.map(add, a, a, out=[0, 0, 0])
    assert _submitted(tasks) == before
    _resizable(a)
    _resizable(b)


# ---- failures inside native code --------------------------------------------------------

def test_failures_with_buffer_input(tasks):
    n = 10_000
    a = array.array("q", range(n))
    b = array.array("q", [0 if i % 97 == 5 else (i % 13) + 1 for i in range(n)])
    out = tasks.map(div, a, b, return_exceptions=True, chunk_size=100)
    for i, v in enumerate(out):
        if b[i] == 0:
            assert isinstance(v, ZeroDivisionError)
        else:
            assert v == a[i] // b[i]
    with pytest.raises(ZeroDivisionError) as ei:
        tasks.map(div, a, b)
    assert "item 5 (5, 0) failed" in ei.value.__notes__[0]
    with pytest.raises(ZeroDivisionError):
        tasks.map(div, a, b, out="array")
    mine = array.array("q", bytes(8 * n))
    with pytest.raises(ZeroDivisionError):
        tasks.map(div, a, b, out=mine)
    assert mine[6] == 6 // b[6]                 # the other items' results are written
    for arr in (a, b, mine):
        _resizable(arr)                           # released, also after an error
    rows = array.array("q", [v for p in zip(a, b, strict=True) for v in p])
    with memoryview(rows).cast("B").cast("q", (n, 2)) as m2:
        with pytest.raises(ZeroDivisionError) as ei:
            tasks.map(div, m2)
    assert "item 5 (5, 0) failed" in ei.value.__notes__[0]
    _resizable(rows)


def test_native_error_path_with_buffers_needs_no_gil(tasks):
    """Waited for while HOLDING the GIL (a test-only mode): raising native items read from
    buffers must finish without it."""
    n = 20_000
    a = array.array("q", range(n))
    b = array.array("q", [i % 7 for i in range(n)])
    with mapping.MapInput(a, (b,)) as inp:
        out = mapping.map_native(tasks, compiler.native_of(div), inp, 64, 2, True, _hold_gil=5.0)
    assert sum(isinstance(v, ZeroDivisionError) for v in out) == sum(1 for v in b if v == 0)


# ---- buffers are held during the run, released after -----------------------------------

def test_buffers_held_while_nodes_queued_then_released_even_when_cancelled():
    t = BackgroundTasks(workers=1, min_workers=1, enable_auto_scaling=False)
    gate, started = threading.Event(), threading.Event()

    def blocker():
        started.set()
        gate.wait(30)

    t.add_task(blocker)          # the only worker is busy: the map's nodes stay queued
    started.wait(10)
    a = array.array("q", range(1000))
    b = array.array("q", [1] * 1000)
    result: dict = {}

    def run():
        try:
            result["out"] = t.map(loop, a, b, chunk_size=10, out="array")
        except Exception as exc:
            result["exc"] = exc

    th = threading.Thread(target=run)
    th.start()
    while t.stats()["queued_total"] < 100:
        th.join(0.01)
    with pytest.raises(BufferError):
        a.append(1)              # exported while the workers may read it
    stopper = threading.Thread(target=t.shutdown, kwargs={"wait_for_completion": False})
    stopper.start()
    while t.stats()["cancelled"] < 100:
        stopper.join(0.01)
    gate.set()
    th.join(30)
    stopper.join(30)
    assert isinstance(result.get("exc"), Exception) and "cancelled" in str(result["exc"])
    _resizable(a)
    _resizable(b)


def test_large_input_nothing_lost(tasks):
    n = 1_000_000
    a = array.array("q", range(n))
    b = array.array("q", [7]) * n
    out = tasks.map(add, a, b, out="array")
    assert len(out) == n and out[0] == 7 and out[-1] == n + 6
    assert sum(out) == n * (n - 1) // 2 + 7 * n
    assert out == array.array("q", range(7, n + 7))
    res = tasks.map(add, a, b)
    assert len(res) == n and res[123_456] == 123_463 and sum(res) == sum(out)
    _resizable(a)


# ---- Python tasks take buffers too -------------------------------------------------------

def test_python_tasks_get_python_numbers(tasks):
    a, b = array.array("q", [1, 2, 3]), array.array("d", [0.5, 1.5, 2.5])
    assert tasks.map(py_add, a, b) == [1.5, 3.5, 5.5]
    assert tasks.map(lambda x: type(x).__name__, a) == ["int"] * 3
    rows = memoryview(array.array("q", [1, 2, 3, 4])).cast("B").cast("q", (2, 2))
    assert tasks.map(py_add, rows) == [3, 7]
    got = tasks.map(py_add, a, a, out="array")
    assert got.typecode == "q" and got.tolist() == [2, 4, 6]
    assert tasks.map(py_add, a, b, out="array").typecode == "d"
    mine = array.array("q", [0, 0, 0])
    assert tasks.map(py_add, a, a, out=mine) is mine and mine.tolist() == [2, 4, 6]
    assert tasks.map(lambda x: x, b"ab") == [97, 98]              # bytes: a buffer of uint8
    assert tasks.map(py_add, a, [10, 20, 30]) == [11, 22, 33]     # a buffer and a list: zipped
    assert tasks.map(add, a, [10, 20, 30]) == [11, 22, 33]        # (native, through the list path)
    with pytest.raises(TypeError, match="needs number results"):
        tasks.map(lambda x: str(x), a, out="array")
    with pytest.raises(ZeroDivisionError) as ei:
        tasks.map(lambda x, y: x // y, a, array.array("q", [1, 0, 1]))
    assert "item 1 (2, 0) failed" in ei.value.__notes__[0]
    for arr in (a, b, mine):
        _resizable(arr)


def test_compiled_task_with_retries_maps_buffers_as_python(tasks):
    @task(max_retries=1)
    def add_r(a: int, b: int) -> int:
        return a + b

    a = array.array("q", range(50))
    assert tasks.map(add_r, a, a) == [2 * i for i in range(50)]
    assert tasks.map(add_r, a, a, out="array").tolist() == [2 * i for i in range(50)]


def test_list_input_with_out_array(tasks):
    items = [(i, 2 * i) for i in range(5000)]
    got = tasks.map(add, items, out="array")
    assert got.typecode == "q" and got.tolist() == [3 * i for i in range(5000)]
    assert tasks.map(add, [], out="array") == array.array("q")
    assert tasks.map(add, [(1, 2), (1.5, 2)], out="array") == array.array("d", [3.0, 3.5])   # fell back to Python
    mine = array.array("d", [0.0] * 3)
    assert tasks.map(hyp, [(3.0, 4.0)] * 3, out=mine).tolist() == [hyp(3.0, 4.0)] * 3
