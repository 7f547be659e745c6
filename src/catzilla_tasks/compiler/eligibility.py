"""Whether a function can be compiled, and if not, why: the rules read from its code alone
(``_static_reason``: no numba needed), its annotations (``_annotated_codes``) and, once numba
has typed it, the checks of that typing (``_maybe_unbound``, ``_mixed_kinds``). Every refusal
is a sentence ``explain(func)`` shows. The rewrite's own refusals are ``rewrite.py``'s."""

from __future__ import annotations

import builtins
import dis
import importlib.util
import inspect
import types
from typing import Any

from ._common import _CODES, MAX_ARGS, _Cannot, _is_exception_class, _is_numba_dispatcher
from .rewrite import _rewrite

# Builtins numba compiles for numbers; anything else named here is refused with its reason.
_ALLOWED_BUILTINS = frozenset({"range", "abs", "min", "max", "int", "float", "bool", "round", "divmod", "pow"})
_IO_BUILTINS = frozenset(
    {"print", "open", "input", "exec", "eval", "compile", "__import__", "breakpoint", "globals", "locals", "vars"}
)
_ALLOWED_MODULES = frozenset({"math"})
_OBJECT_OPS = {
    "BUILD_LIST": "builds a list",
    "BUILD_SET": "builds a set",
    "BUILD_MAP": "builds a dict",
    "BUILD_CONST_KEY_MAP": "builds a dict",
    "BUILD_STRING": "builds a string",
    "FORMAT_VALUE": "formats a string",
    "LIST_APPEND": "builds a list",
    "SET_ADD": "builds a set",
    "MAP_ADD": "builds a dict",
    "LIST_EXTEND": "builds a list",
    "DICT_UPDATE": "builds a dict",
    "DICT_MERGE": "builds a dict",
    "STORE_GLOBAL": "assigns a global variable",
    "DELETE_GLOBAL": "deletes a global variable",
    "IMPORT_NAME": "imports a module inside the task",
    "MAKE_FUNCTION": "defines a function or comprehension inside the task",
    "YIELD_VALUE": "is a generator",
    "STORE_ATTR": "sets an attribute",
    "STORE_SUBSCR": "stores into a container",
}


def _numba_missing() -> str | None:
    try:
        found = importlib.util.find_spec("numba") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["numba"] = None
        found = False
    if not found:
        return (
            "the compiler is missing: numba is not installed (pip install 'catzilla-tasks[compile]'); "
            "the task runs as Python"
        )
    return None


def _static_reason(func: Any) -> str | None:
    """Why func cannot be compiled, from its code alone (no numba needed), or None."""
    if not isinstance(func, types.FunctionType):
        return f"{type(func).__name__} {func!r} is not a plain Python function (def or lambda)"
    code = func.__code__
    if code.co_flags & (inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE):
        return "it is an async function (only plain functions of numbers are compiled)"
    if code.co_flags & inspect.CO_GENERATOR:
        return "it is a generator"
    if code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS):
        return "it takes *args or **kwargs (only plain positional parameters are compiled)"
    if code.co_kwonlyargcount or code.co_posonlyargcount > code.co_argcount:
        return "it has keyword-only parameters (only plain positional parameters are compiled)"
    if code.co_argcount > MAX_ARGS:
        return f"it takes {code.co_argcount} parameters (at most {MAX_ARGS} are compiled)"
    if code.co_freevars:
        return f"it reads variables of an enclosing function ({', '.join(code.co_freevars)}): closures are not compiled"
    for d in func.__defaults__ or ():
        if type(d) not in _CODES:
            return f"a parameter default is {type(d).__name__} {d!r} (only int, float and bool are compiled)"
    for ins in dis.get_instructions(code):
        what = _OBJECT_OPS.get(ins.opname)
        if what:
            line = ins.positions.lineno if ins.positions else "?"
            return f"it {what} (line {line}): no Python objects, I/O or globals in compiled tasks"
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            name = ins.argval
            if name in func.__globals__:
                val = func.__globals__[name]
                if isinstance(val, types.ModuleType):
                    if val.__name__ not in _ALLOWED_MODULES:
                        allowed = ", ".join(sorted(_ALLOWED_MODULES))
                        return f"it uses the module {val.__name__!r} (only {allowed} are compiled)"
                elif not _is_numba_dispatcher(val) and val is not func:
                    return (
                        f"it reads the global {name!r} ({type(val).__name__}): pass it as an argument (a compiled task "
                        "cannot see later changes of a global, and calls only numba-compiled helpers)"
                    )
            elif name == code.co_name:
                pass  # recursion: the decorator runs before the module binds the name
            elif name in _IO_BUILTINS:
                return f"it calls {name}() (no I/O or introspection in compiled tasks)"
            elif name not in _ALLOWED_BUILTINS and not _is_exception_class(getattr(builtins, name, None)):
                if hasattr(builtins, name):
                    return f"it uses the builtin {name!r} (compiled tasks use {', '.join(sorted(_ALLOWED_BUILTINS))})"
                return f"it reads the undefined global {name!r}"
    try:
        hints = inspect.get_annotations(func, eval_str=True)
    except Exception as exc:  # unresolvable string annotations
        return f"its annotations cannot be evaluated ({type(exc).__name__}: {exc})"
    for name, hint in hints.items():
        if name == "return":
            if hint not in (int, float, bool, None, type(None)):
                return (
                    f"it is annotated to return {getattr(hint, '__name__', hint)!s} "
                    "(only int, float and bool results are compiled)"
                )
        elif hint not in _CODES:
            return (
                f"parameter {name!r} is annotated {getattr(hint, '__name__', hint)!s} "
                "(only int, float and bool are compiled)"
            )
    try:
        _rewrite(func)
    except _Cannot as exc:
        return str(exc)
    return None


