"""Compiling simple tasks to native code (numba), run on the engine's workers with no GIL.

A task qualifies when it is a plain function of numbers: ``int``, ``float`` and ``bool``
arguments and result, loops and ``math`` where numba handles them; no I/O, no globals other
than modules (``math``) and numba-compiled helpers, no closures, no Python objects (lists,
dicts, sets, strings built at run time). Its signature comes from its annotations when every
parameter is annotated, otherwise from the argument types of each call (one native version per
type combination, compiled on its first use).

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
``~/.cache/catzilla_tasks/compiled``), keyed by the function's bytecode, constants, argument
types and the numba and Python versions: a second process loads them instead of compiling.

Without numba (the ``[compile]`` extra) every task runs as Python, and ``explain(func)`` says
the compiler is missing.
"""

from __future__ import annotations

import builtins
import dis
import hashlib
import importlib.util
import inspect
import json
import logging
import marshal
import os
import struct
import sys
import tempfile
import threading
import types
import weakref
from typing import Any, Callable, Iterable, Sequence

from . import _engine

__all__ = ["TaskCompiler", "CompileError", "NativeTask", "can_compile_to_c", "explain", "default_compiler"]

log = logging.getLogger("catzilla_tasks.compiler")

MAX_ARGS = 8
_TEMPLATE_VERSION = "1"
_CODES = {int: "i", float: "f", bool: "b"}
_TYPE_NAMES = {"i": "int", "f": "float", "b": "bool"}
_SLOT_FORMAT = {"i": "q", "f": "d", "b": "?7x"}
# numpy dtype names of the columns of each type code
_DTYPES = {"i": "int64", "f": "float64", "b": "bool_"}

# Builtins numba compiles for numbers; anything else named here is refused with its reason.
_ALLOWED_BUILTINS = frozenset({"range", "abs", "min", "max", "int", "float", "bool", "round", "divmod", "pow"})
_IO_BUILTINS = frozenset({"print", "open", "input", "exec", "eval", "compile", "__import__", "breakpoint", "globals", "locals", "vars"})
_ALLOWED_MODULES = frozenset({"math", "cmath"})
_OBJECT_OPS = {
    "BUILD_LIST": "builds a list", "BUILD_SET": "builds a set", "BUILD_MAP": "builds a dict",
    "BUILD_CONST_KEY_MAP": "builds a dict", "BUILD_STRING": "builds a string", "FORMAT_VALUE": "formats a string",
    "LIST_APPEND": "builds a list", "SET_ADD": "builds a set", "MAP_ADD": "builds a dict",
    "LIST_EXTEND": "builds a list", "DICT_UPDATE": "builds a dict", "DICT_MERGE": "builds a dict",
    "STORE_GLOBAL": "assigns a global variable", "DELETE_GLOBAL": "deletes a global variable",
    "IMPORT_NAME": "imports a module inside the task", "MAKE_FUNCTION": "defines a function or comprehension inside the task",
    "YIELD_VALUE": "is a generator", "STORE_ATTR": "sets an attribute", "STORE_SUBSCR": "stores into a container",
}


class CompileError(TypeError):
    """``compile_to_c="require"`` and the task cannot be compiled (the message says why)."""


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
            return f"it {what} (line {ins.positions.lineno if ins.positions else '?'}): no Python objects, I/O or globals in compiled tasks"
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            name = ins.argval
            if name in func.__globals__:
                val = func.__globals__[name]
                if isinstance(val, types.ModuleType):
                    if val.__name__ not in _ALLOWED_MODULES:
                        return f"it uses the module {val.__name__!r} (only {', '.join(sorted(_ALLOWED_MODULES))} are compiled)"
                elif not _is_numba_dispatcher(val):
                    return (
                        f"it reads the global {name!r} ({type(val).__name__}): pass it as an argument (a compiled task "
                        "cannot see later changes of a global, and calls only numba-compiled helpers)"
                    )
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
                return f"it is annotated to return {getattr(hint, '__name__', hint)!s} (only int, float and bool results are compiled)"
        elif hint not in _CODES:
            return f"parameter {name!r} is annotated {getattr(hint, '__name__', hint)!s} (only int, float and bool are compiled)"
    return None


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


