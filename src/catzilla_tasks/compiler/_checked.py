"""Checked operations for compiled tasks (numba, nopython): Python's result, or an exception.

The compiler (``rewrite.py``) rewrites a task's source so that every arithmetic operation, comparison and
numeric builtin or ``math`` call goes through one of the ``ck_*`` functions below. Each gives
exactly the value Python gives, of the type Python gives, or raises ``ArithmeticError`` when it
cannot be sure to: an int result beyond int64, an int/float comparison beyond 2**53, a ``math``
domain or range error, a division by zero, an int ``**`` a negative exponent (a float in
Python)... The trampoline catches every exception raised in native code and the engine then
runs the Python function for that call, so a rare input costs a Python call and never a wrong
answer. Imported only when compiling (it imports numba).
"""

from __future__ import annotations

import math

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ._math_names import MATH1, MATH2, MATH_INT

INT_MIN = -(2**63)
TWO53 = 2**53
F_INT_LIMIT = 9223372036854775808.0  # 2.0**63: floats in [-2**63, 2**63) convert to int64


def _kind(t: types.Type) -> str | None:
    if isinstance(t, types.Boolean):
        return "b"
    if isinstance(t, types.Integer) and t.signed:
        return "i"
    if isinstance(t, types.Float):
        return "f"
    return None


def _overflow_op(method: str):
    @intrinsic
    def op(typingctx, a, b):
        sig = types.Tuple((types.int64, types.boolean))(types.int64, types.int64)

        def codegen(context, builder, signature, args):
            pair = getattr(builder, method)(args[0], args[1])
            return context.make_tuple(
                builder, signature.return_type, [builder.extract_value(pair, 0), builder.extract_value(pair, 1)]
            )

        return sig, codegen

    return op


_sadd = _overflow_op("sadd_with_overflow")
_ssub = _overflow_op("ssub_with_overflow")
_smul = _overflow_op("smul_with_overflow")


@njit(inline="always")
def _add(x, y):
    r, o = _sadd(x, y)
    if o:
        raise ArithmeticError
    return r


@njit(inline="always")
def _sub(x, y):
    r, o = _ssub(x, y)
    if o:
        raise ArithmeticError
    return r


@njit(inline="always")
def _mul(x, y):
    r, o = _smul(x, y)
    if o:
        raise ArithmeticError
    return r


@njit(inline="always")
def _i(x):
    return types.int64(x)


# ---- the stubs the rewritten source calls; numba picks an implementation per argument types


def ck_add(a, b): ...
def ck_sub(a, b): ...
def ck_mul(a, b): ...
def ck_truediv(a, b): ...
def ck_floordiv(a, b): ...
def ck_mod(a, b): ...
def ck_pow(a, b): ...
def ck_lshift(a, b): ...
def ck_rshift(a, b): ...
def ck_and(a, b): ...
def ck_or(a, b): ...
def ck_xor(a, b): ...
def ck_eq(a, b): ...
def ck_ne(a, b): ...
def ck_lt(a, b): ...
def ck_le(a, b): ...
def ck_gt(a, b): ...
def ck_ge(a, b): ...
def ck_neg(a): ...
def ck_pos(a): ...
def ck_inv(a): ...
def ck_abs(a): ...
def ck_int(a): ...
def ck_float(a): ...
def ck_round(a): ...
def ck_min(a, b): ...
def ck_max(a, b): ...
def ck_divmod(a, b): ...
def ck_index(a): ...
def ck_span(start, stop, step): ...
def ck_step(a): ...
def ck_floor(a): ...
def ck_ceil(a): ...
def ck_trunc(a): ...


def _binary(stub, ints=None, floats=None, bools=None):
    """Register the implementations of a binary stub: ints (int or bool operands), floats
    (at least one float), bools (both bool; else ints); None where Python's type differs."""

    @overload(stub)
    def ol(a, b):
        ka, kb = _kind(a), _kind(b)
        if ka is None or kb is None:
            return None
        if ka == kb == "b" and bools is not None:
            return bools
        if "f" in (ka, kb):
            return floats
        return ints

    return ol