def _annotated_codes(func: types.FunctionType) -> str | None:
    """The type codes of the parameters when every one is annotated, else None."""
    code = func.__code__
    hints = inspect.get_annotations(func, eval_str=True)
    names = code.co_varnames[: code.co_argcount]
    if not all(n in hints for n in names):
        return None
    return "".join(_CODES[hints[n]] for n in names)


def _kinds(t: Any) -> Any:
    """The kinds of numbers in a numba type ("b", "i", "f", per tuple item), None otherwise."""
    from numba.core import types as nt

    if isinstance(t, nt.Boolean):
        return "b"
    if isinstance(t, nt.Integer):
        return "i"
    if isinstance(t, nt.Float):
        return "f"
    if isinstance(t, nt.BaseTuple):  # type: ignore[attr-defined]  # numba's types .pyi lacks it
        return tuple(_kinds(x) for x in t)
    return None


def _maybe_unbound(cres: Any) -> str | None:
    """Where a variable may be read before it is assigned (``return i`` after an empty loop, a
    variable set in one branch of an if): Python raises UnboundLocalError there, while numba's
    SSA form starts such a variable as a null value (0) and reads that. numba marks them with
    a ``null()`` definition. None when there is none."""
    from numba.core import ir

    for block in cres.type_annotation.blocks.values():
        for st in block.body:
            if isinstance(st, ir.Assign) and isinstance(st.value, ir.Expr) and st.value.op == "null":
                name = st.target.name.split(".")[0]
                return (
                    f"the variable {name!r} may be read before it is assigned (line {st.loc.line}): Python "
                    "raises UnboundLocalError there, numba would read 0 (assign it on every path first)"
                )
    return None


def _mixed_kinds(cres: Any) -> str | None:
    """Where numba's typing merges a bool, an int or a float into another kind (a variable
    assigned an int on one path and a float on another, a result of mixed types, `a or b`
    of an int and a float): Python keeps each value's own type there, so the compiled code
    cannot give Python's result. None when there is no such place."""
    from numba.core import ir

    ann = cres.type_annotation
    tm = ann.typemap
    for block in ann.blocks.values():
        for st in block.body:
            if not isinstance(st, ir.Assign):
                continue
            v = st.value
            src = v if isinstance(v, ir.Var) else v.value if isinstance(v, ir.Expr) and v.op == "cast" else None
            if src is None or src.name not in tm or st.target.name not in tm:
                continue
            a, b = _kinds(tm[src.name]), _kinds(tm[st.target.name])
            if a is not None and b is not None and a != b:
                what = "its result" if isinstance(v, ir.Expr) else "a value"
                name = st.target.name.split(".")[0]
                if not name.startswith("$"):
                    what = f"the variable {name!r}"
                return (
                    f"{what} is {tm[src.name]} on one path and {tm[st.target.name]} on another (line "
                    f"{st.loc.line}): Python keeps each value's type, numba would convert it (write 0.0 "
                    f"for a float that starts at 0, float(x) where a float is meant)"
                )
    return None
