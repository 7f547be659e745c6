"""The package's eager imports form no cycle (scripts/import_graph.py --check)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "import_graph.py"
spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
import_graph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_graph)


def test_the_package_has_no_eager_import_cycle():
    run = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "catzilla_tasks.engine:" in run.stdout


def _package(tmp_path, files):
    for rel, text in files.items():
        p = tmp_path / "catzilla_tasks" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return import_graph.graph(tmp_path)


def test_a_module_level_cycle_is_found(tmp_path):
    g = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from . import b\n",
        "b.py": "from .a import thing\n",
    })
    assert g["catzilla_tasks.a"] == {"catzilla_tasks.b": "eager"}
    assert import_graph.eager_cycles(g) == [["catzilla_tasks.a", "catzilla_tasks.b", "catzilla_tasks.a"]]


def test_imports_inside_functions_and_type_checking_are_lazy(tmp_path):
    g = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from . import b\n",
        "b.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import T\n"
                 "def f():\n    from . import a\n"),
    })
    assert g["catzilla_tasks.b"] == {"catzilla_tasks.a": "lazy"}
    assert import_graph.eager_cycles(g) == []


# private names imported across modules that predate the check, to be given public names
# (the compiler package's modules share their helpers; _hooks.py hands the engine's hooks to C)
KNOWN_PRIVATE = {
    "catzilla_tasks._hooks": {"_cancel_async", "_failed", "_isolate", "_report_error", "_run_coroutine"},
    "catzilla_tasks.compiler": {"_registered", "_Spec", "_numba_missing"},
    "catzilla_tasks.compiler.cache": {"_rewrite"},
    "catzilla_tasks.compiler.codegen": {
        "_MEMORY", "_cache_dir", "_cache_key", "_load_cached", "_load_trampoline", "_read_meta",
        "_trusted_dir", "_annotated_codes", "_maybe_unbound", "_mixed_kinds", "_numba_missing",
        "_static_reason", "_checked_function",
    },
    "catzilla_tasks.compiler.eligibility": {"_rewrite"},
    "catzilla_tasks.compiler.native": {
        "_Spec", "_annotated_codes", "_numba_missing", "_static_reason", "_ABSENT", "_globals_of",
    },
    "catzilla_tasks.mapping": {"_Spec"},
}


def test_no_module_imports_another_modules_private_name():
    found = {m: {n.rpartition(".")[2] for n in names} for m, names in import_graph.private_imports().items()}
    new = {m: sorted(names - KNOWN_PRIVATE.get(m, set())) for m, names in found.items()}
    assert not {m: n for m, n in new.items() if n}, "use (or add) a public name instead"
    # the brokers and the workflows never did
    assert not [m for m in found if m.startswith(("catzilla_tasks.brokers", "catzilla_tasks.workflows"))]


def test_a_private_name_imported_from_another_module_is_found(tmp_path):
    for rel, text in {
        "__init__.py": "__version__ = '1'\n",
        "a.py": "from .b import _hidden, shown\nfrom . import __version__\n",
        "b.py": "_hidden = shown = 1\n",
        "sub/__init__.py": "",
        "sub/_helpers.py": "_inner = 1\n",
        "sub/user.py": "from ._helpers import _inner\n",  # a private helper module of its own package
    }.items():
        p = tmp_path / "catzilla_tasks" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    assert import_graph.private_imports(tmp_path) == {"catzilla_tasks.a": ["catzilla_tasks.b._hidden"]}
