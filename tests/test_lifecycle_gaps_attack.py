"""Attacks on "help while waiting" (issue 12 item 11): a worker waiting for a task nobody has
started runs it itself. Each defect test failed before its fix; the stress test is a guard."""

import collections
import contextvars
import random
import sys
import threading
import time

import pytest

from catzilla_tasks import TaskStatus, current_task

# ---- a wait that can never finish: the task waited for sits below the waiter on this thread --


@pytest.mark.timeout(60)
@pytest.mark.parametrize("links", [2, 3])
def test_a_cycle_through_a_task_run_inline_is_an_error_at_once(make_tasks, links):
    # a runs b inline (one worker: b is queued), b (or c) waits for a: a is suspended further
    # up the same thread and can only resume once the wait returns, so the wait can never end.
    eng = make_tasks(workers=1, enable_auto_scaling=False)
    box = {}

    def first():
        box["first"] = current_task()
        return box["next"][0].wait(20)

    def link(k):
        target = box["first"] if k == links - 1 else box["next"][k]
        try:
            return target.wait(5)
        except Exception as exc:
            return (type(exc).__name__, str(exc))

    def make_next():
        return [eng.add_task(link, k) for k in range(1, links)]

    gate = threading.Event()
    eng.add_task(gate.wait, 10)  # the worker is busy: every link is queued when first starts
    h = eng.add_task(first)
    box["next"] = make_next()
    t0 = time.monotonic()
    gate.set()
    kind, msg = h.wait(30)
    took = time.monotonic() - t0
    assert kind == "RuntimeError", msg
    assert "cycle" in msg and "can never finish" in msg, msg
    assert took < 3, took
    eng.join(10)
    st = eng.stats()
    assert (st["running"], st["queued_total"]) == (0, 0)


@pytest.mark.timeout(60)
def test_waiting_for_a_task_running_on_another_worker_is_no_cycle(make_tasks):
    eng = make_tasks(workers=2, enable_auto_scaling=False)
    started, gate = threading.Event(), threading.Event()

    def long():
        started.set()
        gate.wait(10)
        return "long"

    lh = eng.add_task(long)
    assert started.wait(10)

    def waiter():
        threading.Timer(0.2, gate.set).start()
        return lh.wait(10)

    assert eng.add_task(waiter).wait(20) == "long"


# ---- the task run inline starts as it would on a worker: no exception being handled -----------


@pytest.mark.timeout(60)
def test_a_task_run_inline_does_not_see_its_waiters_handled_exception(make_tasks):
    eng = make_tasks(workers=1, enable_auto_scaling=False)

    def child():
        seen = sys.exc_info()[1]
        try:
            raise ValueError("child")
        except ValueError as exc:
            return (repr(seen), repr(exc.__context__))

    def parent():
        try:
            raise RuntimeError("the parent's own")
        except RuntimeError:
            seen = eng.add_task(child).wait(10)
            after = repr(sys.exc_info()[1])  # the parent's is back once the child ran
        return seen, after

    seen, after = eng.add_task(parent).wait(20)
    assert seen == ("None", "None")
    assert after == 'RuntimeError("the parent\'s own")'


# ---- the task run inline gets a recursion budget like a worker's ---------------------------------


