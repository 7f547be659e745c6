"""The C engine's hooks into the Python side: one struct, set once by _engine._install_hooks
(called by catzilla_tasks/_hooks.py at import), which checks every hook before it installs any."""

import pytest

import catzilla_tasks
from catzilla_tasks import _engine, _hooks


def _valid_hooks():
    return {
        "status_members": tuple(catzilla_tasks.TaskStatus),
        "priority_members": tuple(catzilla_tasks.TaskPriority),
        "run_coroutine": print,
        "report_error": print,
        "await_impl": print,
        "cancel_async": print,
        "task_timeout": catzilla_tasks.TaskTimeout,
        "isolate": print,
        "failed": print,
        "native_reason": _hooks._native_reason,
        "route": print,
        "make_progress": print,
    }


def test_a_missing_hook_is_named():
    hooks = _valid_hooks()
    del hooks["cancel_async"]
    with pytest.raises(TypeError, match="missing hook cancel_async"):
        _engine._install_hooks(**hooks)


def test_an_unknown_hook_is_refused():
    with pytest.raises(TypeError, match="unknown hook 'run_corutine'"):
        _engine._install_hooks(**_valid_hooks(), run_corutine=print)


@pytest.mark.parametrize(
    ("name", "value", "what"),
    [("status_members", [1], "a tuple"), ("task_timeout", 3, "an exception class"), ("failed", None, "callable")],
)
def test_an_ill_typed_hook_is_refused(name, value, what):
    with pytest.raises(TypeError, match=f"hook {name} must be {what}"):
        _engine._install_hooks(**{**_valid_hooks(), name: value})


def test_positional_arguments_are_refused():
    with pytest.raises(TypeError, match="keyword arguments only"):
        _engine._install_hooks(print)


def test_the_hooks_are_installed_once_by_the_package():
    with pytest.raises(RuntimeError, match="already installed"):
        _engine._install_hooks(**_valid_hooks())


def test_compile_reason_without_the_compiler_loaded_is_none():
    # the native_reason hook asks the compiler only once it is imported
    import sys

    if "catzilla_tasks.compiler" in sys.modules:
        pytest.skip("the compiler is already loaded in this process")
    assert _hooks._native_reason(print, False) is None
