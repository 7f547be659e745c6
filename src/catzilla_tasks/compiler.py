"""Compiling simple tasks to native code (numba), run on the engine's workers with no GIL.

A task qualifies when it is a plain function of numbers: ``int``, ``float`` and ``bool``
arguments and result, loops and ``math`` where numba handles them; no I/O, no globals other
than modules (``math``) and numba-compiled helpers, no closures, no Python objects (lists,
dicts, sets, strings built at run time). Its signature comes from its annotations when every
parameter is annotated, otherwise from the argument types of each call (one native version per
type combination). ``add_task`` never compiles on the caller's thread: a signature not compiled
yet is compiled by one background thread and calls meanwhile run as Python; ``tasks.map`` and
``precompile(func)`` wait for it.

What runs natively is a checked rewrite of the function's source (``_rewrite``, ``_checked.py``):
every operation gives Python's exact value and type or raises, and that call then runs as
Python, so a compiled task returns what the Python function returns, for every input. What
cannot be checked that way (a variable that is an int on one path and a float on another,
``try``, ``round(x, n)``...) is not compiled, and ``explain(func)`` names the rule.

How it runs: numba compiles the function inside a *trampoline*, a C-callable function (a numba
``cfunc``) with one fixed signature::

    int64 tramp(void *col0, ..., void *col7, void *out, void *status, int64 start, int64 stop)

that runs items ``start..stop-1`` of flat argument columns, catching every exception inside
native code (``status[i] = 1``), so no path of it ever takes the GIL (numba's cfunc wrapper
takes the GIL only to report an exception that escapes it). The engine's C workers call the
trampoline directly: one task per call for ``add_task``, a range of items per engine node for
``tasks.map``. When a native call raised, the Python function is run once more with the same
arguments, under the GIL, to give the task its real exception (a pure function computes the
same thing twice).

Compiled trampolines are cached on disk (numba's cache, in ``$CATZILLA_TASKS_CACHE_DIR`` or
``~/.cache/catzilla_tasks/compiled``), keyed by everything numba compiles into them (the
function and every numba helper it reaches, their code and the globals numba freezes), the
argument types and the numba, numpy and Python versions: a second process loads them instead
of compiling. What is loaded is code, so the cache is used only when this user alone could
have written it (see "The disk cache's trust rules" below and SECURITY.md); otherwise, or
when it cannot be written, trampolines are compiled in memory, with a warning once.

Without numba (the ``[compile]`` extra) every task runs as Python, and ``explain(func)`` says
the compiler is missing.
"""

from __future__ import annotations

import ast
import builtins
import dis
import hashlib
import importlib.util
import inspect
import json
import logging
import marshal
import os
import queue
import stat as stat_mod
import struct
import sys
import tempfile
import textwrap
import threading
import types
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from . import _engine
from ._math_names import MATH1, MATH2, MATH_INT, MATH_PRED
from .errors import CompileError

if TYPE_CHECKING:
    from .mapping import MapInput

__all__ = [
    "TaskCompiler",
    "CompileError",
    "NativeTask",
    "can_compile_to_c",
    "explain",
    "precompile",
    "wait_for_background",
    "default_compiler",
]

log = logging.getLogger("catzilla_tasks.compiler")

MAX_ARGS = 8


def _template_version() -> str:
    # the generated code calls _checked.py's operations, and a cache hit skips the checks of
    # numba's typing that this module makes (_maybe_unbound, _mixed_kinds): a change in either
    # file is a new cache entry
    h = hashlib.sha256()
    for name in ("_checked.py", "compiler.py"):
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), "rb") as f:
            h.update(f.read())
    return "3-" + h.hexdigest()[:16]


_TEMPLATE_VERSION = _template_version()
_CODES = {int: "i", float: "f", bool: "b"}
_TYPE_NAMES = {"i": "int", "f": "float", "b": "bool"}
_SLOT_FORMAT = {"i": "q", "f": "d", "b": "?7x"}
# numpy dtype names of the columns of each type code
_DTYPES = {"i": "int64", "f": "float64", "b": "bool_"}

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


class _Cannot(Exception):
    pass


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


def _is_numba_dispatcher(obj: Any) -> bool:
    return type(obj).__module__.startswith("numba") and hasattr(obj, "py_func")


def _is_exception_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, Exception)


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


# ---- the rewrite: every operation checked -------------------------------------------------
# A compiled task runs a rewritten copy of its source: each arithmetic operator, comparison,
# numeric builtin and math call becomes a call of a checked operation (_checked.py) that gives
# Python's exact value and type or raises, and the trampoline then runs the Python function for
# that call. What cannot be checked that way is refused here, from the source alone (no numba).

_BINOPS = {
    ast.Add: "add",
    ast.Sub: "sub",
    ast.Mult: "mul",
    ast.Div: "truediv",
    ast.FloorDiv: "floordiv",
    ast.Mod: "mod",
    ast.Pow: "pow",
    ast.LShift: "lshift",
    ast.RShift: "rshift",
    ast.BitAnd: "and",
    ast.BitOr: "or",
    ast.BitXor: "xor",
}
_CMPOPS = {ast.Eq: "eq", ast.NotEq: "ne", ast.Lt: "lt", ast.LtE: "le", ast.Gt: "gt", ast.GtE: "ge"}
_UNOPS = {ast.USub: "neg", ast.UAdd: "pos", ast.Invert: "inv"}
# builtin -> (allowed numbers of positional arguments)
_CHECKED_BUILTINS = {
    "int": (1,),
    "float": (1,),
    "abs": (1,),
    "round": (1,),
    "divmod": (2,),
    "pow": (2,),
    "min": tuple(range(2, 9)),
    "max": tuple(range(2, 9)),
    "range": (1, 2, 3),
    "bool": (1,),
}
# the math functions _checked.py compiles, by their number of arguments
_MATH_CALLS = {**{n: 1 for n in MATH1 + MATH_INT}, **{n: 2 for n in MATH2}}
_MATH_PREDICATES = frozenset(MATH_PRED)
_MATH_CONSTANTS = frozenset({"pi", "e", "tau", "inf", "nan"})
_REFUSED_NODES = {
    ast.Try: "catches exceptions (try): a compiled task signals what it cannot compute exactly with an exception",
    ast.With: "uses a with statement",
    ast.ClassDef: "defines a class",
    ast.Lambda: "defines a lambda",
    ast.FunctionDef: "defines a function",
    ast.AsyncFunctionDef: "defines a function",
    ast.Global: "declares a global",
    ast.Nonlocal: "declares a nonlocal",
    ast.Import: "imports a module",
    ast.ImportFrom: "imports a module",
    ast.Delete: "deletes a variable",
    ast.Starred: "unpacks with *",
    ast.Dict: "builds a dict",
    ast.Set: "builds a set",
    ast.List: "builds a list",
    ast.ListComp: "builds a list",
    ast.SetComp: "builds a set",
    ast.DictComp: "builds a dict",
    ast.GeneratorExp: "is a generator expression",
    ast.JoinedStr: "formats a string",
    ast.Subscript: "indexes a value",
    ast.Assert: "asserts (python -O removes the check)",
    ast.MatMult: "uses @",
}
if hasattr(ast, "TryStar"):
    _REFUSED_NODES[ast.TryStar] = _REFUSED_NODES[ast.Try]


_MAX_DEPTH = 200


