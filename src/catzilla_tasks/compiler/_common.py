"""The vocabulary every module of the compiler shares: the type codes of compiled arguments,
``_Cannot`` (the reason a task runs as Python), and small helpers on functions and numba objects."""

from __future__ import annotations

import dis
import logging
import re
import types
from typing import Any

# one logger for the whole package (tests and users set its level by this name)
log = logging.getLogger("catzilla_tasks.compiler")

MAX_ARGS = 8
_CODES = {int: "i", float: "f", bool: "b"}
_TYPE_NAMES = {"i": "int", "f": "float", "b": "bool"}


class _Cannot(Exception):
    pass


def _is_numba_dispatcher(obj: Any) -> bool:
    return type(obj).__module__.startswith("numba") and hasattr(obj, "py_func")


def _is_exception_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, Exception)


def _global_names(code: types.CodeType) -> set[str]:
    names = {ins.argval for ins in dis.get_instructions(code) if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _names(codes: str) -> str:
    return ", ".join(_TYPE_NAMES[c] for c in codes)


def _first_lines(exc: BaseException) -> str:

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[:2])[:300] or type(exc).__name__
