"""Differential test: a compiled task returns exactly what its Python function returns.

A corpus of eligible functions (arithmetic, math module, int/float conversions, comparisons,
loops, recursion, a numba helper) is called natively and as Python on random inputs that
include 0, -0.0, +-inf, nan, +-(2**63 - 1), 2**63, huge and tiny floats. Two levels:

* the trampoline itself (ctypes, one item): when native code reports success (status 0) its
  value must be Python's value, of Python's type (nan == nan, the sign of zero checked), and
  Python must not have raised; when it reports failure the engine runs the Python function;
* the task through ``add_task``: the same value and type, or the same exception type.

Each function is compiled once for the module (numba compiles are slow).
"""

from __future__ import annotations

import ctypes
import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catzilla_tasks import compiler, task

numba = pytest.importorskip("numba", reason="the [compile] extra (numba) is part of the test extra")

pytestmark = pytest.mark.usefixtures("compile_cache_dir")

I64_MAX = 2**63 - 1
I64_MIN = -(2**63)

SPECIAL_INTS = [0, 1, -1, 2, -2, 3, 7, 10, 63, 64, -63, 2**31, 2**53, 2**53 + 1, -(2**53) - 1, I64_MAX, -I64_MAX,
                I64_MIN, 2**63, 3037000499, 3037000500, -3037000500]
SPECIAL_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 1.5, 2.5, -2.5, 3.0, 1 / 3, math.inf, -math.inf, math.nan, 5e-324,
                  -5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, -1.7976931348623157e308, 1e300, -1e300,
                  1e-300, 709.7, 710.0, -745.2, 2.0**53, 2.0**63, -(2.0**63), 9.223372036854775e18, 1e30,
                  float(I64_MAX), 0.1, -8.0, 1e16 + 1]

INTS = st.one_of(st.sampled_from(SPECIAL_INTS), st.integers(I64_MIN, I64_MAX), st.integers(-1000, 1000))
SMALL_INTS = st.one_of(st.sampled_from([0, 1, -1, 2, 62, 63, 64, -64]), st.integers(-70, 70))
FLOATS = st.one_of(st.sampled_from(SPECIAL_FLOATS), st.floats(allow_nan=True, allow_infinity=True),
                   st.floats(-1e4, 1e4))
BOOLS = st.booleans()
# recursion: not near Python's limit (1000), where the test's own stack depth decides whether
# Python raises RecursionError here while a worker's fresh stack does not
FACT_N = st.one_of(st.integers(-10, 400), st.integers(3000, I64_MAX), st.sampled_from([I64_MIN, I64_MAX, 2**63]))


@numba.njit
def hyp2(x, y):
    return x * x + y * y


# ---- the corpus ------------------------------------------------------------------------------

@task
def c_add(a: int, b: int) -> int:
    return a + b


@task
def c_sub(a: int, b: int) -> int:
    return a - b


@task
def c_mul(a: int, b: int) -> int:
    return a * b


@task
def c_floordiv(a: int, b: int) -> int:
    return a // b


@task
def c_mod(a: int, b: int) -> int:
    return a % b


@task
def c_truediv(a: int, b: int) -> float:
    return a / b


@task
def c_pow_int(a: int, b: int) -> float:
    return a ** b


@task
def c_neg_abs(a: int) -> int:
    return -a + abs(a) - abs(-a)


@task
def c_shifts(a: int, b: int) -> int:
    return (a << b) ^ (a >> b)


@task
def c_bits(a: int, b: int) -> int:
    return (a & b) | (a ^ ~b)


@task
def c_fadd(x: float, y: float) -> float:
    return x + y * 2.0 - x * y


@task
def c_fdiv(x: float, y: float) -> float:
    return x / y


@task
def c_ffloordiv_mod(x: float, y: float) -> float:
    return x // y + x % y


@task
def c_fpow(x: float, y: float) -> float:
    return x ** y


@task
def c_cbrt(x: float) -> float:
    return x ** (1 / 3)


@task
def c_square(x: float) -> float:
    return x ** 2


@task
def c_float_int_pow(x: float, n: int) -> float:
    return x ** n


@task
def c_const_pows(x: float) -> float:
    # constant exponents: what a compiler is tempted to turn into multiplications or sqrt
    return x ** 3 + x ** -1 + x ** 0.5 + x ** 2.0 + math.pow(x, 2.0) + math.pow(x, 3)