class _Rewriter(ast.NodeTransformer):
    """Rewrites one function body to checked operations; _Cannot says what cannot be."""

    def __init__(self, func: types.FunctionType) -> None:
        self.func = func
        self.locals = set(func.__code__.co_varnames)
        self.in_raise = False
        self.recursive = False

    def fail(self, node: ast.AST, what: str) -> NoReturn:
        raise _Cannot(f"it {what} (line {getattr(node, 'lineno', '?')})")

    def call(self, node: ast.AST, name: str, args: list) -> ast.Call:
        return ast.copy_location(ast.Call(ast.Name(f"_ct_ck_{name}", ast.Load()), args, []), node)

    def generic_visit(self, node: ast.AST) -> ast.AST:
        what = _REFUSED_NODES.get(type(node))
        if what:
            self.fail(node, what)
        return super().generic_visit(node)

    def visit_Raise(self, node: ast.Raise) -> ast.AST:
        self.in_raise, was = True, self.in_raise
        try:
            return self.generic_visit(node)
        finally:
            self.in_raise = was

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        v = node.value
        if type(v) is int and not -(2**63) <= v < 2**63:
            self.fail(node, f"uses the int constant {v}, beyond int64")
        if not (v is None or type(v) in (int, float, bool) or self.in_raise):
            self.fail(
                node, f"uses the {type(v).__name__} constant {v!r} (only int, float and bool values are compiled)"
            )
        return node

    def visit_BinOp(self, node: ast.BinOp) -> ast.expr:
        self.generic_visit(node)
        name = _BINOPS.get(type(node.op))
        if name is None:
            self.fail(node, f"uses the operator {type(node.op).__name__}")
        return self.call(node, name, [node.left, node.right])

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        if not isinstance(node.target, ast.Name):
            self.fail(node, "assigns to an item or attribute")
        value = self.visit_BinOp(
            ast.copy_location(ast.BinOp(ast.Name(node.target.id, ast.Load()), node.op, node.value), node)
        )
        return ast.copy_location(ast.Assign([node.target], value), node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        name = _UNOPS.get(type(node.op))
        return node if name is None else self.call(node, name, [node.operand])

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        parts: list[ast.expr] = []
        left = node.left
        for op, right in zip(node.ops, node.comparators, strict=True):
            name = _CMPOPS.get(type(op))
            if name is None:
                self.fail(node, f"compares with {type(op).__name__} (is, in)")
            parts.append(self.call(node, name, [left, right]))
            left = right  # a chain evaluates its middle operands twice: pure expressions only
        if len(parts) == 1:
            return parts[0]
        return ast.copy_location(ast.BoolOp(ast.And(), parts), node)

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        mod = self.module_of(node.value)
        if mod is None or not isinstance(node.ctx, ast.Load):
            self.fail(node, f"reads the attribute .{node.attr}")
        if node.attr not in _MATH_CONSTANTS:
            self.fail(node, f"uses math.{node.attr} other than in a call")
        return node

    def module_of(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Name) and node.id not in self.locals:
            val = self.func.__globals__.get(node.id)
            if isinstance(val, types.ModuleType) and val.__name__ == "math":
                return val
        return None

    def visit_Call(self, node: ast.Call) -> ast.AST:
        if node.keywords:
            self.fail(node, "passes keyword arguments")
        f = node.func
        args = [self.visit(a) for a in node.args]
        node.args = args
        if isinstance(f, ast.Attribute) and self.module_of(f.value) is not None:
            if f.attr in _MATH_PREDICATES and len(args) == 1:
                return node
            if _MATH_CALLS.get(f.attr) != len(args):
                self.fail(
                    node,
                    f"calls math.{f.attr} with {len(args)} argument(s) (compiled: "
                    f"{', '.join(sorted(_MATH_CALLS) + sorted(_MATH_PREDICATES))}; math.log with one)",
                )
            return self.call(node, f"math_{f.attr}", args)
        if isinstance(f, ast.Attribute):
            self.fail(node, f"calls the method .{f.attr}()")
        if not isinstance(f, ast.Name) or f.id in self.locals:
            self.fail(node, "calls something other than a builtin, a math function or a numba helper")
        g = self.func.__globals__
        if f.id == self.func.__code__.co_name:  # recursion: one level deeper (see _MAX_DEPTH)
            self.recursive = True
            node.args.append(ast.BinOp(ast.Name("_ct_depth", ast.Load()), ast.Add(), ast.Constant(1)))
            return node
        if f.id in g:
            return node  # a numba helper: _static_reason checked
        if self.in_raise and _is_exception_class(getattr(builtins, f.id, None)):
            return node
        counts = _CHECKED_BUILTINS.get(f.id)
        if counts is None:
            self.fail(node, f"calls {f.id}()")
        if len(args) not in counts:
            self.fail(node, f"calls {f.id}() with {len(args)} argument(s)")
        if f.id == "bool":
            return node
        if f.id == "range":
            if len(args) == 1:
                return ast.copy_location(ast.Call(f, [self.call(node, "index", args)], []), node)
            step = args[2] if len(args) == 3 else ast.Constant(1)
            return ast.copy_location(
                ast.Call(
                    f,
                    [
                        self.call(node, "span", [args[0], args[1], step]),
                        self.call(node, "index", [args[1]]),
                        self.call(node, "step", [step]),
                    ],
                    [],
                ),
                node,
            )
        if f.id in ("min", "max"):  # Python keeps the first of equal values: fold left
            acc = self.call(node, f.id, args[:2])
            for a in args[2:]:
                acc = self.call(node, f.id, [acc, a])
            return acc
        return self.call(node, f.id, args)


_REWRITTEN: weakref.WeakKeyDictionary[types.FunctionType, tuple[Any, str | None, tuple]] = weakref.WeakKeyDictionary()
_ABSENT = object()  # a global name not bound in the module (a builtin, or not defined yet)


def _globals_of(func: types.FunctionType, names: Sequence[str]) -> tuple:
    """What each of these global names of func is bound to now; its own name counts as bound
    to func while @task runs (the module binds it once the decorator returns)."""
    g, own = func.__globals__, func.__code__.co_name
    return tuple(g.get(n, func if n == own else _ABSENT) for n in names)


def _rewrite(func: types.FunctionType) -> Any:
    """The code object of func's body rewritten to checked operations (cached per function,
    while the globals it loads are bound as they were: the rewrite tells a builtin from a
    module global of that name and math from another module); _Cannot with the reason when
    its source is unavailable or uses what cannot be checked."""
    names = sorted(_global_names(func.__code__))
    bound = _globals_of(func, names)
    hit = _REWRITTEN.get(func)
    if hit is None or any(a is not b for a, b in zip(hit[2], bound, strict=True)):
        try:
            hit = (_rewrite_source(func), None, bound)
        except _Cannot as exc:
            hit = (None, str(exc), bound)
        _REWRITTEN[func] = hit
    if hit[1] is not None:
        raise _Cannot(hit[1])
    return hit[0]


def _rewrite_source(func: types.FunctionType) -> Any:
    code = func.__code__
    try:
        lines, first = inspect.getsourcelines(func)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError, IndentationError) as exc:
        raise _Cannot(
            f"its source cannot be read ({type(exc).__name__}): a compiled task runs a checked copy of its source"
        ) from None
    if code.co_name == "<lambda>":
        found = [n for n in ast.walk(tree) if isinstance(n, ast.Lambda)]
        if len(found) != 1:
            raise _Cannot("its source line holds several lambdas: define it with def to compile it")
        lam = found[0]
        fdef = ast.FunctionDef("_ct_lambda", lam.args, [ast.Return(lam.body)], [], None)
        ast.copy_location(fdef, lam)
        ast.fix_missing_locations(fdef)
    else:
        top = tree.body[0] if tree.body else None
        if not isinstance(top, ast.FunctionDef) or top.name != code.co_name:
            raise _Cannot(
                "its source cannot be found (defined by exec?): a compiled task runs a checked copy of its source"
            )
        fdef = top
        fdef.decorator_list = []
    ast.increment_lineno(fdef, first - 1)
    # the source must be the code that runs (not a file edited since it was imported)
    if _function_code(fdef, code, func.__globals__) is None:
        raise _Cannot("its source file differs from the code that runs (edited since it was imported?)")
    for a in (*fdef.args.posonlyargs, *fdef.args.args, *fdef.args.kwonlyargs):
        a.annotation = None
    fdef.returns = None
    body = fdef.body
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        body = body[1:] or [ast.Pass()]
    fdef.args.defaults = []
    fdef.args.kw_defaults = []
    if not any(
        isinstance(n, ast.Return)
        and n.value is not None
        and not (isinstance(n.value, ast.Constant) and n.value.value is None)
        for n in ast.walk(fdef)
    ):
        raise _Cannot("it returns no value (None): only int, float and bool results are compiled")
    rw = _Rewriter(func)
    fdef.body = [rw.visit(st) for st in body]
    if rw.recursive:
        # native recursion past Python's depth would overflow the worker's stack: deeper than
        # _MAX_DEPTH the call runs as Python (which gives the result or its RecursionError)
        fdef.args.args.append(ast.arg("_ct_depth"))
        fdef.body.insert(0, ast.parse(f"if _ct_depth > {_MAX_DEPTH}: raise ArithmeticError").body[0])
    mod = ast.fix_missing_locations(ast.Module([fdef], []))
    return compile(mod, code.co_filename, "exec", dont_inherit=True)


