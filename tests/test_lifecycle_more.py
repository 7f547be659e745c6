"""Engine lifecycle (issue 12, items 7 and 9-15): options that do what they say, counters that
count what they name, an event loop a task cannot kill, work in worker batches seen by the
scaler, waits inside tasks, shutdown of work that spawns work, fork, slab caches of
short-lived threads."""

import asyncio
import os
import sys
import threading
import time

import pytest

import catzilla_tasks
from catzilla_tasks import BackgroundTasks, ShutdownTimeout, TaskCancelled, TaskConfig, TaskResult, TaskStatus


# -- item 14: options that do nothing or refuse the obvious -------------------------------------


@pytest.mark.timeout(60)
def test_one_worker_is_one_worker():
    with BackgroundTasks(workers=1, enable_auto_scaling=False) as eng:
        assert eng.min_workers == 1
        assert eng.stats()["workers"] == 1
        assert eng.add_task(lambda: 7).wait(10) == 7


def test_memory_pool_mb_is_refused_with_the_reason():
    with pytest.raises(TypeError, match="memory_pool_mb was removed.*queue_size"):
        BackgroundTasks(workers=1, memory_pool_mb=1)


def test_monitor_and_autoscaler_at_the_package_root():
    from catzilla_tasks.monitor import AutoScaler, TaskMonitor

    assert catzilla_tasks.TaskMonitor is TaskMonitor
    assert catzilla_tasks.AutoScaler is AutoScaler
    assert {"TaskMonitor", "AutoScaler"} <= set(catzilla_tasks.__all__)
    from catzilla_tasks import AutoScaler as A, TaskMonitor as M  # noqa: F401