class _Spec:
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


_TRAMPOLINE = '''\
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
'''


class TaskCompiler:
    """Decides whether a task compiles to native code and compiles it (numba), with a disk cache.

    ``can_compile_to_c(func)`` / ``explain(func)`` look at the function's code (and, when its
    parameters are all annotated or ``arg_types`` is given, compile it to be sure);
    ``compile(func, arg_types)`` returns the native version's C address.
    """

    def __init__(self, cache_dir: str | None = None) -> None:
        self.cache_dir = cache_dir
        self._lock = threading.RLock()
        self._specs: dict[str, _Spec] = {}
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
            if len(codes) != func.__code__.co_argcount:  # type: ignore[attr-defined]
                return f"{len(codes)} argument types given for {func.__code__.co_argcount} parameters"  # type: ignore[attr-defined]
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
    def compile(self, func: Callable[..., Any], codes: str | Sequence[type]) -> _Spec:
        """The native version of func for these argument types (type codes "i"/"f"/"b" or
        the types int/float/bool): compiled, or loaded from the disk cache. Raises
        CompileError with the reason when it cannot."""
        if not isinstance(codes, str):
            codes = "".join(_CODES[t] for t in codes)
        reason = _numba_missing() or _static_reason(func)
        if reason:
            raise _Cannot(reason)
        key = self._key(func, codes)  # type: ignore[arg-type]
        with self._lock:
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
        import numba

        h = hashlib.sha256()
        for part in (_TEMPLATE_VERSION, codes, numba.__version__, sys.version, repr(func.__defaults__)):
            h.update(part.encode())
            h.update(b"\0")
        h.update(marshal.dumps(func.__code__))
        for name in func.__code__.co_names:  # numba helpers it calls are part of it
            val = func.__globals__.get(name)
            if val is not None and _is_numba_dispatcher(val):
                h.update(marshal.dumps(val.py_func.__code__))
        return h.hexdigest()[:32]

    def _build(self, func: types.FunctionType, codes: str, key: str) -> _Spec:
        import numba
        from numba.core import types as nt

        d = self.cache_dir or _cache_dir()
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as exc:
            raise _Cannot(f"cannot create the compile cache directory {d!r}: {exc}") from None
        path = os.path.join(d, f"ct_{key}.py")
        meta = os.path.join(d, f"ct_{key}.json")
        dispatcher = numba.njit(nogil=True)(func)
        _REGISTRY[key] = dispatcher
        rcode = None
        try:
            with open(meta) as f:
                rcode = json.load(f)["result"]
        except (OSError, ValueError, KeyError):
            pass
        if rcode not in _TYPE_NAMES:
            # first time for this signature: infer the result type
            argtypes = tuple({"i": nt.int64, "f": nt.float64, "b": nt.boolean}[c] for c in codes)
            try:
                dispatcher.compile(argtypes)
            except Exception as exc:
                raise _Cannot(f"numba cannot compile it for ({_names(codes)}): {_first_lines(exc)}") from None
            rt = dispatcher.overloads[argtypes].signature.return_type
            if isinstance(rt, nt.Boolean):
                rcode = "b"
            elif isinstance(rt, nt.Integer) and rt.signed:
                rcode = "i"
            elif isinstance(rt, nt.Float):
                rcode = "f"
            else:
                raise _Cannot(f"it returns {rt} for ({_names(codes)}) (only int, float and bool results are compiled)")
        src = _TRAMPOLINE.format(
            qualname=func.__qualname__,
            where=f"{func.__code__.co_filename}:{func.__code__.co_firstlineno}",
            key=key,
            columns="\n".join(
                f"    a{j} = _carray(c{j}, (stop,), _np.{_DTYPES[c]})" for j, c in enumerate(codes)
            ) or "    pass",
            rdtype=_DTYPES[rcode],
            call=", ".join(f"a{j}[i]" for j in range(len(codes))),
        )
        if not os.path.exists(path):
            _atomic_write(path, src)
        try:
            cf = _load_trampoline(path, key)
        except Exception:
            # a cache entry this numba cannot load (or a damaged file): compile afresh once
            log.debug("compile cache entry %s unusable; compiling again", path, exc_info=True)
            _drop_cache_entry(d, key)
            try:
                _atomic_write(path, src)
                cf = _load_trampoline(path, key)
            except Exception as exc:
                raise _Cannot(f"numba cannot compile it for ({_names(codes)}): {_first_lines(exc)}") from None
        if not os.path.exists(meta):
            _atomic_write(meta, json.dumps({"result": rcode, "function": func.__qualname__}))
        hit = bool(getattr(cf, "cache_hits", 0))
        log.debug("compiled %s(%s) -> %s%s", func.__qualname__, _names(codes), _TYPE_NAMES[rcode],
                  " (from the disk cache)" if hit else "")
        return _Spec(codes, rcode, cf, hit, key)