def _function_code(fdef: ast.FunctionDef, code: types.CodeType, globals_of: dict) -> Any:
    """The code object compiled from fdef when it is the same as code, else None."""
    import copy

    plain = copy.deepcopy(fdef)
    plain.args.defaults = [ast.Constant(0) for _ in plain.args.defaults]
    plain.args.kw_defaults = [None for _ in plain.args.kw_defaults]
    for a in (*plain.args.posonlyargs, *plain.args.args, *plain.args.kwonlyargs):
        a.annotation = None
    plain.returns = None
    # CPython compiles `m.f(x)` differently when its module imports m: import them as it does
    imports = [
        ast.Import([ast.alias(val.__name__, n)])
        for n in code.co_names
        if isinstance(val := globals_of.get(n), types.ModuleType)
    ]
    try:
        mod = compile(
            ast.fix_missing_locations(ast.Module([*imports, plain], [])), code.co_filename, "exec", dont_inherit=True
        )
    except SyntaxError:
        return None
    for c in mod.co_consts:
        if isinstance(c, types.CodeType):
            if (c.co_code, c.co_names, c.co_varnames, c.co_argcount) == (
                code.co_code,
                code.co_names,
                code.co_varnames,
                code.co_argcount,
            ) and _const_keys(c) == _const_keys(code):
                return c
    return None


def _const_keys(code: types.CodeType) -> list:
    # by type and repr, not ==: 1 == 1.0 == True and 0.0 == -0.0, but an edit between them
    # changes what the function computes
    return [(type(k), repr(k)) for k in code.co_consts if not isinstance(k, types.CodeType)]


def _checked_function(func: types.FunctionType) -> types.FunctionType:
    """The rewritten function, in a namespace of the names it uses (needs numba)."""
    from . import _checked

    module_code = _rewrite(func)
    ns: dict[str, Any] = {"__builtins__": builtins, **_checked.helpers()}
    for name in func.__code__.co_names:
        if name in func.__globals__:
            ns[name] = func.__globals__[name]
        # (a module-level function's own name is bound only once @task has returned, and
        # compile_to_c="require" compiles it before: the rewrite calls itself natively, and
        # NativeTask sees a later rebinding of the name)
        elif name == func.__code__.co_name and func.__qualname__ != func.__name__:
            raise _Cannot(
                f"it calls {name}, which is not a global of its module (a recursive function defined "
                "inside another function or a class is not compiled)"
            )
    own = ns.get(func.__code__.co_name)
    if (
        own is not None
        and func.__code__.co_name in func.__code__.co_names
        and own is not func
        and not _is_numba_dispatcher(own)
    ):
        raise _Cannot(f"it calls {func.__code__.co_name}, which is no longer this function")
    # module_code only defines the function (no decorators, defaults or annotations left), from
    # its own source, which _function_code checked compiles to the bytecode this process runs
    exec(module_code, ns)  # noqa: S102 - defines the checked rewrite of the task's own source
    new = ns[func.__code__.co_name if func.__code__.co_name != "<lambda>" else "_ct_lambda"]
    if "_ct_depth" in new.__code__.co_varnames:  # recursive: an entry point starts the depth at 0
        import numba

        ns[new.__name__] = numba.njit(nogil=True)(new)
        params = ", ".join(func.__code__.co_varnames[: func.__code__.co_argcount])
        entry = f"def _ct_entry({params}):\n    return {new.__name__}({params}{', ' if params else ''}0)\n"
        exec(entry, ns)  # noqa: S102 - our one-line template, filled with the code object's identifiers
        inner = ns[new.__name__]
        new = ns["_ct_entry"]
        new._ct_inner = inner  # its typing is checked too
    new.__defaults__ = func.__defaults__
    return new


def _annotated_codes(func: types.FunctionType) -> str | None:
    """The type codes of the parameters when every one is annotated, else None."""
    code = func.__code__
    hints = inspect.get_annotations(func, eval_str=True)
    names = code.co_varnames[: code.co_argcount]
    if not all(n in hints for n in names):
        return None
    return "".join(_CODES[hints[n]] for n in names)


def _cache_dir() -> str:
    d = os.environ.get("CATZILLA_TASKS_CACHE_DIR")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "catzilla_tasks", "compiled")
    return d


# ---------------------------------------------------------------------------------------
# The disk cache's trust rules (see SECURITY.md). What is loaded from the cache is code that
# runs in this process, so nothing in it is used unless only this user could have written it:
# the directory is ours and writable by nobody else (and so are its ancestors, or they are
# sticky like /tmp); a file is ours, a regular file, writable by nobody else; the trampoline's
# text equals the text we generate (we compile our text, never the file's); numba's index and
# data files (pickles) have the SHA-256 recorded in our manifest when we saw numba write them.
# Anything else is deleted and compiled afresh; a directory that fails the rules is not used
# at all (a warning, once, and compiled code stays in memory).

_MEMORY = "m"  # prefix of the keys of functions that are never cached on disk (see _key)
_DIR_VERDICTS: dict[str, str | None] = {}  # cache directory -> its real path, or None: refused
_TRUSTED_DIRS: set[str] = set()  # real paths our numba cache locator serves
_cache_lock = threading.Lock()


def _warn_cache(d: str, why: str) -> None:
    import warnings

    warnings.warn(
        f"catzilla_tasks: the compile cache {d!r} is not used: {why}; compiled tasks are compiled "
        "in memory by this process (see SECURITY.md)",
        RuntimeWarning,
        stacklevel=2,
    )


