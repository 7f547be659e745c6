"""A stateful property test of the engine's lifecycle (issue 12).

Random interleavings of submit (plain, failing, blocking; with a timeout, retries or a delay),
cancel, waits with timeouts, handles made and dropped, done/success callbacks and then-chains,
waiter threads, adding and retiring workers, and shutdown with or without waiting. Checked
throughout: a handle always reads its own task (no record reused while a handle exists); at
the end: every task is in exactly one final state that its kind allows, every callback and
every waiter was released exactly once, and the engine's node count returns to where it
started once the handles are gone.
"""

import gc
import threading
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import catzilla_tasks
from catzilla_tasks import BackgroundTasks, TaskCancelled, TaskFuture, TaskResult, TaskStatus, TaskTimeout

FINAL = {TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.TIMED_OUT}
ALLOWED = {
    "ok": {TaskStatus.SUCCEEDED, TaskStatus.CANCELLED},
    "fail": {TaskStatus.FAILED, TaskStatus.CANCELLED},
    "block": {TaskStatus.SUCCEEDED, TaskStatus.CANCELLED, TaskStatus.TIMED_OUT},
}
OPTIONS = {
    "none": {},
    "timeout": {"timeout_ms": 30},
    "retries": {"max_retries": 1, "retry_base_ms": 1, "retry_jitter": False},
    "delay": {"delay_ms": 150},  # long enough to be still pending at a later step
}


def ok(i):
    return i


def fail(i):
    raise ValueError(f"fail {i}")


def block(i, gate):
    # Polls (never blocks in C) so a timeout's TaskTimeout lands at once; bounded.
    deadline = time.monotonic() + 20
    while not gate.is_set() and time.monotonic() < deadline:
        time.sleep(0.002)
    return i


def _nodes():
    for _ in range(3):
        gc.collect()
    return catzilla_tasks._engine.memory_stats()["nodes_in_use"]


class Record:
    def __init__(self, n, kind, option, handle, gate):
        self.n, self.kind, self.option, self.gate = n, kind, option, gate
        self.handle = handle
        self.task_id = handle.task_id  # read: the task can be looked up by id
        self.extra = []  # more handles made with TaskResult(task_id)
        self.done_calls = []  # one entry per call of each done-callback
        self.n_done = 0  # done-callbacks attached
        self.success_calls = []
        self.n_success = 0
        self.futures = []
        self.waiters = []  # (thread, results list)