def _load_trampoline(path: str, key: str) -> Any:
    name = f"catzilla_tasks_native_{key}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # numba's cache finds the module by its name
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod.trampoline


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


class NativeTask:
    """The compiled side of one task function: its native versions, one per argument types.

    ``reason`` is None while the function can be compiled, else why it runs as Python;
    ``fallbacks`` maps argument types that could not be compiled to the reason.
    """

    def __init__(self, func: types.FunctionType, require: bool, compiler: TaskCompiler | None = None) -> None:
        self.func = func
        self.require = require
        self.compiler = compiler or default_compiler
        self.reason = _numba_missing() or _static_reason(func)
        self.annotated = _annotated_codes(func) if self.reason is None else None
        self.nparams = func.__code__.co_argcount
        self._specs: dict[tuple[type, ...], _Spec | None] = {}
        self.fallbacks: dict[tuple[type, ...], str] = {}
        self._lock = threading.Lock()

    def spec_for(self, key: tuple[type, ...]) -> _Spec | None:
        spec = self._specs.get(key, False)
        if spec is not False:
            return spec  # type: ignore[return-value]
        with self._lock:
            if key in self._specs:
                return self._specs[key]
            spec, reason = None, None
            try:
                codes = "".join(_CODES[t] for t in key)
            except KeyError:
                reason = f"arguments of types ({', '.join(t.__name__ for t in key)}) (only int, float and bool are compiled)"
            else:
                if self.annotated is not None and codes != self.annotated:
                    reason = f"argument types ({_names(codes)}) do not match the annotations ({_names(self.annotated)})"
                else:
                    try:
                        spec = self.compiler.compile(self.func, codes)
                    except _Cannot as exc:
                        reason = str(exc)
            if reason:
                self.fallbacks[key] = reason
                log.debug("task %s runs as Python for these arguments: %s", self.func.__qualname__, reason)
                if self.require:
                    self._specs[key] = None
                    raise CompileError(f"compile_to_c='require': {self.func.__qualname__} cannot be compiled: {reason}")
            self._specs[key] = spec
            return spec

    def bind(self, args: tuple, kwargs: dict | None) -> tuple | None:
        """Positional arguments for a call, or None when they do not bind (Python reports)."""
        if kwargs or len(args) != self.nparams:
            try:
                ba = inspect.signature(self.func).bind(*args, **(kwargs or {}))
            except TypeError:
                return None
            ba.apply_defaults()
            return tuple(ba.args)
        return args

    def prepare(self, args: tuple, kwargs: dict | None) -> tuple[bytearray, tuple] | None:
        pos = self.bind(args, kwargs)
        if pos is None:
            return None
        spec = self.spec_for(tuple(map(type, pos)))
        if spec is None:
            return None
        try:
            block = bytearray(spec.packer.pack(spec.address, len(pos), ord(spec.rcode), *pos))
        except struct.error:  # an int beyond int64: Python computes it exactly
            self.fallbacks.setdefault(("int beyond int64",), "an int argument does not fit in 64 bits")  # type: ignore[arg-type]
            return None
        return block, pos

    def __repr__(self) -> str:
        state = "compiles" if self.reason is None else f"runs as Python: {self.reason}"
        return f"<NativeTask {self.func.__qualname__} {state}>"


