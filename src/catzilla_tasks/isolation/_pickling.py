"""Pickling a task for a child process, and the TypeError that names what does not pickle
(``pickle_task``, ``check_picklable``: called at ``add_task``, before anything is queued)."""

from __future__ import annotations

import pickle
import types
from collections.abc import Callable
from typing import Any

_PROTOCOL = pickle.HIGHEST_PROTOCOL


def _describe(obj: Any) -> str:
    if isinstance(obj, types.FunctionType):
        if obj.__name__ == "<lambda>":
            return "a lambda"
        if "<locals>" in obj.__qualname__:
            return f"a local function {obj.__qualname__!r}"
        return f"function {obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, types.MethodType):
        return f"a bound method {getattr(obj, '__qualname__', repr(obj))!r}"
    if isinstance(obj, type):
        return f"class {obj.__module__}.{obj.__qualname__}"
    cls = type(obj)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"{article} {name}"


def _hint(obj: Any) -> str:
    if isinstance(obj, (types.FunctionType, types.MethodType, type)):
        return "define the function at module level (not a lambda, not inside another function)"
    return "pass plain data (not live objects such as locks, sockets, open files or generators)"


def _why(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_NEED = "process-isolated tasks need picklable functions, arguments and results"


def _unpicklable_error(func: Any, args: tuple, kwargs: dict, exc: BaseException) -> TypeError:
    """The TypeError naming the first part of a task that does not pickle."""
    parts: list[tuple[str, Any]] = [("the task function", func)]
    parts += [(f"argument {i}", a) for i, a in enumerate(args, 1)]
    parts += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    for label, obj in parts:
        try:
            pickle.dumps(obj, protocol=_PROTOCOL)
        except Exception as part_exc:  # noqa: BLE001 - pickling raises many types
            return TypeError(f"{label} ({_describe(obj)}) cannot be pickled ({_why(part_exc)}): {_NEED}; {_hint(obj)}")
    return TypeError(f"the task's function and arguments cannot be pickled together ({_why(exc)}): {_NEED}")


def pickle_task(func: Callable[..., Any], args: tuple = (), kwargs: dict | None = None) -> bytes:
    """Pickle a task for :meth:`ProcessPool.run_pickled` (once, e.g. at ``add_task``).

    Raises ``TypeError`` naming the offending part when the function or an argument cannot
    be pickled (see :func:`check_picklable`)."""
    if not callable(func):
        raise TypeError(f"a task must be callable, got {_describe(func)}")
    args = tuple(args)
    kwargs = dict(kwargs or {})
    try:
        return pickle.dumps((func, args, kwargs), protocol=_PROTOCOL)
    except Exception as exc:  # noqa: BLE001
        raise _unpicklable_error(func, args, kwargs, exc) from exc


def check_picklable(func: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    """Raise ``TypeError`` naming the offending argument when ``func``, ``args`` or ``kwargs``
    cannot be pickled, e.g. ``argument 2 (a lambda) cannot be pickled (...): process-isolated
    tasks need picklable functions, arguments and results; define the function at module
    level``. Positional arguments are numbered from 1, ``func`` not counted.

    This pickles everything once; to avoid pickling twice, call :func:`pickle_task` and pass
    its bytes to :meth:`ProcessPool.run_pickled` instead.
    """
    pickle_task(func, args, kwargs)
