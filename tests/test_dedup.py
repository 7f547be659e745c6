"""``idempotency_key`` in-process (issue 19, part 3): a second add_task with a key whose task is
queued, running or finished within ``idempotency_ttl`` returns the first task's handle."""

from __future__ import annotations

import threading

import pytest

from catzilla_tasks import BackgroundTasks


def test_a_second_add_task_with_the_key_returns_the_first_handle(tasks):
    gate = threading.Event()
    runs = []

    def job(x):
        runs.append(x)
        gate.wait(10)
        return x

    first = tasks.options(idempotency_key="order-1").add_task(job, 1)
    second = tasks.options(idempotency_key="order-1").add_task(job, 2)     # queued or running
    assert second is first and second.task_id == first.task_id
    gate.set()
    assert first.wait(10) == 1
    third = tasks.options(idempotency_key="order-1").add_task(job, 3)      # finished, within the TTL
    assert third is first and third.wait(1) == 1
    assert runs == [1]
    assert tasks.options(idempotency_key="order-2").add_task(job, 4).wait(10) == 4


def test_threads_submitting_one_key_at_once_queue_one_task(tasks):
    runs = []
    barrier = threading.Barrier(16)
    got = []

    def submit():
        barrier.wait()
        got.append(tasks.options(idempotency_key="k", priority="HIGH").add_task(runs.append, 1))

    threads = [threading.Thread(target=submit) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tasks.join(10)
    assert len({id(h) for h in got}) == 1 and runs == [1]


def test_after_the_ttl_a_finished_task_is_forgotten(make_tasks):
    eng = make_tasks(workers=2, idempotency_ttl=0.05)
    first = eng.options(idempotency_key="k").add_task(lambda: 1)
    assert first.wait(10) == 1
    import time

    time.sleep(0.1)  # the TTL passing is what is tested
    again = eng.options(idempotency_key="k").add_task(lambda: 2)
    assert again is not first and again.wait(10) == 2


def test_a_task_still_queued_past_the_ttl_keeps_its_key(make_tasks):
    eng = make_tasks(workers=2, idempotency_ttl=0.001)
    # (queued for 1.5 s: with 0.3 s, a test thread late by that much saw it finished and its
    # key forgotten)
    first = eng.options(idempotency_key="k", delay_ms=1500).add_task(lambda: 1)
    import time

    time.sleep(0.01)
    assert eng.options(idempotency_key="k").add_task(lambda: 2) is first
    assert first.wait(10) == 1


def test_bad_keys_and_ttls_are_refused(tasks):
    for bad in ("", 3, None.__class__):
        with pytest.raises(ValueError, match="idempotency_key"):
            tasks.options(idempotency_key=bad)
    for ttl in (0, -1, True, "1", float("nan")):
        with pytest.raises(ValueError, match="idempotency_ttl"):
            BackgroundTasks(idempotency_ttl=ttl)
