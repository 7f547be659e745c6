"""The math functions a compiled task may call: one list for the compiler's eligibility rules
(which must not import numba) and the checked operations of ``_checked.py`` (which do).

MATH1/MATH2: functions whose CPython implementation is the C library's (glibc) function plus
error checks, as numba's: the same double. Others (hypot, gamma, fsum, log(x, base), ...) are
computed differently by CPython and are not compiled.
"""

MATH1 = (
    "sqrt",
    "exp",
    "expm1",
    "log",
    "log2",
    "log10",
    "log1p",
    "sin",
    "cos",
    "tan",
    "asin",
    "acos",
    "atan",
    "sinh",
    "cosh",
    "tanh",
    "asinh",
    "acosh",
    "atanh",
    "fabs",
    "erf",
    "erfc",
)
MATH2 = ("atan2", "copysign", "pow")
MATH_INT = ("floor", "ceil", "trunc")
MATH_PRED = ("isnan", "isinf", "isfinite")
