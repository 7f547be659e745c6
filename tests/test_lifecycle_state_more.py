"""A stateful property test of the engine's lifecycle (issue 12): random interleavings of
submissions (plain, failing, async, tasks that wait on tasks, tasks that add tasks), cancels,
waits with timeouts, lookups by id, handles dropped, workers added and retired, and a shutdown
with or without waiting. Invariants: every task ends in exactly one final state that matches
what happened to it, every success callback runs exactly once, the counters add up, and the
nodes go back to the slab once the handles are gone."""

import asyncio
import gc
import threading

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from catzilla_tasks import BackgroundTasks, TaskCancelled, TaskResult, TaskStatus

FINAL = {TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.TIMED_OUT}


class Boom(Exception):
    pass


def ok(x):
    return x


def fail(x):
    raise Boom(x)


async def async_ok(x):
    await asyncio.sleep(0)
    return x


class Lifecycle(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        gc.collect()
        self.base_nodes = BackgroundTasks.memory_stats()["nodes_in_use"]
        self.eng = BackgroundTasks(workers=2, max_workers=8, enable_auto_scaling=False)
        self.tasks = []  # [handle, kind, value, cancelled_ok]
        self.calls = {}  # index -> success callbacks run
        self.lock = threading.Lock()
        self.stopped = False

    def _track(self, h, kind, value):
        i = len(self.tasks)
        self.tasks.append([h, kind, value, False])
        self.calls[i] = 0

        def cb(_v, i=i):
            with self.lock:
                self.calls[i] += 1

        h.add_callback(cb)

    def _pick(self, data):
        # an index, not the entry: hypothesis keeps what was drawn (for its report), and a
        # drawn handle would outlive the example
        return self.tasks[data.draw(st.integers(0, len(self.tasks) - 1))]

    @precondition(lambda self: not self.stopped)
    @rule(kind=st.sampled_from(["ok", "fail", "async", "waits", "spawns"]), value=st.integers(0, 1000))
    def submit(self, kind, value):
        eng = self.eng
        if kind == "ok":
            h = eng.add_task(ok, value)
        elif kind == "fail":
            h = eng.add_task(fail, value)
        elif kind == "async":
            h = eng.add_task(async_ok, value)
        elif kind == "waits":  # a task waiting on a task (a stand-in worker runs the child)
            h = eng.add_task(lambda v: eng.add_task(ok, v).wait(30), value)
        else:  # a task adding a task it does not wait for (it runs, even during a shutdown)
            h = eng.add_task(lambda v: (eng.add_task(ok, v), v)[1], value)
        self._track(h, kind, value)

    @precondition(lambda self: self.tasks)
    @rule(data=st.data())
    def cancel(self, data):
        t = self._pick(data)
        if t[0] is not None and t[0].cancel():
            t[3] = True

    @precondition(lambda self: self.tasks)
    @rule(data=st.data(), timeout=st.sampled_from([0, 0.001, 0.05]))
    def wait(self, data, timeout):
        t = self._pick(data)
        h = t[0]
        if h is None:
            return
        try:
            h.wait(timeout)
        except (TimeoutError, Boom, TaskCancelled):
            pass
        except RuntimeError as exc:
            assert "shut down" in str(exc) or "forked" in str(exc), exc

    @precondition(lambda self: self.tasks)
    @rule(data=st.data())
    def lookup(self, data):
        t = self._pick(data)
        if t[0] is None:
            return
        again = TaskResult(t[0].get_stats()["task_id"])
        assert again.get_stats()["task_id"] == t[0].get_stats()["task_id"]

    @precondition(lambda self: self.tasks)
    @rule(data=st.data())
    def drop(self, data):
        t = self._pick(data)
        t[0] = None  # the handle goes; the task still runs

    @precondition(lambda self: not self.stopped)
    @rule(grow=st.booleans())
    def resize(self, grow):
        if grow:
            self.eng._add_worker()
        else:
            self.eng._retire_worker()

    @precondition(lambda self: not self.stopped)
    @rule(wait=st.booleans())
    def shutdown(self, wait):
        self.eng.shutdown(wait_for_completion=wait, timeout=30)
        self.stopped = True

    @rule()
    def read_stats(self):
        s = self.eng.stats()
        assert s["queued_total"] >= 0 and s["running"] >= 0 and s["batched"] <= s["queued_total"]

    @invariant()
    def statuses_are_known(self):
        for t in self.tasks:
            if t[0] is not None:
                assert t[0].status in FINAL | {TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.SCHEDULED}

    def teardown(self):
        eng = self.eng
        if not self.stopped:
            eng.shutdown(wait_for_completion=True, timeout=30)
        for i, (h, kind, value, cancelled) in enumerate(self.tasks):
            if h is None:
                continue
            s = h.status
            assert s in FINAL, (kind, s)
            if cancelled:
                # (cancel() on a running async task asks its coroutine to stop: one that had
                # already returned ends SUCCEEDED)
                assert s is TaskStatus.CANCELLED or (kind == "async" and s is TaskStatus.SUCCEEDED), (kind, s)
            if s is TaskStatus.SUCCEEDED:
                assert kind != "fail"
                assert h.wait(0) == value
                assert self.calls[i] == 1, (kind, self.calls[i])
            else:
                assert self.calls[i] == 0
                if s is TaskStatus.FAILED:
                    assert kind == "fail"
                    with pytest.raises(Boom):
                        h.wait(0)
        st_ = eng.stats()
        assert st_["queued_total"] == 0 and st_["running"] == 0 and st_["workers"] == 0
        assert st_["submitted"] == st_["succeeded"] + st_["failed"] + st_["cancelled"] + st_["timed_out"]
        self.tasks.clear()
        h = None  # (the loop's last handle)
        del self.eng, eng
        gc.collect()
        assert BackgroundTasks.memory_stats()["nodes_in_use"] <= self.base_nodes


Lifecycle.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_lifecycle = pytest.mark.timeout(300)(Lifecycle.TestCase)
