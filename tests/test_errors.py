"""One error tree: every public exception derives from CatzillaTasksError (keeping its builtin
base), is the one class in errors.py wherever it is imported from (the C extension included),
and a remote error of each of our types comes back as the same class."""

from __future__ import annotations

import json
import pickle

import pytest
from redis_tasks import our_error

import catzilla_tasks
from catzilla_tasks import BackgroundTasks, errors
from catzilla_tasks.brokers.serialization import Serializer

PUBLIC = [getattr(errors, name) for name in errors.__all__ if name != "CatzillaTasksError"]

# the builtin base each class had before the tree existed
BUILTIN_BASE = {
    errors.TaskTimeout: TimeoutError,
    errors.ShutdownTimeout: TimeoutError,
    errors.MemoryLimitExceeded: MemoryError,
    errors.CompileError: TypeError,
    errors.DecodeError: ValueError,
}


@pytest.mark.parametrize("kind", PUBLIC, ids=lambda k: k.__name__)
def test_every_public_error_is_a_catzilla_tasks_error_and_keeps_its_builtin_base(kind):
    assert issubclass(kind, catzilla_tasks.CatzillaTasksError)
    assert issubclass(kind, BUILTIN_BASE.get(kind, Exception))
    assert kind.__module__ == "catzilla_tasks.errors"


def test_no_error_class_is_defined_outside_errors_py():
    import catzilla_tasks.brokers.redis
    import catzilla_tasks.brokers.serialization
    import catzilla_tasks.compiler
    import catzilla_tasks.engine
    import catzilla_tasks.isolation
    import catzilla_tasks.workflows
    from catzilla_tasks import _engine

    same = {
        _engine.QueueFull: errors.QueueFull,
        _engine.TaskCancelled: errors.TaskCancelled,
        catzilla_tasks.QueueFull: errors.QueueFull,
        catzilla_tasks.TaskCancelled: errors.TaskCancelled,
        catzilla_tasks.ShutdownTimeout: errors.ShutdownTimeout,
        catzilla_tasks.engine.ShutdownTimeout: errors.ShutdownTimeout,
        catzilla_tasks.WorkflowError: errors.WorkflowError,
        catzilla_tasks.workflows.WorkflowError: errors.WorkflowError,
        catzilla_tasks.CompileError: errors.CompileError,
        catzilla_tasks.compiler.CompileError: errors.CompileError,
        catzilla_tasks.brokers.redis.RemoteTaskError: errors.RemoteTaskError,
        catzilla_tasks.brokers.RemoteTaskError: errors.RemoteTaskError,
        catzilla_tasks.brokers.serialization.DecodeError: errors.DecodeError,
        catzilla_tasks.isolation.ChildTraceback: errors.ChildTraceback,
    }
    for there, here in same.items():
        assert there is here


@pytest.mark.timeout(60)
def test_the_engine_raises_the_classes_of_errors_py():
    tasks = BackgroundTasks(workers=1, queue_size=1)
    try:
        tasks.pause()
        queued = tasks.add_task(int)
        with pytest.raises(catzilla_tasks.CatzillaTasksError) as full:
            tasks.add_task(int)
        assert type(full.value) is errors.QueueFull
        assert queued.cancel()
        with pytest.raises(catzilla_tasks.CatzillaTasksError) as cancelled:
            queued.wait(5)
        assert type(cancelled.value) is errors.TaskCancelled
    finally:
        tasks.shutdown(wait_for_completion=False)


def _attrs(exc: BaseException) -> dict:
    return {k: getattr(exc, k) for k in type(exc)._remote_fields}


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
@pytest.mark.parametrize("kind", PUBLIC, ids=lambda k: k.__name__)
def test_a_remote_error_of_each_of_our_types_round_trips_to_the_same_class(kind, fmt):
    sent = our_error(kind.__name__)
    ser = Serializer(fmt)
    back = errors.decode_error(ser.loads(ser.dumps(errors.encode_error(sent))))
    assert type(back) is kind
    assert str(back) == str(sent)
    assert _attrs(back) == _attrs(sent)
    if kind is not errors.RemoteTaskError:  # that one keeps the innermost remote traceback
        assert f"{kind.__name__}" in back.remote_traceback


@pytest.mark.parametrize("kind", PUBLIC, ids=lambda k: k.__name__)
def test_a_pickled_error_comes_back_as_the_same_class(kind):
    # process isolation sends a task's exception to the parent with pickle
    sent = our_error(kind.__name__)
    back = pickle.loads(pickle.dumps(sent))
    assert type(back) is kind and str(back) == str(sent)
    assert back.__dict__ == sent.__dict__  # WorkflowError could not be unpickled before


def test_records_written_under_the_old_names_still_decode():
    # results a worker of an older version left in Redis
    old = {
        "catzilla_tasks.TaskCancelled": errors.TaskCancelled,
        "catzilla_tasks.errors.TaskTimeout": errors.TaskTimeout,
        "catzilla_tasks.workflows.WorkflowError": errors.WorkflowError,
        "catzilla_tasks.engine.ShutdownTimeout": errors.ShutdownTimeout,
        "catzilla_tasks.compiler.CompileError": errors.CompileError,
    }
    for name, kind in old.items():
        assert type(errors.decode_error([name, "msg", "tb"])) is kind
    wf = errors.decode_error(["catzilla_tasks.workflows.WorkflowError", "step 'a' failed", "tb",
                              {"workflow": "w", "step": "a", "cause": ["ValueError", "bad", "tb2"]}])
    assert (wf.workflow, wf.step) == ("w", "a")
    assert type(wf.__cause__) is ValueError and str(wf.__cause__) == "bad"


def test_builtins_come_back_as_themselves_and_strangers_as_remote_task_error():
    assert type(errors.decode_error(["KeyError", "'k'", "tb"])) is KeyError
    odd = errors.decode_error(["some.module.Odd", "odd", "Traceback: odd"])
    assert type(odd) is errors.RemoteTaskError
    assert (odd.type_name, odd.remote_traceback) == ("some.module.Odd", "Traceback: odd")
    # a builtin name that is not an exception is not called
    assert type(errors.decode_error(["print", "x", ""])) is errors.RemoteTaskError
    assert type(errors.decode_error(json.loads("42"))) is Exception  # not a record: its repr as the message


def test_errors_py_imports_nothing_of_the_package():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(errors.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("catzilla_tasks"), ast.dump(node)
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("catzilla_tasks") for a in node.names)
