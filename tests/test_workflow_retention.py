"""A failed workflow's error does not keep its DAG alive (issue 16, item 14): once nothing but
the error (and the workflow's result) refers to the run, its plan, gates and the steps'
arguments are collected."""

from __future__ import annotations

import gc
import weakref

import pytest

from catzilla_tasks import TaskCancelled, TaskChain
from catzilla_tasks.workflows import WorkflowError


class Marker:
    """An argument whose lifetime the test watches."""


def fail():
    raise ValueError("boom")


def use(marker, *_):
    return 1


def ok():
    return 2


def _run_failing(tasks, fail_step, width=200):
    markers = [Marker() for _ in range(width)]
    refs = [weakref.ref(m) for m in markers]
    chain = TaskChain("big", tasks=tasks)
    first = chain.step(fail_step)
    side = chain.step(ok)
    for m in markers:
        chain.add_task(use, m, side, depends_on=[first])
    result = chain.execute()
    with pytest.raises(WorkflowError) as ei:
        result.wait(60)
    chain_ref = weakref.ref(chain)
    del chain, first, side, markers, m
    return result, ei.value, refs, chain_ref


@pytest.mark.timeout(120)
def test_failed_workflow_error_does_not_retain_the_dag(tasks):
    result, err, refs, chain_ref = _run_failing(tasks, fail)
    tasks.join(60)
    gc.collect()
    assert isinstance(err.__cause__, ValueError) and err.step == "big_0"
    alive = sum(r() is not None for r in refs)
    assert alive == 0, f"{alive} step arguments still alive through the error"
    assert chain_ref() is None
    with pytest.raises(WorkflowError):  # the result still says what happened
        result.wait(0)


@pytest.mark.timeout(120)
def test_cancelled_workflow_error_does_not_retain_the_dag(tasks):
    import threading

    gate = threading.Event()

    def blocked():
        gate.wait(60)

    markers = [Marker() for _ in range(50)]
    refs = [weakref.ref(m) for m in markers]
    chain = TaskChain("cancelled", tasks=tasks)
    first = chain.step(blocked)
    for m in markers:
        chain.add_task(use, m, depends_on=[first])
    result = chain.execute()
    chain.cancel()
    gate.set()
    with pytest.raises(TaskCancelled):  # the chain's own cancel() wins: the result is cancelled
        result.wait(60)
    del chain, first, markers, m
    tasks.join(60)
    gc.collect()
    assert sum(r() is not None for r in refs) == 0


def isolated_step(arg):
    return 3


@pytest.mark.timeout(120)
def test_step_that_cannot_be_queued_does_not_retain_the_dag(tasks):
    from catzilla_tasks import task

    iso = task(isolation="process")(isolated_step)
    markers = [Marker() for _ in range(50)]
    refs = [weakref.ref(m) for m in markers]
    chain = TaskChain("unpicklable", tasks=tasks)
    first = chain.step(iso, lambda: None)   # a lambda does not pickle: TypeError when queued
    for m in markers:
        chain.add_task(use, m, depends_on=[first])
    result = chain.execute()
    with pytest.raises(WorkflowError, match="could not be queued") as ei:
        result.wait(60)
    assert isinstance(ei.value.__cause__, TypeError)
    del chain, first, markers, m
    gc.collect()
    assert sum(r() is not None for r in refs) == 0