@task
def c_two_pow(x: float) -> float:
    return 2.0 ** x  # LLVM: pow(2.0, x) -> exp2(x)


@task
def c_mixed(a: int, x: float) -> float:
    return a * x + a / 2 - x


@task
def c_sqrt(x: float) -> float:
    return math.sqrt(x)


@task
def c_log(x: float) -> float:
    return math.log(x) + math.log2(x) - math.log10(x)


@task
def c_log1p_expm1(x: float) -> float:
    return math.log1p(x) + math.expm1(x)


@task
def c_exp(x: float) -> float:
    return math.exp(x)


@task
def c_trig(x: float) -> float:
    return math.sin(x) * math.cos(x) + math.tan(x)


@task
def c_inverse_trig(x: float) -> float:
    return math.asin(x) + math.acos(x) + math.atan(x)


@task
def c_hyperbolic(x: float) -> float:
    return math.sinh(x) - math.cosh(x) + math.tanh(x) + math.asinh(x)


@task
def c_atan2(x: float, y: float) -> float:
    return math.atan2(x, y) + math.copysign(1.0, y)


@task
def c_math_pow(x: float, y: float) -> float:
    return math.pow(x, y)


@task
def c_int(x: float) -> int:
    return int(x)


@task
def c_float(a: int) -> float:
    return float(a)


@task
def c_round(x: float) -> int:
    return round(x)


@task
def c_floor_ceil(x: float) -> int:
    return math.floor(x) - math.ceil(x) + math.trunc(x)


@task
def c_min_mixed(a: int, x: float):
    return min(a, x)


@task
def c_max3(a: int, b: int, x: float):
    return max(a, b, x)


@task
def c_eq_mixed(a: int, x: float) -> bool:
    return a == x


@task
def c_chain(a: int, x: float, b: int) -> bool:
    return a < x <= b


@task
def c_bool_logic(p: bool, q: bool, a: int) -> bool:
    return (p and not q) or (a % 3 == 0) or (p & q) or (p ^ q)


@task
def c_bool_arith(p: bool, q: bool) -> int:
    return p + q - (p * 3)


@task
def c_loop_sum(n: int) -> int:
    s = 0
    for i in range(n % 500):
        s += i * i
    return s


@task
def c_range_count(a: int, b: int) -> int:
    k = 0
    for _ in range(a, b):
        k += 1
        if k >= 20:
            break
    return k


@task
def c_range_step(a: int, b: int, s: int) -> int:
    k = 0
    for i in range(a, b, s):
        k += 1
        if k >= 20:
            return i
    return k


@task
def c_fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n % 200):
        a, b = b, a + b
    return a


@task
def c_fact(n: int) -> int:
    if n <= 1:
        return 1
    return n * c_fact(n - 1)


@task
def c_collatz(n: int) -> int:
    steps = 0
    while n > 1 and steps < 300:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


@task
def c_helper(x: float, y: float) -> float:
    return hyp2(x, y) + 1.0


@task
def c_divmod(a: int, b: int) -> int:
    q, r = divmod(a, b)
    return q * 7 + r


@task
def c_conditional(a: int) -> int:
    if a > 0:
        return a * 2
    return -a


@task
def c_poly(x: float, n: int) -> float:
    s = 0.0
    for k in range(n % 50):
        s = s * x + k
    return s


@task
def c_truth(x: float, a: int) -> int:
    r = 0
    if x:
        r += 1
    if not x:
        r += 2
    if bool(x) and a:
        r += 4
    return r + (3 if x and a else 5)


def _args(*strategies):
    return st.tuples(*strategies)


