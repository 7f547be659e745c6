"""Review of issue 12 (lifecycle): inputs and paths the fixes did not cover."""

import threading

import pytest

from catzilla_tasks import BackgroundTasks, TaskResult


@pytest.mark.timeout(60)
def test_task_result_refuses_ids_that_only_parse_like_a_live_one():
    with BackgroundTasks(workers=1, enable_auto_scaling=False) as eng:
        gate = threading.Event()
        h = eng.add_task(gate.wait, 30)
        tid = h.task_id
        prefix, num = tid.rsplit("-", 1)
        assert TaskResult(tid) is h
        wrapped = str(2**64 - int(num))  # strtoull("-N") wraps around to N
        for bad in (tid + "\x00", tid + "\x00junk", f"{prefix}- {num}", f"{prefix}-+{num}",
                    f"{prefix}-0{num}", f"{prefix}--{wrapped}", f"{prefix}-{num} "):
            with pytest.raises(LookupError):
                TaskResult(bad)
        gate.set()
        assert h.wait(10) is True
