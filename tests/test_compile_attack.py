"""Attacks on compiled tasks (issue 16, items 1, 4, 5): inputs and constructs for which a
compiled task could return something the Python function does not.

Each function is defined at module level (its source is what gets compiled) and compiled once.
"""

from __future__ import annotations

import math
import sys

import pytest

from catzilla_tasks import compiler, task

numba = pytest.importorskip("numba", reason="the [compile] extra (numba) is part of the test extra")

pytestmark = pytest.mark.usefixtures("compile_cache_dir")


def outcome(f, args):
    try:
        return f(*args)
    except Exception as exc:
        return exc


def run_task(engine, f, args):
    r = engine.add_task(f, *args)
    try:
        got = r.wait(60)
    except Exception as exc:
        got = exc
    return got, r.get_stats()


def same(a, b):
    if isinstance(a, BaseException) or isinstance(b, BaseException):
        return type(a) is type(b)
    return type(a) is type(b) and a == b


# ---- a variable read before it is assigned: Python raises UnboundLocalError --------------------

@task
def unbound_after_if(a: int) -> int:
    if a > 0:
        y = a * 2
    return y  # unbound when a <= 0, on purpose


@task
def unbound_loop_var(n: int) -> int:
    for i in range(n):  # noqa: B007 - i is read after the loop: the case under test
        pass
    return i  # unbound when the range is empty, on purpose


@task
def bound_on_every_path(a: int) -> int:
    if a > 0:
        y = a * 2
    else:
        y = -a
    for i in range(3):
        y += i
    return y


@pytest.mark.parametrize("func, args", [(unbound_after_if, (-1,)), (unbound_loop_var, (0,))],
                         ids=lambda v: getattr(v, "__name__", None))
def test_a_variable_maybe_unbound_is_not_compiled(compile_engine, func, args):
    """numba reads an unassigned variable as 0 (its SSA form starts it as null): the task
    returned 0 natively where Python raises UnboundLocalError."""
    assert isinstance(outcome(func, args), UnboundLocalError)
    why = compiler.explain(func)
    assert why is not None and "before it is assigned" in why, why
    assert compiler.precompile(func) is not None
    got, stats = run_task(compile_engine, func, args)
    assert isinstance(got, UnboundLocalError), got
    assert not stats["native"]


def test_a_variable_assigned_on_every_path_still_compiles(compile_engine):
    assert compiler.explain(bound_on_every_path) is None
    assert compiler.precompile(bound_on_every_path) is None
    got, stats = run_task(compile_engine, bound_on_every_path, (-4,))
    assert got == 7 and stats["native"]


# ---- a global the task reads is rebound after it was compiled ----------------------------------

@numba.njit
def att_helper(x):
    return x + 1


@task
def uses_att_helper(a: int) -> int:
    return att_helper(a) * 2


@task
def uses_abs(a: int) -> int:
    return abs(a) + 1


def test_a_helper_rebound_after_compiling_is_followed(compile_engine, monkeypatch):
    """The native version called the helper it was compiled with: after the module rebound
    the name (a deploy's reload, a test's monkeypatch), Python called the new helper and the
    task still returned the old one's answer (4 instead of 202)."""
    assert compiler.precompile(uses_att_helper) is None
    got, stats = run_task(compile_engine, uses_att_helper, (1,))
    assert got == 4 and stats["native"]
    monkeypatch.setattr(sys.modules[__name__], "att_helper", numba.njit(lambda x: x + 100))
    assert uses_att_helper(1) == 202
    got, _ = run_task(compile_engine, uses_att_helper, (1,))
    assert got == 202
    assert compiler.precompile(uses_att_helper) is None  # compiled again, for the new helper
    got, stats = run_task(compile_engine, uses_att_helper, (1,))
    assert got == 202 and stats["native"]


def test_a_builtin_shadowed_after_compiling_is_followed(compile_engine, monkeypatch):
    """abs() was compiled as the builtin; a module global named abs defined later (a numba
    function, which a task may call) is what Python then calls."""
    assert compiler.precompile(uses_abs) is None
    got, stats = run_task(compile_engine, uses_abs, (-3,))
    assert got == 4 and stats["native"]
    monkeypatch.setattr(sys.modules[__name__], "abs", numba.njit(lambda x: 40), raising=False)
    assert uses_abs(-3) == 41
    got, _ = run_task(compile_engine, uses_abs, (-3,))
    assert got == 41
    assert compiler.precompile(uses_abs) is None
    got, stats = run_task(compile_engine, uses_abs, (-3,))
    assert got == 41 and stats["native"]


@task
def uses_round(x: float) -> int:
    return round(x) * 2


