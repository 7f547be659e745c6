"""Compiling simple numeric tasks to native code (numba), run on the engine's workers with no GIL.

What qualifies, how a compiled task gives Python's exact result, the trampoline the C workers
call and the disk cache's trust rules: docs/compiling.md (the user manual) and "Compiled tasks"
in docs/architecture.md (the design). Without numba (the ``[compile]`` extra) every task runs as
Python, and ``explain(func)`` says the compiler is missing.

The package, by concern:

* ``eligibility``: whether a function can be compiled, and the reason when it cannot;
* ``rewrite``: the checked rewrite of a task's source that numba compiles (``_checked`` holds
  the checked operations it calls, ``_math_names`` the ``math`` functions they cover);
* ``codegen``: ``TaskCompiler``, the trampoline template and one compiled signature (``_Spec``);
* ``cache``: the on-disk cache (keys, trust rules, atomic writes, loading);
* ``native``: ``NativeTask`` (what ``@task`` attaches), the background compile thread and what
  the C engine calls (``NativeTask._engine_prepare``; ``_task_reason`` through ``_hooks.py``).
"""

from __future__ import annotations

from ..errors import CompileError
from ._common import _Cannot as _Cannot  # tests check refusals
from .codegen import TaskCompiler, can_compile_to_c, default_compiler
from .codegen import _registered as _registered  # the generated trampoline modules import it
from .codegen import _Spec as _Spec  # mapping.py's type hints
from .eligibility import _numba_missing as _numba_missing  # benchmarks/_compile_bench.py
from .native import NativeTask, explain, precompile, wait_for_background
from .native import attach as attach  # @task(compile_to_c=...) (engine.py)
from .native import native_of as native_of  # engine.py, mapping, tests

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
