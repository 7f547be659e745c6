"""Process isolation at its edges: async tasks, a task's own subprocesses, cancel() of a
running task, a dead forkserver, SIGTERM to the process group, memory limits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import isolation_edge_helpers as h
from catzilla_tasks import BackgroundTasks, TaskStatus
from catzilla_tasks.errors import MemoryLimitExceeded, TaskTimeout, WorkerLost
from catzilla_tasks.isolation import ProcessPool

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def pool1():
    p = ProcessPool(1)
    try:
        yield p
    finally:
        p.shutdown(wait=False)


def _wait_file(path, timeout=60.0):
    """The content of a file another process writes atomically (os.replace), once it exists."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):  # another process writes it: nothing to wait on but the file
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)
    with open(path) as f:
        return f.read()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not reaped yet) is dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_dead(pid, timeout=30.0):
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# ---- 12: async def with isolation="process" -----------------------------------------------

@pytest.mark.timeout(120)
def test_async_task_runs_on_an_event_loop_in_the_child(pool1):
    assert pool1.run(h.async_add, (2, 3)) == (5, True)


@pytest.mark.timeout(120)
def test_async_isolated_task_through_the_engine(make_tasks, recwarn):
    t = make_tasks(workers=2)
    assert t.options(isolation="process").add_task(h.async_add, 4, 5).wait(60) == (9, True)
    with pytest.raises(ValueError, match="boom"):
        t.options(isolation="process").add_task(h.async_fail, "boom").wait(60)
    assert not [w for w in recwarn if "never awaited" in str(w.message)]