def test_explain_after_a_rebinding_compiles_the_current_globals(compile_engine, monkeypatch):
    """explain() compiled from the rewrite cached before the rebinding (round() as the
    builtin), and the task's next compile found that version in the compiler's cache."""
    assert compiler.precompile(uses_round) is None
    assert run_task(compile_engine, uses_round, (2.5,))[0] == 4
    monkeypatch.setattr(sys.modules[__name__], "round", numba.njit(lambda x: 7), raising=False)
    assert uses_round(2.5) == 14
    assert compiler.explain(uses_round) is None
    got, stats = run_task(compile_engine, uses_round, (2.5,))
    assert got == 14, stats
    assert compiler.precompile(uses_round) is None
    got, stats = run_task(compile_engine, uses_round, (2.5,))
    assert got == 14 and stats["native"]


# ---- tasks.map(out="array"): a result Python gives of another type ------------------------------

@task
def int_pow(a: int, b: int):
    return a ** b


def int_pow_python(a, b):
    return a ** b


def test_map_out_array_takes_the_type_python_gives(compile_engine):
    """out='array' sized for the compiled result (int64): an item whose Python result is a
    float (2 ** -1, run as Python) made map raise memoryview's TypeError, where the same map of
    the Python function returns array('d', [8.0, 0.5])."""
    items = [(2, 3), (2, -1)]
    want = compile_engine.map(int_pow_python, items, out="array")
    assert compiler.precompile(int_pow, (int, int)) is None
    got = compile_engine.map(int_pow, items, out="array")
    assert got.typecode == want.typecode == "d" and list(got) == list(want) == [8.0, 0.5]
    # results that fit stay in the compiled result's array
    assert compile_engine.map(int_pow, [(2, 3), (3, 2)], out="array").typecode == "q"


# ---- a source file edited after import ---------------------------------------------------------

