"""Build of the C extension catzilla_tasks._engine.

Build modes (environment variable CATZILLA_TASKS_BUILD):
  release (default)  -O2
  debug              -O0 -g
  asan               AddressSanitizer + UndefinedBehaviorSanitizer, -O1 -g
  tsan               ThreadSanitizer, -O1 -g (for the engine's own C stress tests; see Makefile)
"""
import os
from setuptools import Extension, setup

ENGINE_DIR = "src/catzilla_tasks/_engine"
SOURCES = [
    f"{ENGINE_DIR}/{name}"
    for name in (
        # the pure-C core: never includes Python.h (built and stress-tested alone: tests/c)
        "ct_slab.c", "ct_queue.c", "ct_sync.c", "ct_timer.c", "ct_engine.c",
        # the bindings, one file per concern (py_internal.h has the map)
        "py_module.c", "py_engine.c", "py_config.c", "py_result.c", "py_run.c", "py_timer.c",
        "py_memory.c", "py_native.c", "py_gate.c",
    )
]

mode = os.environ.get("CATZILLA_TASKS_BUILD", "release")
# -fvisibility=hidden: the files' shared functions (py_internal.h) stay private to the extension,
# so calls between them are direct and the compiler may inline within a file; only
# PyInit__engine (PyMODINIT_FUNC) is exported.
compile_args = ["-std=c11", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
link_args: list[str] = []
if mode == "release":
    compile_args += ["-O2"]
elif mode == "debug":
    compile_args += ["-O0", "-g"]
elif mode == "asan":
    san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
    compile_args += ["-O1", "-g"] + san
    link_args += san
elif mode == "tsan":
    compile_args += ["-O1", "-g", "-fsanitize=thread"]
    link_args += ["-fsanitize=thread"]
else:
    raise SystemExit(f"CATZILLA_TASKS_BUILD={mode!r}: use release, debug, asan or tsan")

setup(
    ext_modules=[
        Extension(
            "catzilla_tasks._engine",
            sources=SOURCES,
            include_dirs=[ENGINE_DIR],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            define_macros=[("_GNU_SOURCE", "1")],
        )
    ]
)