_NATIVE: "weakref.WeakKeyDictionary[Callable[..., Any], NativeTask]" = weakref.WeakKeyDictionary()


def _prepare(native: NativeTask, args: tuple, kwargs: dict | None) -> tuple[bytearray, tuple] | None:
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
    if native.fallbacks:
        return "its arguments did not fit a compiled signature; the cases seen: " + "; ".join(
            f"({', '.join(getattr(t, '__name__', str(t)) for t in k)}): {why}" for k, why in native.fallbacks.items())
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
        native.spec_for(tuple({"i": int, "f": float, "b": bool}[c] for c in native.annotated))  # compile now: errors here
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


def native_of(func: Any) -> NativeTask | None:
    """The NativeTask attached to func by @task, or None."""
    return _NATIVE.get(func) if isinstance(func, types.FunctionType) else None


# ---------------------------------------------------------------------------------------
# tasks.map


def _auto_chunk(n: int, workers: int) -> int:
    # at least 8 nodes per worker (balance), at most 4096 items per node
    return max(1, min(4096, -(-n // (8 * max(1, workers)))))


def map_native(engine: Any, native: NativeTask, items: Sequence[Any], chunk_size: int | None, priority: int,
               return_exceptions: bool, _hold_gil: float = 0) -> list[Any] | None:
    """Run func over items (a list or tuple) as native code, ``chunk_size`` items per engine
    node; None when the items do not all fit the signature of the first (the caller then runs
    them as Python tasks)."""
    n = len(items)
    if n == 0:
        return []
    first = items[0]
    first_args = first if isinstance(first, tuple) else (first,)
    if len(first_args) != native.nparams:
        return None
    spec = native.spec_for(tuple(map(type, first_args)))
    if spec is None:
        return None
    chunk = chunk_size or _auto_chunk(n, engine._live_workers())
    r = engine._map_native(spec.address, spec.codes, spec.rcode, items, chunk, priority, _hold_gil)
    if isinstance(r, int):
        log.debug("tasks.map(%s): item %d does not match (%s); the batch runs as Python tasks",
                  native.func.__qualname__, r, _names(spec.codes))
        return None
    results, failed, cancelled = r
    if failed or cancelled:
        from ._engine import TaskCancelled

        errors: dict[int, BaseException] = {}
        for i in cancelled:
            errors[i] = TaskCancelled(f"tasks.map({native.func.__qualname__}): item {i} was cancelled (engine shut down)")
        for i in failed:
            item = items[i]
            args = item if isinstance(item, tuple) else (item,)
            try:
                results[i] = native.func(*args)  # the real exception comes from the Python function
            except Exception as exc:
                errors[i] = exc
        for i in sorted(errors):
            if return_exceptions:
                results[i] = errors[i]
            else:
                item = items[i]
                errors[i].add_note(f"tasks.map({native.func.__qualname__}): item {i} {item!r} failed")
                raise errors[i]
    return results


def collect(handles: Iterable[Any], items: Sequence[Any], func: Any, return_exceptions: bool) -> list[Any]:
    """The values of a batch of TaskResults, in order (waits with the GIL released)."""
    out: list[Any] = []
    for i, h in enumerate(handles):
        try:
            out.append(h.wait())
        except Exception as exc:
            if not return_exceptions:
                exc.add_note(f"tasks.map({getattr(func, '__qualname__', func)}): item {i} {items[i]!r} failed")
                raise
            out.append(exc)
    return out