# + - *
_binary(ck_add, lambda a, b: _add(_i(a), _i(b)), lambda a, b: float(a) + float(b))
_binary(ck_sub, lambda a, b: _sub(_i(a), _i(b)), lambda a, b: float(a) - float(b))
_binary(ck_mul, lambda a, b: _mul(_i(a), _i(b)), lambda a, b: float(a) * float(b))


def _truediv_i(a, b):
    x, y = _i(a), _i(b)
    # beyond 2**53 an int is rounded on its way to float: Python divides the exact ints
    if y == 0 or x > TWO53 or x < -TWO53 or y > TWO53 or y < -TWO53:
        raise ArithmeticError
    return float(x) / float(y)


def _truediv_f(a, b):
    y = float(b)
    if y == 0.0:
        raise ArithmeticError
    return float(a) / y


_binary(ck_truediv, _truediv_i, _truediv_f)


def _floordiv_i(a, b):
    x, y = _i(a), _i(b)
    if y == 0 or (y == -1 and x == INT_MIN):
        raise ArithmeticError
    return x // y


def _floordiv_f(a, b):
    x, y = float(a), float(b)
    if y == 0.0 or not (math.isfinite(x) and math.isfinite(y)):
        raise ArithmeticError
    return x // y


def _mod_i(a, b):
    x, y = _i(a), _i(b)
    if y == 0 or (y == -1 and x == INT_MIN):
        raise ArithmeticError
    return x % y


def _mod_f(a, b):
    x, y = float(a), float(b)
    if y == 0.0 or not (math.isfinite(x) and math.isfinite(y)):
        raise ArithmeticError
    return x % y


_binary(ck_floordiv, _floordiv_i, _floordiv_f)
_binary(ck_mod, _mod_i, _mod_f)


def _pow_i(a, b):
    base, e = _i(a), _i(b)
    if e < 0:  # Python's result is a float
        raise ArithmeticError
    r = _i(1)
    while e:
        if e & 1:
            r = _mul(r, base)
        e >>= 1
        if e:
            base = _mul(base, base)
    return r


@intrinsic
def _libm_pow(typingctx, x, y):
    """The C library's pow(x, y), as CPython calls it. Not numba's math.pow: LLVM treats a call
    of ``pow`` as the exact function and rewrites pow(x, 2.0) to x*x and pow(x, (double)n) to
    powi (repeated multiplication), which differ from the C library's pow in the last bit. A
    declaration marked nobuiltin is an ordinary external function to LLVM, called as is."""
    sig = types.float64(types.float64, types.float64)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.DoubleType(), [ir.DoubleType(), ir.DoubleType()])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "pow")
        fn.attributes.add("nobuiltin")
        return builder.call(fn, args)

    return sig, codegen


def _pow_f(a, b):
    # CPython's float_pow: the exponent (an int too) converted to double, then C's pow. Its own
    # special cases (x**0, 1**y, nan, inf, 0 and negative bases) give what C99's pow gives, and
    # for a negative base and an integral exponent pow(-x, y) is -pow(x, y) or pow(x, y), as
    # CPython computes it; what pow gives and Python does not is an error in Python:
    x, y = float(a), float(b)
    r = _libm_pow(x, y)
    # nan from numbers: a complex result in Python; inf from finite numbers: OverflowError or
    # ZeroDivisionError (0.0 ** -1)
    if (r != r and x == x and y == y) or (math.isinf(r) and math.isfinite(x) and math.isfinite(y)):
        raise ArithmeticError
    return r


_binary(ck_pow, _pow_i, _pow_f)


def _lshift_i(a, b):
    x, y = _i(a), _i(b)
    if y < 0:
        raise ArithmeticError
    if x == 0:
        return x
    if y >= 63:
        raise ArithmeticError
    r = x << y
    if (r >> y) != x:
        raise ArithmeticError
    return r