CORPUS = [
    (c_add, _args(INTS, INTS)), (c_sub, _args(INTS, INTS)), (c_mul, _args(INTS, INTS)),
    (c_floordiv, _args(INTS, INTS)), (c_mod, _args(INTS, INTS)), (c_truediv, _args(INTS, INTS)),
    (c_pow_int, _args(st.one_of(INTS, SMALL_INTS), SMALL_INTS)), (c_neg_abs, _args(INTS)),
    (c_shifts, _args(INTS, SMALL_INTS)), (c_bits, _args(INTS, INTS)),
    (c_fadd, _args(FLOATS, FLOATS)), (c_fdiv, _args(FLOATS, FLOATS)), (c_ffloordiv_mod, _args(FLOATS, FLOATS)),
    (c_fpow, _args(FLOATS, FLOATS)), (c_cbrt, _args(FLOATS)), (c_square, _args(FLOATS)),
    (c_float_int_pow, _args(FLOATS, SMALL_INTS)), (c_const_pows, _args(FLOATS)),
    (c_two_pow, _args(FLOATS)),
    (c_mixed, _args(INTS, FLOATS)), (c_sqrt, _args(FLOATS)), (c_log, _args(FLOATS)),
    (c_log1p_expm1, _args(FLOATS)), (c_exp, _args(FLOATS)), (c_trig, _args(FLOATS)),
    (c_inverse_trig, _args(FLOATS)), (c_hyperbolic, _args(FLOATS)), (c_atan2, _args(FLOATS, FLOATS)),
    (c_math_pow, _args(FLOATS, FLOATS)), (c_int, _args(FLOATS)), (c_float, _args(INTS)), (c_round, _args(FLOATS)),
    (c_floor_ceil, _args(FLOATS)), (c_min_mixed, _args(INTS, FLOATS)), (c_max3, _args(INTS, INTS, FLOATS)),
    (c_eq_mixed, _args(INTS, FLOATS)), (c_chain, _args(INTS, FLOATS, INTS)),
    (c_bool_logic, _args(BOOLS, BOOLS, INTS)), (c_bool_arith, _args(BOOLS, BOOLS)),
    (c_loop_sum, _args(INTS)), (c_range_count, _args(INTS, INTS)), (c_range_step, _args(INTS, INTS, INTS)),
    (c_fib, _args(INTS)), (c_fact, _args(FACT_N)), (c_collatz, _args(INTS)),
    (c_helper, _args(FLOATS, FLOATS)), (c_divmod, _args(INTS, INTS)), (c_conditional, _args(INTS)),
    (c_poly, _args(FLOATS, INTS)), (c_truth, _args(FLOATS, INTS)),
]
IDS = [f.__name__ for f, _ in CORPUS]


# ---- comparing -------------------------------------------------------------------------------

def outcome(f, args):
    try:
        return f(*args)
    except Exception as exc:
        return exc


def same(a, b):
    if isinstance(a, BaseException) or isinstance(b, BaseException):
        return type(a) is type(b)
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, complex):
        return same(a.real, b.real) and same(a.imag, b.imag)
    return a == b


_CTYPE = {"i": ctypes.c_int64, "f": ctypes.c_double, "b": ctypes.c_uint8}
_BOX = {"i": int, "f": float, "b": bool}
_TRAMPOLINE = ctypes.CFUNCTYPE(ctypes.c_int64, *([ctypes.c_void_p] * 10), ctypes.c_int64, ctypes.c_int64)


def native_call(spec, args):
    """One item through the trampoline: (status, value)."""
    cols = [_CTYPE[c](a) for c, a in zip(spec.codes, args, strict=True)]
    ptrs = [ctypes.cast(ctypes.pointer(c), ctypes.c_void_p) for c in cols] + [None] * (8 - len(cols))
    out, status = _CTYPE[spec.rcode](), ctypes.c_uint8(0)
    fn = _TRAMPOLINE(spec.address)
    failed = fn(*ptrs, ctypes.cast(ctypes.pointer(out), ctypes.c_void_p), ctypes.cast(ctypes.pointer(status),
                ctypes.c_void_p), 0, 1)
    return failed, _BOX[spec.rcode](out.value)


def fits(spec, args):
    return all(not (c == "i" and not I64_MIN <= a <= I64_MAX) for c, a in zip(spec.codes, args, strict=True))


NATIVE_OK: dict[str, int] = {}


def test_corpus_size_and_every_function_compiles():
    assert len(CORPUS) >= 30
    for f, _ in CORPUS:
        assert compiler.explain(f) is None, (f.__name__, compiler.explain(f))
        assert compiler.native_of(f).spec_for(tuple(type(x) for x in _example(f))) is not None, f.__name__


_EXAMPLES = {"c_max3": (1, 2, 2.5), "c_inverse_trig": (0.5,)}