def _dir_problem(path: str, uid: int, leaf: bool) -> str | None:
    st = os.lstat(path)  # not stat: a symlink (``__pycache__`` -> elsewhere) leads out of what was checked
    if stat_mod.S_ISLNK(st.st_mode):
        return f"{path} is a symlink (to {os.readlink(path)!r})"
    if not stat_mod.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    mode = stat_mod.S_IMODE(st.st_mode)
    if leaf:
        if st.st_uid != uid:
            return f"{path} is owned by uid {st.st_uid}, not by this user (uid {uid})"
        if mode & 0o022:
            who = " and ".join(w for w, bit in (("its group", 0o020), ("other users", 0o002)) if mode & bit)
            return f"{path} is writable by {who} (mode {mode:o}; it must be 0700 or 0755)"
        return None
    # an ancestor: others must not be able to rename our directory away and plant another one
    if st.st_uid not in (0, uid) or (mode & 0o022 and not mode & stat_mod.S_ISVTX):
        return (
            f"its parent {path} (owner uid {st.st_uid}, mode {mode:o}) can be changed by other users "
            "(it must belong to this user or root, and be sticky if others may write to it)"
        )
    return None


def _makedirs_private(path: str) -> None:
    """os.makedirs(path), every directory it creates 0700: os.makedirs gives the parents it
    creates the umask's mode (0775 under umask 002), which the ancestors' rule then refuses."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if parent != path and not os.path.isdir(parent):
        _makedirs_private(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise


def _path_problem(path: str, uid: int, created: bool) -> str | None:
    """Why the way to path cannot be trusted, or None: each directory it goes through must pass
    the ancestors' rule (others cannot rename what is in it), and each symlink on the way (or on
    the way of a symlink's target) must belong to this user or root. Otherwise another user
    chose where the cache is (a /tmp/name planted before we created it, a link in a directory
    they may write to); the checks after realpath() see only the target. A missing part is one
    we are about to create, unless ``created``."""
    todo = [c for c in os.path.abspath(path).split(os.sep) if c]
    cur, hops = os.sep, 0
    while todo:
        comp = todo.pop(0)
        if comp in (".", ""):
            continue
        if comp == "..":
            cur = os.path.dirname(cur)
            continue
        why = _dir_problem(cur, uid, leaf=False)
        if why:
            return why
        nxt = os.path.join(cur, comp)
        try:
            st = os.lstat(nxt)
        except FileNotFoundError:
            return f"{nxt} vanished while it was being created" if created else None
        if not stat_mod.S_ISLNK(st.st_mode):
            cur = nxt
            continue
        if st.st_uid not in (0, uid):
            return f"{nxt} is a symlink of another user (uid {st.st_uid})"
        hops += 1
        if hops > 40:
            return f"{path} has too many levels of symlinks"
        target = os.readlink(nxt)
        if os.path.isabs(target):
            cur = os.sep
        todo[:0] = target.split(os.sep)
    return None


def _trusted_dir(d: str) -> str | None:
    """The real path of cache directory d, created 0700, when it passes the trust rules and is
    writable; None otherwise (with a warning, once per directory and process)."""
    with _cache_lock:
        if d in _DIR_VERDICTS:
            return _DIR_VERDICTS[d]
        real = ""  # set (and used) only while why is None
        try:
            why = _numba_cache_redirected()
            if why is None:
                uid = os.geteuid()
                why = _path_problem(d, uid, created=False)  # before makedirs follows the way
                if why is None:
                    _makedirs_private(d)
                    why = _path_problem(d, uid, created=True)
                if why is None:
                    real = os.path.realpath(d)
                    why = _dir_problem(real, uid, leaf=True)
                parent = real
                while why is None and os.path.dirname(parent) != parent:
                    parent = os.path.dirname(parent)
                    why = _dir_problem(parent, uid, leaf=False)
                if why is None:
                    pyc = os.path.join(real, "__pycache__")  # numba's files, the same rules
                    os.makedirs(pyc, mode=0o700, exist_ok=True)
                    why = _dir_problem(pyc, uid, leaf=True)
                    for folder in (real, pyc):  # writable (not just permitted: read-only mounts)
                        tempfile.TemporaryFile(dir=folder).close()
        except OSError as exc:
            why = f"it cannot be created or written ({type(exc).__name__}: {exc})"
        if why is not None:
            _warn_cache(d, why)
            _DIR_VERDICTS[d] = None
            return None
        _TRUSTED_DIRS.add(real)
        _install_locator()
        _DIR_VERDICTS[d] = real
        return real


def _numba_cache_redirected() -> str | None:
    from numba.core import config

    if getattr(config, "CACHE_LOCATOR_CLASSES", ""):
        return "NUMBA_CACHE_LOCATOR_CLASSES is set, so numba would keep its files where they cannot be checked"
    return None


_LOCATOR: Any = None


def _install_locator() -> None:
    """Make numba cache our trampolines in ``<dir>/__pycache__`` of a trusted directory, and
    nowhere else (not NUMBA_CACHE_DIR, not ~/.cache/numba): numba's own locators are tried
    after ours, and ours answers only for the ``ct_*.py`` files of a trusted directory."""
    global _LOCATOR
    if _LOCATOR is not None:
        return
    from numba.core import caching

    class _TrustedLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
        def __init__(self, py_func: Any, py_file: str) -> None:
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            self._cache_path = os.path.join(os.path.dirname(py_file), "__pycache__")

        def get_cache_path(self) -> str:
            return self._cache_path

        @classmethod
        def from_function(cls, py_func: Any, py_file: str) -> Any:
            if os.path.dirname(py_file) in _TRUSTED_DIRS and os.path.basename(py_file).startswith("ct_"):
                return cls(py_func, py_file)
            return None

    # numba's extension point is this list of locator classes (NUMBA_CACHE_LOCATOR_CLASSES
    # replaces it process-wide, for every user of numba): ours goes first, for our files only.
    impl = caching.CompileResultCacheImpl
    impl._locator_classes = [_TrustedLocator, *impl._locator_classes]
    _LOCATOR = _TrustedLocator


def _trusted_read(path: str) -> bytes | None:
    """The bytes of path when it is a regular file of ours that nobody else may write, else None."""
    try:
        # O_NONBLOCK: a FIFO in the cache would block open() before fstat could refuse it
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return None
        return f.read()


def _numba_files(pyc: str, key: str) -> list[str]:
    try:
        names = os.listdir(pyc)
    except OSError:
        return []
    return sorted(n for n in names if n.startswith(f"ct_{key}.") and n.endswith((".nbi", ".nbc")))


def _check_numba_files(pyc: str, key: str, recorded: dict[str, str]) -> None:
    """Leave numba's files of key only if each is one we recorded; else delete them all (numba
    then compiles afresh and writes new ones). OSError when they cannot be deleted."""
    names = _numba_files(pyc, key)
    for n in names:
        data = _trusted_read(os.path.join(pyc, n))
        if data is None or hashlib.sha256(data).hexdigest() != recorded.get(n):
            break
    else:
        return
    for n in names:
        try:
            os.remove(os.path.join(pyc, n))
        except FileNotFoundError:
            pass


def _record_numba_files(pyc: str, key: str) -> dict[str, str]:
    """The SHA-256 of numba's files of key, as written by numba in this process (made private
    first: numba creates them with the umask's mode)."""
    out = {}
    for n in _numba_files(pyc, key):
        p = os.path.join(pyc, n)
        try:
            os.chmod(p, 0o600, follow_symlinks=False)
        except (OSError, NotImplementedError):
            continue
        data = _trusted_read(p)
        if data is not None:
            out[n] = hashlib.sha256(data).hexdigest()
    return out