def _rshift_i(a, b):
    x, y = _i(a), _i(b)
    if y < 0:
        raise ArithmeticError
    if y >= 63:
        return _i(-1) if x < 0 else _i(0)
    return x >> y


_binary(ck_lshift, _lshift_i)
_binary(ck_rshift, _rshift_i)
_binary(ck_and, lambda a, b: _i(a) & _i(b), None, lambda a, b: a and b)
_binary(ck_or, lambda a, b: _i(a) | _i(b), None, lambda a, b: a or b)
_binary(ck_xor, lambda a, b: _i(a) ^ _i(b), None, lambda a, b: a != b)


# ---- comparisons: exact between ints and floats (Python compares the exact values)


def _compare(stub, op):
    g = {"math": math, "TWO53": TWO53, "_i": _i}
    src = f"""
def same(a, b):
    return a {op} b
def int_float(a, b):
    x = _i(a)
    if x > TWO53 or x < -TWO53:
        raise ArithmeticError
    return float(x) {op} b
def float_int(a, b):
    y = _i(b)
    if y > TWO53 or y < -TWO53:
        raise ArithmeticError
    return a {op} float(y)
def ints(a, b):
    return _i(a) {op} _i(b)
"""
    exec(src, g)  # noqa: S102 - our template; op is one of the six comparison operators listed below

    @overload(stub)
    def ol(a, b):
        ka, kb = _kind(a), _kind(b)
        if ka is None or kb is None:
            return None
        if ka == kb:
            return g["same"]
        if kb == "f":
            return g["int_float"]
        if ka == "f":
            return g["float_int"]
        return g["ints"]


for _stub, _op in ((ck_eq, "=="), (ck_ne, "!="), (ck_lt, "<"), (ck_le, "<="), (ck_gt, ">"), (ck_ge, ">=")):
    _compare(_stub, _op)


# ---- unary operators and builtins


def _unary(stub, ints=None, floats=None, bools=None):
    @overload(stub)
    def ol(a):
        k = _kind(a)
        if k == "b" and bools is not None:
            return bools
        return {"i": ints, "b": ints, "f": floats}.get(k)  # type: ignore[arg-type]

    return ol


def _neg_i(a):
    x = _i(a)
    if x == INT_MIN:
        raise ArithmeticError
    return -x


_unary(ck_neg, _neg_i, lambda a: -a)
_unary(ck_pos, lambda a: _i(a), lambda a: a)
_unary(ck_inv, lambda a: ~_i(a))


def _abs_i(a):
    x = _i(a)
    if x == INT_MIN:
        raise ArithmeticError
    return x if x >= 0 else -x


_unary(ck_abs, _abs_i, lambda a: math.fabs(a))


def _int_f(a):
    if not (-F_INT_LIMIT <= a < F_INT_LIMIT):  # nan, inf (ValueError, OverflowError) or beyond int64
        raise ArithmeticError
    return _i(a)


_unary(ck_int, lambda a: _i(a), _int_f)
_unary(ck_float, lambda a: float(a), lambda a: a)


def _round_f(a):
    if not (-F_INT_LIMIT <= a < F_INT_LIMIT):
        raise ArithmeticError
    y = math.floor(a)  # int64: in range
    d = a - float(y)  # exact: the fraction of a float below 2**63
    if d > 0.5 or (d == 0.5 and y % 2 != 0):  # halves go to the even neighbour, as Python
        y += 1
    return y


_unary(ck_round, lambda a: _i(a), _round_f)


def _floor_f(a):
    if not (-F_INT_LIMIT <= a < F_INT_LIMIT):
        raise ArithmeticError
    return math.floor(a)


def _ceil_f(a):
    if not (-F_INT_LIMIT <= a < F_INT_LIMIT):
        raise ArithmeticError
    r = math.ceil(a)
    return r


def _trunc_f(a):
    if not (-F_INT_LIMIT <= a < F_INT_LIMIT):
        raise ArithmeticError
    return _i(a)


