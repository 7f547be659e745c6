"""The checked rewrite of a task's source: what numba compiles instead of the function's own
code. Each arithmetic operator, comparison, numeric builtin and ``math`` call becomes a call of a
checked operation (``_checked.py``) that gives Python's exact value and type or raises, and the
trampoline then runs the Python function for that call. What cannot be checked that way is
refused here (``_Cannot``), from the source alone (no numba)."""

from __future__ import annotations

import ast
import builtins
import inspect
import textwrap
import types
import weakref
from collections.abc import Sequence
from typing import Any, NoReturn

from ._common import _Cannot, _global_names, _is_exception_class, _is_numba_dispatcher
from ._math_names import MATH1, MATH2, MATH_INT, MATH_PRED

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