@pytest.mark.parametrize("old, new", [("1", "1.0"), ("1", "True"), ("0.0", "-0.0")])
def test_an_edit_to_a_constant_of_another_type_is_seen(tmp_path, monkeypatch, old, new):
    """The check that the source is the code that runs compared the constants with ==, and
    1 == 1.0 == True, 0.0 == -0.0: a file edited from `a + 1` to `a + 1.0` after import was
    compiled from the new text (returning 3.0 where the running function returns 3)."""
    import importlib
    import linecache

    name = f"edited_const_{abs(hash((old, new)))}"
    mod = tmp_path / f"{name}.py"
    mod.write_text(f"def f(a: int):\n    return a + {old}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = importlib.import_module(name)
    mod.write_text(f"def f(a: int):\n    return a + {new}\n")
    linecache.checkcache(str(mod))
    assert "source file differs" in (compiler.explain(m.f) or "")


# ---- compile_to_c="require" on a recursive task ---------------------------------------------------

REQUIRED_RECURSIVE = '''
from catzilla_tasks import task


@task(compile_to_c="require")
def fact(n: int) -> int:
    if n <= 1:
        return 1
    return n * fact(n - 1)


class Holder:
    @task
    def method_like(n: int) -> int:  # its name is not a global: Python raises NameError
        return 1 if n <= 1 else method_like(n - 1)  # noqa: F821
'''


def test_require_compiles_a_recursive_task_at_decoration(compile_engine, tmp_path, monkeypatch):
    """@task(compile_to_c="require") compiles an annotated task while the decorator runs,
    before the module binds its name: a recursive one raised CompileError ("its module has
    not defined" it) at import, though it compiles."""
    import importlib

    (tmp_path / "required_recursive_mod.py").write_text(REQUIRED_RECURSIVE)
    monkeypatch.syspath_prepend(str(tmp_path))
    m = importlib.import_module("required_recursive_mod")
    got, stats = run_task(compile_engine, m.fact, (10,))
    assert got == 3628800 and stats["native"]
    got, stats = run_task(compile_engine, m.fact, (25,))  # beyond int64: run as Python
    assert got == 15511210043330985984000000
    # a function whose name is not a module global still runs as Python (NameError)
    assert compiler.explain(m.Holder.method_like) is not None
    assert isinstance(run_task(compile_engine, m.Holder.method_like, (3,))[0], NameError)


# ---- the hostile list: edge inputs through add_task, each compared with Python ----------------

@task
def h_bool_arith(p: bool, q: bool):
    return (p + q) * 10 + (-p) + (p / 2) + (p // 1) - (q % 2) + (p ** q) + (~q)


@task
def h_chain(a: int, x: float, b: int) -> bool:
    return a < x <= b != a == a  # noqa: PLR0124 - a chain through a repeated operand


@task
def h_float_signs(x: float, y: float) -> float:
    return (x % y) * 1000.0 + (x // y) + abs(x) - math.copysign(math.fabs(y), x)


@task
def h_int_signs(a: int, b: int) -> int:
    q, r = divmod(a, b)
    a //= b
    return q * 1000 + r + a


@task
def h_round(x: float) -> int:
    return round(x) * 10 + int(x) + math.floor(x) - math.ceil(x)


@task
def h_atan2(y: float, x: float) -> float:
    return math.atan2(y, x) + math.pow(x, y)


@task
def h_float_counter(x: float) -> int:
    t = 0.0
    n = 0
    while t < x and n < 100:
        t += 0.1
        n += 1
    return n


@task
def h_early_exit(n: int) -> int:
    for i in range(n):
        if i * i >= n:
            return i
    return -1


@task
def h_not_ternary(a: int, x: float) -> float:
    return (-x if not a else x * 2.0) if x != x or a else x / 3.0  # noqa: PLR0124 - nan test


I64 = 2**63 - 1
HOSTILE = [
    (h_bool_arith, [(True, True), (True, False), (False, True), (False, False)]),
    (h_chain, [(1, 1.5, 2), (2**53 + 1, 2.0**53, 2**53 + 1), (I64, 2.0**63, I64), (0, -0.0, 0), (1, math.nan, 2)]),
    (h_float_signs, [(-7.5, 2.0), (7.5, -2.0), (-0.0, 1.0), (0.0, -1.0), (-1e-300, 1.0), (5.0, math.inf),
                     (1.0, 0.0), (math.nan, 1.0), (-0.0, -0.0)]),
    (h_int_signs, [(-7, 2), (7, -2), (-7, -2), (0, -3), (-(2**63), -1), (5, 0), (I64, 1), (-(2**63), 3)]),
    (h_round, [(2.5,), (-0.5,), (0.5,), (-2.5,), (1.5,), (-0.0,), (0.49999999999999994,), (4503599627370497.0,),
               (math.inf,), (math.nan,), (2.0**63,), (-(2.0**63),), (1e300,)]),
    (h_atan2, [(0.0, 0.0), (-0.0, 0.0), (0.0, -0.0), (-0.0, -0.0), (1.0, -math.inf), (math.nan, 1.0), (-1.0, -8.0)]),
    (h_float_counter, [(0.0,), (0.3,), (1.0,), (math.inf,), (math.nan,), (-1.0,)]),
    (h_early_exit, [(0,), (1,), (10,), (-5,), (99,)]),
    (h_not_ternary, [(0, 1.0), (1, 1.0), (0, math.nan), (0, -0.0), (2, math.inf), (0, 0.0)]),
]


@pytest.mark.parametrize("func, inputs", HOSTILE, ids=[f.__name__ for f, _ in HOSTILE])
def test_hostile_inputs_give_pythons_answer(compile_engine, func, inputs):
    assert compiler.precompile(func) is None, compiler.explain(func)
    for args in inputs:
        want = outcome(func, args)
        got, _ = run_task(compile_engine, func, args)
        assert same_value(got, want), (func.__name__, args, got, want)


def same_value(a, b):
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return same(a, b)


# ---- a bound method of a compiled task ------------------------------------------------------------

class Scaler:
    @task
    def scaled(self, a):
        return a * 2


@task(compile_to_c="require")
def _required_double(a: int) -> int:
    return a * 2


class RequiredHolder:
    double = _required_double


def test_a_bound_method_never_runs_the_functions_native_code(compile_engine):
    """add_task(obj.method, 5, 6): the engine found the function's compiled version through
    the method and ran it with the arguments as given (self=5, a=6 -> 12), where Python raises
    TypeError (obj.method takes one argument)."""
    assert compiler.precompile(Scaler.scaled, (int, int)) is None
    obj = Scaler()
    assert isinstance(outcome(obj.scaled, (5, 6)), TypeError)
    got, stats = run_task(compile_engine, obj.scaled, (5, 6))
    assert isinstance(got, TypeError), got
    got, stats = run_task(compile_engine, obj.scaled, (21,))
    assert got == 42 and not stats["native"]


def test_require_refuses_a_bound_method(compile_engine):
    """A method runs as Python (self is an object): "require" says so at every call."""
    for _ in range(2):
        with pytest.raises(compiler.CompileError, match="bound method"):
            compile_engine.add_task(RequiredHolder().double)
        with pytest.raises(compiler.CompileError, match="bound method"):
            compile_engine.map(RequiredHolder().double, [(), ()])