_unary(ck_floor, lambda a: _i(a), _floor_f)
_unary(ck_ceil, lambda a: _i(a), _ceil_f)
_unary(ck_trunc, lambda a: _i(a), _trunc_f)
_unary(ck_index, lambda a: _i(a))  # range() arguments: ints only (a float is Python's TypeError)


@overload(ck_step)
def _ol_step(a):
    if _kind(a) in ("i", "b"):

        def impl(a):
            if a == 0:  # ValueError in Python
                raise ArithmeticError
            return _i(a)

        return impl
    return None


@overload(ck_span)
def _ol_span(start, stop, step):
    if all(_kind(t) in ("i", "b") for t in (start, stop, step)):

        def impl(start, stop, step):
            # numba counts the items as (stop - start) / step: refuse a span beyond int64
            d = _sub(_i(stop), _i(start))
            if d == INT_MIN and step == -1:
                raise ArithmeticError
            return _i(start)

        return impl
    return None


def _minmax(stub, pick_b):
    """min/max of two: Python keeps the first unless the second is strictly smaller (larger);
    when the winner's type is not the one numba gives the result, Python's answer cannot be
    represented: raise (the call runs as Python)."""

    @overload(stub)
    def ol(a, b):
        ka, kb = _kind(a), _kind(b)
        if ka is None or kb is None:
            return None
        if ka == kb:
            return lambda a, b: b if pick_b(b, a) else a
        rank = {"b": 0, "i": 1, "f": 2}
        if rank[kb] > rank[ka]:

            def impl(a, b):
                if pick_b(b, a):
                    return b
                raise ArithmeticError

            return impl

        def impl2(a, b):
            if pick_b(b, a):
                raise ArithmeticError
            return a

        return impl2


_minmax(ck_min, njit(inline="always")(lambda b, a: ck_lt(b, a)))
_minmax(ck_max, njit(inline="always")(lambda b, a: ck_gt(b, a)))


@overload(ck_divmod)
def _ol_divmod(a, b):
    if _kind(a) is None or _kind(b) is None:
        return None
    return lambda a, b: (ck_floordiv(a, b), ck_mod(a, b))


# ---- math: the libm function CPython calls, with its domain and range errors detected


def _math1(name: str):
    g = {"math": math}
    src = f"""
def f(a):
    x = float(a)
    r = math.{name}(x)
    if (r != r and x == x) or (math.isinf(r) and math.isfinite(x)):
        raise ArithmeticError
    return r
"""
    exec(src, g)  # noqa: S102 - our template; name is from this module's MATH1/MATH2 tuples
    stub = globals()[f"ck_math_{name}"] = lambda a: None
    _unary(stub, g["f"], g["f"], g["f"])


def _math2(name: str):
    g = {"math": math, "_libm_pow": _libm_pow}
    # math.pow is C's pow for finite operands, as ** (see _libm_pow)
    call = "_libm_pow" if name == "pow" else f"math.{name}"
    src = f"""
def f(a, b):
    x, y = float(a), float(b)
    r = {call}(x, y)
    if (r != r and x == x and y == y) or (math.isinf(r) and math.isfinite(x) and math.isfinite(y)):
        raise ArithmeticError
    return r
"""
    exec(src, g)  # noqa: S102 - our template; name is from this module's MATH1/MATH2 tuples
    stub = globals()[f"ck_math_{name}"] = lambda a, b: None
    _binary(stub, g["f"], g["f"], g["f"])


# (the lists live in _math_names, which the compiler reads without importing numba)

for _name in MATH1:
    _math1(_name)
for _name in MATH2:
    _math2(_name)
for _name in MATH_INT:
    globals()[f"ck_math_{_name}"] = globals()[f"ck_{_name}"]


def helpers() -> dict[str, object]:
    """The names the rewritten source uses, for its globals."""
    return {f"_ct_{k}": v for k, v in globals().items() if k.startswith("ck_")}