def _read_meta(d: str, key: str) -> dict[str, Any]:
    data = _trusted_read(os.path.join(d, f"ct_{key}.json"))
    try:
        meta = json.loads(data) if data is not None else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


# Modules whose attributes numba may freeze into machine code and that change only with their
# version (in the key): others' attributes (a settings module) make a function uncacheable.
_FROZEN_MODULES = frozenset({"math", "cmath", "numpy", "numba"})
_HASHABLE_CONSTANTS = (bool, int, float, complex, str, bytes, type(None))


def _fingerprint(func: types.FunctionType, h: Any, seen: set[int]) -> str | None:
    """Feed h with everything numba compiles of func: its code (nested code included), defaults,
    closure values and the globals it loads, recursing into numba helpers. None when all of it
    could be hashed, else what could not."""
    if id(func) in seen:  # recursion
        return None
    seen.add(id(func))
    code = func.__code__
    # marshal format 0: no reference or interning flags, which follow reference counts (numba
    # holding a code's constants would change the bytes of later formats, and so the key)
    h.update(marshal.dumps(code, 0))
    why = _fingerprint_value("a default", (func.__defaults__, tuple(sorted((func.__kwdefaults__ or {}).items()))), h)
    if why:
        return why
    for name, cell in zip(code.co_freevars, func.__closure__ or (), strict=True):
        try:
            value = cell.cell_contents
        except ValueError:
            return f"its closure variable {name!r} is not set"
        why = _fingerprint_global(f"closure variable {name!r}", value, h, seen)
        if why:
            return why
    for name in sorted(_global_names(code)):
        h.update(f"global {name}=".encode())
        if name in func.__globals__:
            why = _fingerprint_global(f"global {name!r}", func.__globals__[name], h, seen)
            if why:
                return f"{func.__qualname__} reads {why}"
        elif not hasattr(builtins, name):
            h.update(b"<undefined>")
    return None