def _example(f):
    """Ordinary arguments, for which the native code gives the answer itself."""
    codes = compiler.native_of(f).annotated
    return _EXAMPLES.get(f.__name__) or [{"i": 3, "f": 2.5, "b": True}[c] for c in codes]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("func, args_st", CORPUS, ids=IDS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_native_trampoline_equals_python(func, args_st, data):
    args = data.draw(args_st)
    spec = compiler.native_of(func).spec_for(tuple(_BOX[c] for c in compiler.native_of(func).annotated))
    want = outcome(func, args)
    if not fits(spec, args):
        return  # an int beyond int64 never reaches native code (the task runs as Python)
    failed, got = native_call(spec, args)
    if failed:
        return  # the engine runs the Python function for this call
    NATIVE_OK[func.__name__] = NATIVE_OK.get(func.__name__, 0) + 1
    assert not isinstance(want, BaseException), (func.__name__, args, got, want)
    assert same(got, want), (func.__name__, args, got, want)


def test_native_code_ran_for_ordinary_inputs():
    """Control for the test above: the native path is taken, not always the Python fallback."""
    for f, _ in CORPUS:
        spec = compiler.native_of(f).spec_for(tuple(_BOX[c] for c in compiler.native_of(f).annotated))
        failed, got = native_call(spec, _example(f))
        assert not failed, f.__name__
        assert same(got, f(*_example(f))), f.__name__


def _native_or_none(f, args):
    spec = compiler.native_of(f).spec_for(tuple(type(a) for a in args))
    failed, got = native_call(spec, args)
    return None if failed else got


def test_float_pow_is_c_pow():
    """float ** int and float ** float give CPython's float_pow result: C's pow of the exponent
    as a double. Natively x ** 2 was x*x (numba's powi; LLVM's pow(x, 2.0) -> x*x), one last bit
    off for x = 7831.298680487489, and 2.0 ** x was exp2(x) (-262.21667613550926)."""
    x = 7831.298680487489
    assert _native_or_none(c_square, [x]) == x ** 2 == 61329239.02300509
    assert _native_or_none(c_two_pow, [-262.21667613550926]) == 2.0 ** -262.21667613550926
    rng = random.Random(16)
    xs = [rng.uniform(-1e4, 1e4) for _ in range(3000)] + [rng.lognormvariate(0, 30) for _ in range(1000)]
    native = 0
    for x in xs:
        for f, args in ((c_square, [x]), (c_const_pows, [x]), (c_two_pow, [x / 20]),
                        (c_float_int_pow, [x, rng.randint(-9, 9)]),
                        (c_fpow, [x, rng.choice([2.0, 3.0, -1.0, 0.5, 7.0, -2.0, 1 / 3])]),
                        (c_math_pow, [x, rng.choice([2.0, 3.0, -1.0, 0.5])])):
            got, want = _native_or_none(f, args), outcome(f, args)
            if got is not None:
                native += 1
                assert same(got, want), (f.__name__, args, got, want)
    assert native > 12000  # the native code gave the answers, not the Python fallback


def test_float_pow_special_cases_are_cpythons():
    """CPython's special cases (x**0, 1**nan, nan, inf, signed zeros, negative bases with
    integral and fractional exponents, overflow, underflow): the native result where it gives one."""
    specials = [*SPECIAL_FLOATS, -1.5, -3.0, 2.0, -2.0, 7.0, -7.0, 1e-200, -1e-200, 1e200]
    native = 0
    for x in specials:
        for y in specials:
            for f, args in ((c_fpow, [x, y]), (c_math_pow, [x, y])):
                got, want = _native_or_none(f, args), outcome(f, args)
                if got is not None:
                    native += 1
                    assert not isinstance(want, BaseException), (f.__name__, args, got, want)
                    assert same(got, want), (f.__name__, args, got, want)
        for n in (0, 1, -1, 2, -2, 3, -3, 1023, -1075, 2**53 + 1, I64_MAX, I64_MIN):
            got, want = _native_or_none(c_float_int_pow, [x, n]), outcome(c_float_int_pow, [x, n])
            if got is not None:
                native += 1
                assert not isinstance(want, BaseException), (x, n, got, want)
                assert same(got, want), (x, n, got, want)
    assert native > 2000


@pytest.mark.timeout(600)
@pytest.mark.parametrize("func, args_st", CORPUS, ids=IDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_task_equals_python(compile_engine, func, args_st, data):
    args = data.draw(args_st)
    want = outcome(func, args)
    assert compiler.precompile(func) is None
    r = compile_engine.add_task(func, *args)
    try:
        got = r.wait(60)
    except Exception as exc:
        got = exc
    assert same(got, want), (func.__name__, args, got, want)


# ---- the issue's examples, one by one ------------------------------------------------------

@task
def i_sqrt(x: float) -> float:
    return math.sqrt(x)


@task
def i_log(x: float) -> float:
    return math.log(x)


@task
def i_exp(x: float) -> float:
    return math.exp(x)


@task
def i_int(x: float) -> int:
    return int(x)


@task
def i_floor(x: float) -> int:
    return math.floor(x)


@task
def i_round(x: float) -> int:
    return round(x)


@task
def i_pow(a: int, b: int) -> float:
    return a ** b


@task
def i_min(a: int, b: float):
    return min(a, b)


@task
def i_cbrt(x: float) -> float:
    return x ** (1 / 3)


@task
def i_fact(n: int) -> int:
    r = 1
    for k in range(2, n + 1):
        r *= k
    return r


@task
def i_abs(a: int) -> int:
    return abs(a)


@task
def i_eq(a: int, b: float) -> bool:
    return a == b


@task
def i_range(a: int, b: int) -> int:
    n = 0
    for _ in range(a, b):
        n += 1
        if n > 5:
            break
    return n


@pytest.mark.parametrize("func, args", [
    (i_sqrt, (-1.0,)), (i_log, (0.0,)), (i_exp, (1000.0,)), (i_int, (math.nan,)), (i_int, (1e300,)),
    (i_floor, (1e30,)), (i_round, (math.inf,)), (i_pow, (2, -1)), (i_min, (1, 2.5)), (i_cbrt, (-8.0,)),
    (i_fact, (25,)), (i_abs, (I64_MIN,)), (i_eq, (I64_MAX, 2.0**63)), (i_range, (2, I64_MIN + 1)),
], ids=lambda v: getattr(v, "__name__", None))
def test_issue_examples_give_pythons_answer(compile_engine, func, args):
    """Each returned a different value natively before (nan, -inf, inf, INT64_MIN, 0, 1.0, a
    wrapped int, True, a count of 2**63)."""
    assert compiler.precompile(func) is None
    want = outcome(func, args)
    r = compile_engine.add_task(func, *args)
    try:
        got = r.wait(60)
    except Exception as exc:
        got = exc
    assert r.get_stats()["native"]
    assert same(got, want), (got, want)


@task
def mixed_result(c: int):
    if c > 0:
        return 1
    return 1.5


@task
def int_accumulator(x: float, n: int) -> float:
    s = 0
    for _ in range(n):
        s += x
    return s


def test_mixed_types_are_refused_with_the_rule():
    assert "its result is" in compiler.explain(mixed_result, (int,))
    why = compiler.explain(int_accumulator)
    assert "the variable 's'" in why and "write 0.0" in why
    assert mixed_result(1) == 1 and type(mixed_result(1)) is int


def test_constructs_that_cannot_be_checked_are_refused():
    def catches(a: int) -> int:
        try:
            return a * a
        except OverflowError:
            return 0

    def greet(name):
        return "hi " + name

    def rounds(x: float) -> float:
        return round(x, 2)

    def gamma(x: float) -> float:
        return math.gamma(x)

    def huge(a: int) -> int:
        return a + 18446744073709551616

    assert "catches exceptions" in compiler.explain(catches)
    assert "str constant 'hi '" in compiler.explain(greet)
    assert "round() with 2 argument(s)" in compiler.explain(rounds)
    assert "math.gamma" in compiler.explain(gamma)
    assert "beyond int64" in compiler.explain(huge)


def test_a_source_file_edited_after_import_is_not_compiled(tmp_path, monkeypatch):
    """The native code comes from the source: when the file no longer matches the function's
    bytecode (a deploy edited it), the function runs as Python rather than the new source."""
    import importlib
    import linecache

    mod = tmp_path / "edited_task_mod.py"
    mod.write_text("def f(a: int, b: int) -> int:\n    return a + b\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = importlib.import_module("edited_task_mod")
    assert compiler.explain(m.f) is None
    mod.write_text("def f(a: int, b: int) -> int:\n    return a - b\n")
    linecache.checkcache(str(mod))
    g = type(m.f)(m.f.__code__, m.f.__globals__, "f")   # a new function object: no cached rewrite
    assert "source file differs" in compiler.explain(g)
