"""Attack tests of issue 19 parts 2, 5, 6 (rate/concurrency limits, named queues, progress)."""

from __future__ import annotations

import threading
import time

import pytest
from redis_helpers import prefix, redis, redis_url  # noqa: F401  (fixtures)

from catzilla_tasks import BackgroundTasks, TaskConfig
from catzilla_tasks.config import parse_rate


# -- rate_limit strings -------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["1/" + "9" * 400 + "s", "1/99999999999h", "0.0000001/s", "1/100000000h"])
def test_a_rate_limit_slower_than_one_a_day_is_refused_at_the_decorator(bad):
    # an infinite period was taken (and the first call raised OverflowError); a period of
    # centuries was taken and the second call failed with "delay_ms ... past 100 years" while
    # it still pushed the limit's next slot further for every call after it
    with pytest.raises(ValueError, match="rate_limit"):
        parse_rate(bad)
    with pytest.raises(ValueError, match="rate_limit"):
        TaskConfig(rate_limit=bad)


def test_slow_but_sane_rate_limits_are_taken():
    assert parse_rate("1/24h") == (1.0, 86400.0)
    assert parse_rate("2/h") == (2.0, 3600.0)
    assert parse_rate(" 100 / s ") == (100.0, 1.0)


def test_a_rate_limit_in_non_ascii_digits_is_refused():
    with pytest.raises(ValueError, match="rate_limit"):
        parse_rate("\u0661\u0660\u0660/s")  # Arabic-Indic 100


# -- named queues: join() and shutdown() see work one queue hands another ----------------------
@pytest.mark.timeout(30)
def test_join_waits_for_a_task_a_default_task_puts_on_a_named_queue(make_tasks):
    tasks = make_tasks(workers=2, queues={"emails": 1})
    sent = threading.Event()
    done = []

    @tasks.task(queue="emails")
    def email(x):
        time.sleep(0.2)
        done.append(x)

    def parent():
        time.sleep(0.1)
        tasks.add_task(email, 1)
        sent.set()

    tasks.add_task(parent)
    tasks.join(10)
    assert sent.is_set()
    assert done == [1]  # join returned while the email was still queued


@pytest.mark.timeout(30)
def test_join_waits_for_a_task_a_named_queue_puts_on_the_default_one(make_tasks):
    tasks = make_tasks(workers=2, queues={"emails": 1})
    done = []

    def follow_up(x):
        time.sleep(0.2)
        done.append(x)

    @tasks.task(queue="emails")
    def email(x):
        time.sleep(0.1)
        tasks.add_task(follow_up, x)

    tasks.add_task(email, 7)
    tasks.join(10)
    assert done == [7]


@pytest.mark.timeout(30)
def test_shutdown_with_completion_runs_what_a_default_task_puts_on_a_named_queue():
    tasks = BackgroundTasks(workers=2, queues={"emails": 1})
    done = []
    errors = []

    started = threading.Event()

    @tasks.task(queue="emails")
    def email(x):
        done.append(x)

    def parent():
        started.set()
        # it hands the email on once shutdown() has begun (was: after 0.3 s; a test thread late
        # by that much let the call in before shutdown(), and nothing here was tested)
        deadline = time.monotonic() + 10
        while tasks.stats()["accepting"] and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            tasks.add_task(email, 1)
        except Exception as exc:  # refused: the named queue was shut down under the running task
            errors.append(exc)

    tasks.add_task(parent)
    assert started.wait(10)
    tasks.shutdown(wait_for_completion=True, timeout=10)
    assert errors == []
    assert done == [1]


@pytest.mark.xfail(
    strict=True,
    reason="known, not fixed: shutdown() closes the default engine to threads not its own (C "
    "closed_to_caller), and a named queue's workers are not its own; needs the engines of one "
    "BackgroundTasks to count each other's threads as inside",
)
@pytest.mark.timeout(30)
def test_shutdown_with_completion_runs_what_a_named_queue_task_puts_on_the_default_one():
    tasks = BackgroundTasks(workers=2, queues={"emails": 1})
    done = []
    errors = []

    started = threading.Event()

    def follow_up(x):
        done.append(x)

    @tasks.task(queue="emails")
    def email(x):
        started.set()
        # it hands its follow-up on once shutdown() has begun (was: after 0.3 s; a test thread
        # late by that much let the call in before shutdown(), and the strict xfail passed)
        deadline = time.monotonic() + 10
        while tasks.stats()["accepting"] and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            tasks.add_task(follow_up, x)
        except Exception as exc:  # refused: the default queue was closed under the running task
            errors.append(exc)

    tasks.add_task(email, 3)
    assert started.wait(10)
    tasks.shutdown(wait_for_completion=True, timeout=10)
    assert errors == []
    assert done == [3]


# -- Redis: a lapsed lease of a task still running ----------------------------------------------
@pytest.mark.timeout(120)
def test_redis_lease_lapsed_while_its_task_runs_is_taken_back_so_no_third_task_starts(redis_url, prefix, monkeypatch):
    """A running task's concurrency lease lapses when its worker cannot reach Redis for the
    visibility timeout (an outage, a stall). Its heartbeat extended only leases still present
    (ZADD XX), so the lapsed one was gone for good: one more task than the limit then ran."""
    import limit_tasks as lt
    from test_rate_limits import Cluster

    c = Cluster(redis_url, prefix, monkeypatch)
    try:
        counter, log = f"{prefix}:running", f"{prefix}:seen"
        lease_key = f"{prefix}:cc:{lt.limited.__module__}.limited"
        c.worker(concurrency=4, visibility_timeout=1.0)
        p = c.producer
        long = [p.add_task(lt.limited, counter, log, 4.0) for _ in range(2)]
        deadline = time.monotonic() + 20
        while int(c.r.get(counter) or 0) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # both leases lapse (as after an outage longer than the visibility timeout)
        c.r.zadd(lease_key, dict.fromkeys(c.r.zrange(lease_key, 0, -1), 1))
        # the next heartbeat drops them as expired: and takes them back, the tasks still run here
        deadline = time.monotonic() + 5
        while c.r.zcount(lease_key, 2, "+inf") < 2:
            assert time.monotonic() < deadline, c.r.zrange(lease_key, 0, -1, withscores=True)
            time.sleep(0.02)
        third = p.add_task(lt.limited, counter, log, 0.01)
        assert third.wait(30) <= 2
        for h in long:
            assert h.wait(30) <= 2
        assert max(int(x) for x in c.r.lrange(log, 0, -1)) <= 2
    finally:
        c.close()