class Lifecycle(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.baseline = _nodes()
        self.eng = BackgroundTasks(
            workers=2, min_workers=1, max_workers=6, enable_auto_scaling=False, queue_size=1000
        )
        self.records = []
        self.closed = False

    # -- helpers -------------------------------------------------------------------------
    def _pick(self, i):
        return self.records[i % len(self.records)]

    def _handles(self, rec):
        return ([rec.handle] if rec.handle is not None else []) + rec.extra

    # -- rules -----------------------------------------------------------------------------
    @rule(kind=st.sampled_from(sorted(ALLOWED)), option=st.sampled_from(sorted(OPTIONS)))
    def submit(self, kind, option):
        n = len(self.records)
        gate = threading.Event()
        args = (n, gate) if kind == "block" else (n,)
        func = {"ok": ok, "fail": fail, "block": block}[kind]
        opts = self.eng.options(**OPTIONS[option]) if OPTIONS[option] else self.eng
        if self.closed:
            with pytest.raises(RuntimeError, match="shut down"):
                opts.add_task(func, *args)
            return
        self.records.append(Record(n, kind, option, opts.add_task(func, *args), gate))

    @precondition(lambda self: self.records)
    @rule(i=st.integers(0, 10**6))
    def cancel(self, i):
        rec = self._pick(i)
        for h in self._handles(rec)[:1]:
            was_final = h.is_ready()
            took = h.cancel()
            if was_final:
                assert took is False
            if took:
                assert h.status is TaskStatus.CANCELLED

    @precondition(lambda self: self.records)
    @rule(i=st.integers(0, 10**6), timeout=st.sampled_from([0, 0.01, 0.05]))
    def wait(self, i, timeout):
        rec = self._pick(i)
        for h in self._handles(rec)[:1]:
            try:
                v = h.wait(timeout)
            except TimeoutError as exc:
                if isinstance(exc, TaskTimeout):
                    assert h.status is TaskStatus.TIMED_OUT
                else:
                    assert "did not finish" in str(exc)
            except TaskCancelled:
                assert h.status is TaskStatus.CANCELLED
            except ValueError as exc:
                assert rec.kind == "fail" and str(exc) == f"fail {rec.n}"
                assert h.status is TaskStatus.FAILED
            else:
                assert v == rec.n and h.status is TaskStatus.SUCCEEDED

    @precondition(lambda self: self.records)
    @rule(i=st.integers(0, 10**6))
    def release(self, i):
        self._pick(i).gate.set()

    @precondition(lambda self: self.records)
    @rule(i=st.integers(0, 10**6))
    def make_handle(self, i):
        rec = self._pick(i)
        alive = bool(self._handles(rec))  # (a finished waiter thread, a future: no hold on it)
        try:
            h = TaskResult(rec.task_id)
        except LookupError:
            assert not alive, "a task with live handles could not be found by id"
            return
        assert h.task_id == rec.task_id
        rec.extra.append(h)

    @precondition(lambda self: self.records)
    @rule(i=st.integers(0, 10**6), which=st.integers(0, 3))
    def drop_handle(self, i, which):
        rec = self._pick(i)
        if which == 0 or not rec.extra:
            rec.handle = None
        else:
            rec.extra.pop(which % len(rec.extra))

    @precondition(lambda self: self.records)
    @rule(i=st.integers(0, 10**6), success_only=st.booleans())
    def add_callback(self, i, success_only):
        rec = self._pick(i)
        for h in self._handles(rec)[:1]:
            if success_only:
                rec.n_success += 1
                h.add_callback(rec.success_calls.append)
            else:
                rec.n_done += 1
                h._on_done(lambda r, rec=rec: rec.done_calls.append(r.status))

    @precondition(lambda self: self.records)
    @rule(i=st.integers(0, 10**6))
    def then_chain(self, i):
        rec = self._pick(i)
        for h in self._handles(rec)[:1]:
            rec.futures.append(TaskFuture(h).then(lambda v: ("then", v)))

    @precondition(lambda self: self.records)
    @rule(i=st.integers(0, 10**6))
    def waiter_thread(self, i):
        rec = self._pick(i)
        for h in self._handles(rec)[:1]:
            out = []

            def wait_for_it(h=h, out=out):
                try:
                    out.append(("value", h.wait(30)))
                except BaseException as exc:  # noqa: BLE001 - any outcome is recorded
                    out.append(("error", exc))

            th = threading.Thread(target=wait_for_it, daemon=True)
            th.start()
            rec.waiters.append((th, out))

    @precondition(lambda self: not self.closed)
    @rule()
    def add_worker(self):
        self.eng._add_worker()

    @precondition(lambda self: not self.closed)
    @rule()
    def retire_worker(self):
        self.eng._retire_worker()

    @precondition(lambda self: not self.closed)
    @rule(wait=st.booleans())
    def shutdown(self, wait):
        if wait:
            self._release_all()
            self.eng.shutdown(wait_for_completion=True, timeout=30)
        else:
            # what is queued behind running tasks is cancelled; those finish a moment later
            timer = threading.Timer(0.05, self._release_all)
            timer.start()
            self.eng.shutdown(wait_for_completion=False, timeout=30)
            timer.join()
        self.closed = True
        for rec in self.records:
            for h in self._handles(rec):
                assert h.status in FINAL

    # -- invariants ----------------------------------------------------------------------
    @invariant()
    def handles_read_their_own_task(self):
        for rec in self.records:
            for h in self._handles(rec):
                assert h.task_id == rec.task_id
                assert h.status in ALLOWED[rec.kind] | {TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.SCHEDULED}

    @invariant()
    def callbacks_run_at_most_once(self):
        for rec in self.records:
            assert len(rec.done_calls) <= rec.n_done
            assert len(rec.success_calls) <= rec.n_success

    # -- the end ---------------------------------------------------------------------------
    def _release_all(self):
        for rec in self.records:
            rec.gate.set()

    def teardown(self):
        self._release_all()
        if not self.closed:
            self.eng.shutdown(wait_for_completion=True, timeout=30)
        self._check_all()  # (in a function of its own: no local outlives it)
        self.records.clear()
        self.eng = None
        after = _nodes()
        assert after == self.baseline, (
            f"{after - self.baseline} task records left after the engine and its handles went"
        )

    def _check_all(self):
        for rec in self.records:
            for th, _ in rec.waiters:
                th.join(30)
                assert not th.is_alive(), "a waiter was never released"
        for rec in self.records:
            self._check_final(rec)

    def _check_final(self, rec):
        statuses = {h.status for h in self._handles(rec)}
        assert len(statuses) <= 1 and statuses <= ALLOWED[rec.kind], (rec.kind, rec.option, statuses)
        # every done-callback exactly once, with the final state
        assert len(rec.done_calls) == rec.n_done, (rec.kind, rec.option, rec.done_calls, rec.n_done)
        assert set(rec.done_calls) <= ALLOWED[rec.kind]
        if len(set(rec.done_calls)) > 1:
            raise AssertionError(f"callbacks saw two final states: {rec.done_calls}")
        final = rec.done_calls[0] if rec.done_calls else next(iter(statuses), None)
        # success callbacks: exactly once on success, never otherwise
        if final is not None:
            expect = rec.n_success if final is TaskStatus.SUCCEEDED else 0
            assert len(rec.success_calls) == expect
            assert rec.success_calls == [rec.n] * expect
        for f in rec.futures:
            assert f.is_ready(), "a then-chain was never settled"
        for _, out in rec.waiters:
            assert len(out) == 1  # released exactly once
            what, v = out[0]
            if what == "value":
                assert v == rec.n
            else:
                assert isinstance(v, (ValueError, TaskCancelled, TaskTimeout)), repr(v)


Lifecycle.TestCase.settings = settings(
    max_examples=int(__import__("os").environ.get("CATZILLA_TASKS_STATE_EXAMPLES", "40")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestLifecycle = pytest.mark.timeout(900)(Lifecycle.TestCase)