@pytest.mark.timeout(60)
def test_a_deep_waiter_does_not_take_the_recursion_budget_of_the_task_it_waits_for(make_tasks):
    eng = make_tasks(workers=1, enable_auto_scaling=False)
    limit = sys.getrecursionlimit()

    def deep(n):
        return 0 if n == 0 else deep(n - 1) + 1

    need = int(limit * 0.7)
    assert eng.add_task(deep, need).wait(10) == need  # fine on a worker

    def parent(n):
        if n:
            return parent(n - 1)
        return eng.add_task(deep, need).wait(10)

    assert eng.add_task(parent, limit // 2).wait(20) == need


# ---- guard: each task runs once or is cancelled, never both, under claims/pops/cancels -----------


@pytest.mark.timeout(240)
def test_claims_pops_and_cancels_run_each_task_at_most_once(make_tasks):
    runs = collections.Counter()
    lock = threading.Lock()

    def child(i):
        with lock:
            runs[i] += 1
        return i

    for rep in range(3):
        eng = make_tasks(workers=3, enable_auto_scaling=False)
        handles, hl = {}, threading.Lock()

        def parent(base, eng=eng, handles=handles, hl=hl):
            for k in range(5):
                i = base * 10 + k
                h = eng.add_task(child, i)
                with hl:
                    handles[i] = h
                if random.random() < 0.7:
                    try:
                        h.wait(10)
                    except Exception:
                        pass

        stop = threading.Event()

        def canceller(hl=hl, handles=handles, stop=stop):
            while not stop.is_set():
                with hl:
                    hs = list(handles.values())
                if hs:
                    random.choice(hs).cancel()
                time.sleep(0)

        cs = [threading.Thread(target=canceller) for _ in range(2)]
        for c in cs:
            c.start()
        ps = [eng.add_task(parent, b) for b in range(rep * 1000, rep * 1000 + 200)]
        try:
            for p in ps:
                p.wait(60)
        finally:
            stop.set()
            for c in cs:
                c.join()
        eng.join(30)
        bad = []
        for i, h in handles.items():
            s, r = h.status, runs[i]
            if not ((s == TaskStatus.CANCELLED and r == 0) or (s == TaskStatus.SUCCEEDED and r == 1)):
                bad.append((i, s, r))
        assert not bad, bad[:5]
        st = eng.stats()
        assert (st["running"], st["queued_total"]) == (0, 0)
        assert st["succeeded"] + st["cancelled"] == st["submitted"]


# ---- the task run inline cannot change its waiter's context variables ---------------------------

_CV: "contextvars.ContextVar[str]" = contextvars.ContextVar("att12_cv", default="unset")


@pytest.mark.timeout(60)
def test_a_task_run_inline_does_not_change_its_waiters_contextvars(make_tasks):
    eng = make_tasks(workers=1, enable_auto_scaling=False)

    def child():
        _CV.set("child")
        return _CV.get()

    def parent():
        _CV.set("parent")
        inner = eng.add_task(child).wait(10)
        return inner, _CV.get()

    assert eng.add_task(parent).wait(20) == ("child", "parent")


# ---- a task run inline gives its room in the queue back at once -------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("block", [False, True])
def test_tasks_run_inline_do_not_hold_room_in_a_small_queue(make_tasks, block):
    # The only worker runs each child itself while its parent waits; the child's node stays in
    # the queue until a worker pops it, but it is no queued work: it must not fill queue_size
    # (QueueFull, or a submit blocking for room only this worker could make).
    eng = make_tasks(workers=1, enable_auto_scaling=False, queue_size=4)
    sub = eng.options(block_timeout=5) if block else eng

    def child(i):
        return i

    def parent():
        return [sub.add_task(child, i).wait(10) for i in range(12)]

    assert eng.add_task(parent).wait(30) == list(range(12))
    eng.join(10)
    st = eng.stats()
    assert (st["running"], st["queued_total"], st["succeeded"], st["rejected"]) == (0, 0, 13, 0)


@pytest.mark.timeout(60)
def test_a_poll_of_a_task_suspended_below_is_a_timeout_not_an_error(make_tasks):
    # wait(0) never blocks: polling the task that runs this one inline just says "not yet"
    eng = make_tasks(workers=1, enable_auto_scaling=False)
    box = {}

    def child():
        try:
            box["parent"].wait(0)
        except TimeoutError as exc:
            return "TimeoutError", str(exc)
        except Exception as exc:
            return type(exc).__name__, str(exc)
        return "returned", ""

    def parent():
        box["parent"] = current_task()
        return eng.add_task(child).wait(10)

    kind, msg = eng.add_task(parent).wait(20)
    assert kind == "TimeoutError", msg


# ---- running a task inline does not jump it ahead of more urgent queued work -----------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("parent_priority", ["low", "critical"])
def test_inline_runs_keep_priority_order(make_tasks, parent_priority):
    # A LOW parent waiting for a LOW child while a CRITICAL task is queued: the worker must not
    # pick the LOW child over it (a stand-in takes the wait, and pops CRITICAL first). A
    # CRITICAL parent's child runs at once (the parent's priority is what is waiting).
    eng = make_tasks(workers=1, enable_auto_scaling=False)
    order = []
    started, go = threading.Event(), threading.Event()

    def child():
        order.append("child")

    def urgent():
        order.append("critical")

    def parent():
        started.set()
        go.wait(10)
        eng.options(priority="low").add_task(child).wait(10)
        return list(order)

    h = eng.options(priority=parent_priority).add_task(parent)
    assert started.wait(10)
    u = eng.options(priority="critical").add_task(urgent)
    go.set()
    seen = h.wait(20)
    u.wait(10)
    if parent_priority == "low":
        assert seen == ["critical", "child"]
    else:
        assert seen[0] == "child"