def _global_names(code: types.CodeType) -> set[str]:
    names = {ins.argval for ins in dis.get_instructions(code) if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _fingerprint_global(what: str, value: Any, h: Any, seen: set[int]) -> str | None:
    if isinstance(value, types.ModuleType):
        top = value.__name__.partition(".")[0]
        if top not in _FROZEN_MODULES:
            return f"{what}, the module {value.__name__!r}, whose attributes numba freezes"
        h.update(f"module {value.__name__}".encode())
        return None
    if _is_numba_dispatcher(value):
        opts = getattr(value, "targetoptions", {})
        # A dispatcher given explicit signatures (@njit("int64(float64)")) compiles only those,
        # converting its arguments and result to them: they are part of what it computes. (The
        # signatures of a lazy one are what this process happened to call, so not hashed.)
        sigs = [] if getattr(value, "_can_compile", True) else sorted(map(str, value.nopython_signatures))
        h.update(f"dispatcher {sorted(opts.items())!r} {sigs!r}".encode())
        return _fingerprint(value.py_func, h, seen)
    if isinstance(value, type) and value.__module__ == "builtins":
        h.update(f"builtin {value.__qualname__}".encode())
        return None
    return _fingerprint_value(what, value, h)


def _fingerprint_value(what: str, value: Any, h: Any) -> str | None:
    """Hash a constant numba freezes: numbers, strings, None, tuples of them, numpy arrays."""
    if type(value) in _HASHABLE_CONSTANTS:
        h.update(f"{type(value).__name__} {value!r};".encode())
        return None
    if type(value) is tuple:
        h.update(f"tuple {len(value)}(".encode())
        for v in value:
            why = _fingerprint_value(what, v, h)
            if why:
                return why
        h.update(b")")
        return None
    if type(value).__module__ == "numpy" and hasattr(value, "dtype") and hasattr(value, "tobytes"):
        h.update(f"numpy {value.dtype.str} {getattr(value, 'shape', ())!r}".encode())
        h.update(value.tobytes())
        return None
    return f"{what} ({type(value).__name__}), a value numba freezes that the cache key cannot cover"


class CompiledSignature:
    """One compiled signature: the trampoline's address and how to pack a call."""

    __slots__ = ("codes", "rcode", "address", "cfunc", "packer", "cache_hit", "key")

    def __init__(self, codes: str, rcode: str, cfunc: Any, cache_hit: bool, key: str) -> None:
        self.codes = codes
        self.rcode = rcode
        self.cfunc = cfunc  # keeps the machine code alive
        self.address = cfunc.address
        self.cache_hit = cache_hit
        self.key = key
        fmt = "=Qqq" + "".join(_SLOT_FORMAT[c] for c in codes) + "8x" * (MAX_ARGS - len(codes)) + "16x"
        self.packer = struct.Struct(fmt)


# key -> the user function's numba dispatcher, for the generated trampoline module to import
_REGISTRY: dict[str, Any] = {}


def _registered(key: str) -> Any:
    return _REGISTRY[key]


_TRAMPOLINE = """\
# Generated by catzilla_tasks.compiler for {qualname} ({where}); numba caches its machine code
# next to this file. Do not edit: the file name is a hash of the function and its signature.
import numpy as _np
from numba import carray as _carray, cfunc as _cfunc, types as _t
from catzilla_tasks.compiler import _registered

_user = _registered("{key}")


@_cfunc(_t.int64(*([_t.voidptr] * 10), _t.int64, _t.int64), nogil=True, cache=True)
def trampoline(c0, c1, c2, c3, c4, c5, c6, c7, out, status, start, stop):
{columns}
    o = _carray(out, (stop,), _np.{rdtype})
    s = _carray(status, (stop,), _np.uint8)
    failed = 0
    for i in range(start, stop):
        try:
            o[i] = _user({call})
            s[i] = 0
        except Exception:
            s[i] = 1
            failed += 1
    return failed
"""


class TaskCompiler:
    """Decides whether a task compiles to native code and compiles it (numba), with a disk cache.

    ``can_compile_to_c(func)`` / ``explain(func)`` look at the function's code (and, when its
    parameters are all annotated or ``arg_types`` is given, compile it to be sure);
    ``compile(func, arg_types)`` returns the native version's C address.
    """

    def __init__(self, cache_dir: str | None = None) -> None:
        self.cache_dir = cache_dir
        self._lock = threading.RLock()
        self._specs: dict[str, CompiledSignature] = {}
        self._failures: dict[str, str] = {}

    # -- decisions ------------------------------------------------------------------------
    def explain(self, func: Callable[..., Any], arg_types: Sequence[type] | None = None) -> str | None:
        """None when func compiles (for arg_types, or its annotations when all are given;
        otherwise from its code alone, the types then come from the first call), else the
        reason it runs as Python."""
        reason = _numba_missing() or _static_reason(func)
        if reason:
            return reason
        codes: str | None
        if arg_types is not None:
            try:
                codes = "".join(_CODES[t] for t in arg_types)
            except KeyError:
                return f"argument types ({', '.join(t.__name__ for t in arg_types)}) are not all int, float or bool"
            if len(codes) != func.__code__.co_argcount:
                return f"{len(codes)} argument types given for {func.__code__.co_argcount} parameters"
            ann = _annotated_codes(func)  # type: ignore[arg-type]
            if ann is not None and ann != codes:
                return f"argument types ({_names(codes)}) do not match the annotations ({_names(ann)})"
        else:
            codes = _annotated_codes(func)  # type: ignore[arg-type]
        if codes is None:
            return None
        try:
            self.compile(func, codes)
        except _Cannot as exc:
            return str(exc)
        return None

    def can_compile_to_c(self, func: Callable[..., Any], arg_types: Sequence[type] | None = None) -> bool:
        return self.explain(func, arg_types) is None

    # -- compiling ------------------------------------------------------------------------
    def compile(self, func: Callable[..., Any], codes: str | Sequence[type]) -> CompiledSignature:
        """The native version of func for these argument types (type codes "i"/"f"/"b" or
        the types int/float/bool): compiled, or loaded from the disk cache. Raises
        CompileError with the reason when it cannot."""
        if not isinstance(codes, str):
            codes = "".join(_CODES[t] for t in codes)
        reason = _numba_missing() or _static_reason(func)
        if reason:
            raise _Cannot(reason)
        with self._lock:  # (also around _key: it imports numba, which a fork must not interrupt)
            key = self._key(func, codes)  # type: ignore[arg-type]
            spec = self._specs.get(key)
            if spec is not None:
                return spec
            if key in self._failures:
                raise _Cannot(self._failures[key])
            try:
                spec = self._build(func, codes, key)  # type: ignore[arg-type]
            except _Cannot as exc:
                self._failures[key] = str(exc)
                raise
            self._specs[key] = spec
            return spec

    def _key(self, func: types.FunctionType, codes: str) -> str:
        """The cache key of func's trampoline for these argument types: a hash of everything
        numba compiles into it (the checked rewrite of the function's source, its code, every
        numba helper it reaches, callees of callees included, and every global and closure
        value numba freezes as a constant), the trampoline's template, this module and
        _checked.py, and the numba, numpy and Python versions. A function reaching a
        value that cannot be hashed gets a key of this process only (prefix _MEMORY): it is
        compiled, never loaded from or stored on disk."""
        import numba
        import numpy

        h = hashlib.sha256()
        for part in (_TEMPLATE_VERSION, _TRAMPOLINE, codes, numba.__version__, numpy.__version__, sys.version):
            h.update(part.encode())
            h.update(b"\0")
        # numba compiles the checked rewrite of func's source, not its bytecode: two sources of
        # the same bytecode (2**62 and 4**31) are rewritten differently (_Cannot: no source)
        h.update(marshal.dumps(_rewrite(func), 0))
        why = _fingerprint(func, h, set())
        if why is None:
            return h.hexdigest()[:32]
        log.debug("%s is not cached on disk: %s", func.__qualname__, why)
        h.update(f"process {os.getpid()} function {id(func)}".encode())  # _REGISTRY keeps func alive
        return _MEMORY + h.hexdigest()[:31]

    def _build(self, func: types.FunctionType, codes: str, key: str) -> CompiledSignature:
        import numba
        from numba.core import types as nt

        d = None if key.startswith(_MEMORY) else _trusted_dir(self.cache_dir or _cache_dir())
        checked = _checked_function(func)
        dispatcher = numba.njit(nogil=True)(checked)
        _REGISTRY[key] = dispatcher
        meta = _read_meta(d, key) if d is not None else {}
        rcode = meta.get("result")
        if rcode not in _TYPE_NAMES:
            # first time for this signature: infer the result type
            argtypes = tuple({"i": nt.int64, "f": nt.float64, "b": nt.boolean}[c] for c in codes)
            try:
                dispatcher.compile(argtypes)
            except Exception as exc:
                raise _Cannot(f"numba cannot compile it for ({_names(codes)}): {_first_lines(exc)}") from None
            cres = dispatcher.overloads[argtypes]
            inner = getattr(checked, "_ct_inner", None)
            why = next(
                filter(
                    None,
                    (
                        check(c)
                        for c in [cres, *(inner.overloads.values() if inner else ())]
                        for check in (_maybe_unbound, _mixed_kinds)
                    ),
                ),
                None,
            )
            if why:
                raise _Cannot(f"for ({_names(codes)}) {why}")
            rt = cres.signature.return_type
            if isinstance(rt, nt.Boolean):
                rcode = "b"
            elif isinstance(rt, nt.Integer) and rt.signed:  # type: ignore[attr-defined]  # numba's .pyi lacks it
                rcode = "i"
            elif isinstance(rt, nt.Float):
                rcode = "f"
            else:
                raise _Cannot(f"it returns {rt} for ({_names(codes)}) (only int, float and bool results are compiled)")
        src = _TRAMPOLINE.format(
            qualname=func.__qualname__,
            where=f"{func.__code__.co_filename}:{func.__code__.co_firstlineno}",
            key=key,
            columns="\n".join(f"    a{j} = _carray(c{j}, (stop,), _np.{_DTYPES[c]})" for j, c in enumerate(codes))
            or "    pass",
            rdtype=_DTYPES[rcode],
            call=", ".join(f"a{j}[i]" for j in range(len(codes))),
        )
        cf = _load_cached(d, key, src, rcode, func.__qualname__, meta) if d is not None else None
        if cf is None:
            try:
                cf = _load_trampoline(None, key, src)
            except Exception as exc:
                raise _Cannot(f"numba cannot compile it for ({_names(codes)}): {_first_lines(exc)}") from None
        hit = bool(getattr(cf, "cache_hits", 0))
        log.debug(
            "compiled %s(%s) -> %s%s",
            func.__qualname__,
            _names(codes),
            _TYPE_NAMES[rcode],
            " (from the disk cache)" if hit else "",
        )
        return CompiledSignature(codes, rcode, cf, hit, key)


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


def _load_trampoline(path: str | None, key: str, src: str) -> Any:
    """Run the trampoline module's text ``src`` (ours, never the file's) and return its cfunc:
    with numba's disk cache beside ``path``, or in memory only when path is None."""
    name = f"catzilla_tasks_native_{key}"
    if path is None:
        text = src.replace("cache=True", "cache=False")
        if text.count("cache=False") != 1:
            raise RuntimeError("the trampoline template has no single cache=True to turn off")
        code = builtins.compile(text, f"<catzilla_tasks native {key}>", "exec")
    else:
        code = builtins.compile(src, path, "exec")
    mod = types.ModuleType(name)
    mod.__file__ = path or code.co_filename
    sys.modules[name] = mod  # numba's cache finds the module by its name
    try:
        exec(code, mod.__dict__)  # noqa: S102 - the text generated by _build, see _TRAMPOLINE
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod.trampoline


def _load_cached(d: str, key: str, src: str, rcode: str, qualname: str, meta: dict[str, Any]) -> Any:
    """The trampoline of key from trusted cache directory d (numba's cache loaded, or written
    there), or None when the directory cannot be used (warned once; compile in memory)."""
    path = os.path.join(d, f"ct_{key}.py")
    pyc = os.path.join(d, "__pycache__")
    try:
        if _trusted_read(path) != src.encode():
            _atomic_write(path, src)
        files = meta.get("numba")
        _check_numba_files(pyc, key, files if isinstance(files, dict) else {})
        try:
            cf = _load_trampoline(path, key, src)
        except OSError:
            raise
        except Exception:
            # an entry this numba cannot load: compile afresh once
            log.debug("compile cache entry %s unusable; compiling again", path, exc_info=True)
            _drop_cache_entry(d, key)
            _atomic_write(path, src)
            try:
                cf = _load_trampoline(path, key, src)
            except OSError:
                raise
            except Exception as exc:
                raise _Cannot(f"numba cannot compile it: {_first_lines(exc)}") from None
        want = {"result": rcode, "function": qualname, "numba": _record_numba_files(pyc, key)}
        if meta != want:
            _atomic_write(os.path.join(d, f"ct_{key}.json"), json.dumps(want))
        return cf
    except OSError as exc:
        with _cache_lock:
            _DIR_VERDICTS[d] = None
            for k, v in list(_DIR_VERDICTS.items()):
                if v == d:
                    _DIR_VERDICTS[k] = None
        _warn_cache(d, f"it cannot be written ({type(exc).__name__}: {exc})")
        return None


def _drop_cache_entry(d: str, key: str) -> None:
    for folder in (d, os.path.join(d, "__pycache__")):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for fn in names:
            if fn.startswith(f"ct_{key}.") and not fn.endswith(".json"):
                try:
                    os.remove(os.path.join(folder, fn))
                except OSError:
                    pass


def _names(codes: str) -> str:
    return ", ".join(_TYPE_NAMES[c] for c in codes)


def _first_lines(exc: BaseException) -> str:
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[:2])[:300] or type(exc).__name__


