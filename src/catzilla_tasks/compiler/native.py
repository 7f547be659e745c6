"""Native tasks: what ``@task(compile_to_c=...)`` attaches (``NativeTask``, one per function,
its compiled versions per argument types), the background compile thread, what the C engine
calls (``NativeTask._engine_prepare`` builds a call's block; ``_task_reason``, through the
``native_reason`` hook of ``_hooks.py``, says why a task ran as Python), and
the public helpers on tasks (``precompile``, ``explain``, ``wait_for_background``, ``native_of``)."""

from __future__ import annotations

import inspect
import os
import queue
import struct
import threading
import types
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ..errors import CompileError
from ._common import _CODES, _Cannot, _global_names, _names, log
from .codegen import TaskCompiler, _Spec, default_compiler
from .eligibility import _annotated_codes, _numba_missing, _static_reason
from .rewrite import _ABSENT, _globals_of


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


def _after_fork_in_child() -> None:
    # a fork's child has no compile thread: what it had queued is queued again on demand
    # (the compiler's own lock is reset by codegen's hook)
    global _background
    _background = _BackgroundCompiler()
    for native in list(_NATIVE.values()):
        native._lock = threading.Lock()
        native._pending.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


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
        self._specs: dict[tuple[type, ...], _Spec | None] = {}
        self.fallbacks: dict[tuple[type, ...], str] = {}
        self._lock = threading.Lock()  # held while compiling
        self._pending: set[tuple[type, ...]] = set()  # queued for the background compile thread
        self.ran_while_compiling = False
        # The global names the function loads (helpers, math, builtins it calls, itself) and,
        # per compiled signature, what they were bound to when it was compiled: the native
        # code keeps what it was compiled with, the Python function follows a rebinding.
        self._gnames = tuple(sorted(_global_names(func.__code__))) if self.reason is None else ()
        self._bound: dict[tuple[type, ...], tuple] = {}

    def spec_for(self, key: tuple[type, ...], wait: bool = True) -> _Spec | None:
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
                self.refuse(self.fallbacks.get(key, "it cannot be compiled for these arguments"))
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

    def _compile(self, key: tuple[type, ...]) -> _Spec | None:
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
            self.refuse(reason)
        return None

    def refuse(self, reason: str) -> NoReturn:
        raise CompileError(f"compile_to_c='require': {self.func.__qualname__} cannot be compiled: {reason}")

    def bind(self, args: tuple, kwargs: dict | None) -> tuple | None:
        """Positional arguments for a call, or None when they do not bind (Python reports)."""
        if kwargs or len(args) != self.nparams:
            try:
                ba = inspect.signature(self.func).bind(*args, **(kwargs or {}))
            except TypeError as exc:
                if self.require:
                    self.refuse(f"the arguments do not bind to its parameters ({exc})")
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
                self.refuse(reason)
            self.fallbacks.setdefault(("int beyond int64",), reason)  # type: ignore[arg-type]
            return None
        return block, pos

    def _engine_prepare(self, args: tuple, kwargs: dict | None, func: Any) -> tuple[bytearray, tuple] | None:
        """Called by the C engine (enqueue_native, _engine/py_native.c) when a task compiled to
        native code is queued: the call block and the arguments, or None (it runs as Python)."""
        if func is not self.func:
            # a bound method of the task (the engine finds the function's config through it): its
            # arguments lack self, which is an object; the native code never sees it
            self.refuse_method(func)
            return None
        return self.prepare(args, kwargs)

    def refuse_method(self, method: Any) -> None:
        """A bound method of the task is called (add_task, map): it runs as Python, since
        self is an object; with compile_to_c="require", CompileError."""
        if self.require:
            self.refuse(f"{method!r} is a bound method (self is an object): it runs as Python")

    def __repr__(self) -> str:
        state = "compiles" if self.reason is None else f"runs as Python: {self.reason}"
        return f"<NativeTask {self.func.__qualname__} {state}>"


_NATIVE: weakref.WeakKeyDictionary[Callable[..., Any], NativeTask] = weakref.WeakKeyDictionary()


def _task_reason(func: Any, ran_native: bool) -> str | None:
    """For TaskResult.get_stats()["compile_reason"]: why this task ran as Python (None if native).
    The engine's native_reason hook (_hooks.py) calls it once this module is loaded."""
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


def explain(func: Callable[..., Any], arg_types: Sequence[type] | None = None) -> str | None:
    """None when func compiles to native code, else why it runs as Python."""
    native = _NATIVE.get(func) if isinstance(func, types.FunctionType) else None
    if native is not None and arg_types is None and native.reason:
        return native.reason
    return default_compiler.explain(func, arg_types)