def _atomic_write(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


default_compiler = TaskCompiler()


def can_compile_to_c(func: Callable[..., Any], arg_types: Sequence[type] | None = None) -> bool:
    """Whether func compiles to native code (see TaskCompiler.explain)."""
    return default_compiler.can_compile_to_c(func, arg_types)


def explain(func: Callable[..., Any], arg_types: Sequence[type] | None = None) -> str | None:
    """None when func compiles to native code, else why it runs as Python."""
    native = _NATIVE.get(func) if isinstance(func, types.FunctionType) else None
    if native is not None and arg_types is None and native.reason:
        return native.reason
    return default_compiler.explain(func, arg_types)


# ---------------------------------------------------------------------------------------
# Tasks: what @task(compile_to_c=...) attaches, and the engine's hook


class _BackgroundCompiler:
    """One daemon thread that compiles native versions queued by add_task, in order, so that
    importing numba and compiling (0.5-1 s) never blocks a caller."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[NativeTask, tuple[type, ...]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._outstanding = 0  # queued or compiling

    def submit(self, native: NativeTask, key: tuple[type, ...]) -> None:
        with self._idle:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="catzilla_tasks-compile", daemon=True)
                self._thread.start()
            self._outstanding += 1
        self._queue.put((native, key))

    def wait(self, timeout: float | None) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._outstanding == 0, timeout)

    def _run(self) -> None:
        while True:
            native, key = self._queue.get()
            try:
                native.spec_for(key, wait=True)
            except Exception as exc:  # an unexpected error: that signature runs as Python
                log.warning("compiling %s failed; it runs as Python", native.func.__qualname__, exc_info=True)
                native._cannot(key, f"compiling it failed ({type(exc).__name__}: {exc})")
            finally:
                with self._idle:
                    self._outstanding -= 1
                    self._idle.notify_all()


_background = _BackgroundCompiler()


def _before_fork() -> None:
    # a fork waits for a compile in progress: numba's own lock, held by the compile thread,
    # would stay locked in the child forever
    default_compiler._lock.acquire()


def _after_fork_in_parent() -> None:
    default_compiler._lock.release()


def _after_fork_in_child() -> None:
    # a fork's child has no compile thread: what it had queued is queued again on demand
    global _background
    _background = _BackgroundCompiler()
    default_compiler._lock = threading.RLock()
    for native in list(_NATIVE.values()):
        native._lock = threading.Lock()
        native._pending.clear()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


class NativeTask:
    """The compiled side of one task function: its native versions, one per argument types.

    ``reason`` is None while the function can be compiled, else why it runs as Python;
    ``fallbacks`` maps argument types that could not be compiled to the reason.

    ``add_task`` never compiles on the caller's thread (``prepare``): a signature not compiled
    yet is queued for the background compile thread and the call runs as Python meanwhile.
    ``tasks.map`` and ``precompile()`` wait for it (``spec_for(key, wait=True)``).
    ``compile_to_c="require"`` always compiles before the call and raises CompileError at
    every call whose arguments cannot run natively.
    """

    def __init__(self, func: types.FunctionType, require: bool, compiler: TaskCompiler | None = None) -> None:
        self.func = func
        self.require = require
        self.compiler = compiler or default_compiler
        self.reason = _numba_missing() or _static_reason(func)
        self.annotated = _annotated_codes(func) if self.reason is None else None
        self.nparams = func.__code__.co_argcount
        self._specs: dict[tuple[type, ...], CompiledSignature | None] = {}
        self.fallbacks: dict[tuple[type, ...], str] = {}
        self._lock = threading.Lock()  # held while compiling
        self._pending: set[tuple[type, ...]] = set()  # queued for the background compile thread
        self.ran_while_compiling = False
        # The global names the function loads (helpers, math, builtins it calls, itself) and,
        # per compiled signature, what they were bound to when it was compiled: the native
        # code keeps what it was compiled with, the Python function follows a rebinding.
        self._gnames = tuple(sorted(_global_names(func.__code__))) if self.reason is None else ()
        self._bound: dict[tuple[type, ...], tuple] = {}

    def spec_for(self, key: tuple[type, ...], wait: bool = True) -> CompiledSignature | None:
        """The native version for these argument types, or None (the call runs as Python).
        wait=False: never compile here; queue the compile in the background instead."""
        spec = self._specs.get(key, False)
        if spec and self._gnames:
            # a global it loads rebound since compiling? (inline: on every call of such a task)
            get = self.func.__globals__.get
            for name, value in self._bound.get(key, ((None, None),)):
                if get(name, _ABSENT) is not value:
                    self._forget(key)
                    spec = False
                    break
        if spec is not False:
            if spec is None and self.require:
                self._refuse(self.fallbacks.get(key, "it cannot be compiled for these arguments"))
            return spec  # type: ignore[return-value]
        reason = self._type_reason(key)
        if reason is not None:
            self._cannot(key, reason)
            return None
        if wait or self.require:
            return self._compile(key)
        if key not in self._pending:
            self._pending.add(key)
            _background.submit(self, key)
        self.ran_while_compiling = True
        return None

    def _globals_now(self) -> tuple:
        """(name, value) of each global name the function loads, as now."""
        return tuple(zip(self._gnames, _globals_of(self.func, self._gnames), strict=True))

    def _forget(self, key: tuple[type, ...]) -> None:
        # a global it reads was rebound since this version was compiled (a helper replaced, a
        # builtin shadowed): compile again from the current globals (the compiler's cache key
        # and _rewrite's cache follow them). No lock: the caller must not wait for a compile in
        # progress; a version compiled meanwhile from old globals is caught here again at its
        # first call.
        self._specs.pop(key, None)
        self._pending.discard(key)
        self.fallbacks.pop(key, None)

    def _type_reason(self, key: tuple[type, ...]) -> str | None:
        try:
            codes = "".join(_CODES[t] for t in key)
        except KeyError:
            return f"arguments of types ({', '.join(t.__name__ for t in key)}) (only int, float and bool are compiled)"
        if self.annotated is not None and codes != self.annotated:
            return f"argument types ({_names(codes)}) do not match the annotations ({_names(self.annotated)})"
        return None

    def _compile(self, key: tuple[type, ...]) -> CompiledSignature | None:
        with self._lock:
            if key in self._specs:
                return self.spec_for(key)
            bound = self._globals_now()  # before compiling: a rebinding meanwhile is seen at the next call
            try:
                spec = self.compiler.compile(self.func, "".join(_CODES[t] for t in key))
            except _Cannot as exc:
                self._cannot(key, str(exc))
                return None
            self._bound[key] = bound
            self._specs[key] = spec
            return spec

    def _cannot(self, key: tuple[type, ...], reason: str) -> None:
        if key not in self.fallbacks:
            log.debug("task %s runs as Python for these arguments: %s", self.func.__qualname__, reason)
        self.fallbacks[key] = reason
        self._specs[key] = None
        if self.require:
            self._refuse(reason)
        return None

    def _refuse(self, reason: str) -> None:
        raise CompileError(f"compile_to_c='require': {self.func.__qualname__} cannot be compiled: {reason}")

    def bind(self, args: tuple, kwargs: dict | None) -> tuple | None:
        """Positional arguments for a call, or None when they do not bind (Python reports)."""
        if kwargs or len(args) != self.nparams:
            try:
                ba = inspect.signature(self.func).bind(*args, **(kwargs or {}))
            except TypeError as exc:
                if self.require:
                    self._refuse(f"the arguments do not bind to its parameters ({exc})")
                return None
            ba.apply_defaults()
            return tuple(ba.args)
        return args

    def prepare(self, args: tuple, kwargs: dict | None, wait: bool = False) -> tuple[bytearray, tuple] | None:
        """add_task's call block for these arguments, or None: the task runs as Python."""
        pos = self.bind(args, kwargs)
        if pos is None:
            return None
        spec = self.spec_for(tuple(map(type, pos)), wait)
        if spec is None:
            return None
        try:
            block = bytearray(spec.packer.pack(spec.address, len(pos), ord(spec.rcode), *pos))
        except struct.error:  # an int beyond int64: Python computes it exactly
            reason = "an int argument does not fit in 64 bits"
            if self.require:
                self._refuse(reason)
            self.fallbacks.setdefault(("int beyond int64",), reason)  # type: ignore[arg-type]
            return None
        return block, pos

    def refuse_method(self, method: Any) -> None:
        """A bound method of the task is called (add_task, map): it runs as Python, since
        self is an object; with compile_to_c="require", CompileError."""
        if self.require:
            self._refuse(f"{method!r} is a bound method (self is an object): it runs as Python")

    def refuse_batch(self, inp: MapInput, plain: bool) -> None:
        """compile_to_c="require" and tasks.map could not run the batch natively: the
        CompileError that says why (a map never runs a required task as Python)."""
        if not plain:
            self._refuse("tasks.map runs a task with retries, a timeout or hooks as one Python task per item")
        for i in range(len(inp)):
            item = inp.item(i)
            try:
                self.prepare(item if isinstance(item, tuple) else (item,), None, wait=True)
            except CompileError as exc:
                exc.add_note(f"tasks.map({self.func.__qualname__}): item {i} {item!r}")
                raise
        self._refuse("the batch's items do not all fit one compiled signature")

    def __repr__(self) -> str:
        state = "compiles" if self.reason is None else f"runs as Python: {self.reason}"
        return f"<NativeTask {self.func.__qualname__} {state}>"


_NATIVE: weakref.WeakKeyDictionary[Callable[..., Any], NativeTask] = weakref.WeakKeyDictionary()


def _prepare(native: NativeTask, args: tuple, kwargs: dict | None, func: Any) -> tuple[bytearray, tuple] | None:
    if func is not native.func:
        # a bound method of the task (the engine finds the function's config through it): its
        # arguments lack self, which is an object; the native code never sees it
        native.refuse_method(func)
        return None
    return native.prepare(args, kwargs)


def _task_reason(func: Any, ran_native: bool) -> str | None:
    """For TaskResult.get_stats()["compile_reason"]: why this task ran as Python (None if native)."""
    if ran_native:
        return None
    native = native_of(func)
    if native is None:
        cfg = getattr(func, "__catzilla_task__", None)
        if cfg is not None and getattr(cfg, "isolation", None) == "process":
            return "it runs with isolation='process' (in a child process, as Python)"
        if isinstance(func, types.FunctionType) and cfg is not None:
            return "compile_to_c=False"
        return "only functions decorated with @task (compile_to_c=True) are compiled"
    if native.reason:
        return native.reason
    if native.ran_while_compiling and not native.fallbacks:
        return (
            "its native version was being compiled in the background: calls meanwhile run as Python "
            "(compiler.precompile(func) compiles it ahead of time)"
        )
    if native.fallbacks:
        return "its arguments did not fit a compiled signature; the cases seen: " + "; ".join(
            f"({', '.join(getattr(t, '__name__', str(t)) for t in k)}): {why}" for k, why in native.fallbacks.items()
        )
    return "its arguments did not fit a compiled signature (keywords that do not bind, or an int beyond int64)"


_engine._set_native_hooks(_prepare, _task_reason)


def attach(func: Any, cfg: Any, compile_to_c: Any) -> Any:
    """@task(compile_to_c=...): returns the config to attach (a copy carrying the NativeTask when
    func compiles). compile_to_c: True (compile when it can, else Python), False, or "require"
    (CompileError when it cannot)."""
    if compile_to_c is False or compile_to_c is None:
        return cfg
    if compile_to_c is not True and compile_to_c != "require":
        raise ValueError(f"compile_to_c: expected True, False or 'require', got {compile_to_c!r}")
    require = compile_to_c == "require"
    if not isinstance(func, types.FunctionType):
        if require:
            raise CompileError(f"compile_to_c='require': {_static_reason(func)}")
        return cfg
    native = NativeTask(func, require)
    _NATIVE[func] = native
    if native.reason is None and native.annotated is not None and require:
        native.spec_for(
            tuple({"i": int, "f": float, "b": bool}[c] for c in native.annotated)
        )  # compile now: errors here
    if native.reason is not None:
        log.debug("task %s runs as Python: %s", func.__qualname__, native.reason)
        if require:
            raise CompileError(f"compile_to_c='require': {func.__qualname__} cannot be compiled: {native.reason}")
        return cfg
    if cfg.isolation == "process":
        native.reason = "it runs with isolation='process' (in a child process, as Python)"
        if require:
            raise CompileError(f"compile_to_c='require': {func.__qualname__}: {native.reason}")
        return cfg
    own = cfg.replace()
    own._native = native
    return own


def precompile(func: Callable[..., Any], arg_types: Sequence[type] | None = None) -> str | None:
    """Compile (or load from the disk cache) the native version of a @task for arg_types (by
    default its annotations) now, on this thread, so that add_task runs it natively from the
    first call. None when it is ready, else the reason the task runs as Python."""
    native = native_of(func)
    if native is None:
        return _task_reason(func, False)
    if native.reason:
        return native.reason
    if arg_types is None:
        if native.annotated is None:
            raise TypeError(
                f"precompile({func.__qualname__}): its parameters are not all annotated: pass arg_types, "
                "e.g. precompile(func, (int, float))"
            )
        arg_types = [{"i": int, "f": float, "b": bool}[c] for c in native.annotated]
    key = tuple(arg_types)
    if len(key) != native.nparams:
        raise TypeError(f"precompile({func.__qualname__}): {len(key)} argument types for {native.nparams} parameters")
    return None if native.spec_for(key, wait=True) is not None else native.fallbacks.get(key)


def wait_for_background(timeout: float | None = None) -> bool:
    """Block until the background compile thread has nothing queued or compiling (e.g. before
    measuring, or before a pre-fork server forks); False if timeout seconds passed first."""
    return _background.wait(timeout)


def native_of(func: Any) -> NativeTask | None:
    """The NativeTask attached to func by @task, or None."""
    return _NATIVE.get(func) if isinstance(func, types.FunctionType) else None
