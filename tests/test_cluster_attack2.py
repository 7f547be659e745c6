"""Second adversarial round on the cluster registry (issue 20): claiming a worker id
(WorkerIdInUse) in one process, a worker of several queues whose setup fails after its claim,
and a worker judged lost that comes back after another took its id."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import redis_tasks as rt
from redis_helpers import prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)
from test_cluster_registry import stop, worker_with_id

from catzilla_tasks import BackgroundTasks
from catzilla_tasks.brokers import RedisBroker, Worker, WorkerIdInUse
from catzilla_tasks.brokers.cluster import ClusterView
from catzilla_tasks.brokers.routing import MultiQueueWorker


def _run_in_thread(w) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            w.run()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


@pytest.mark.timeout(60)
def test_two_workers_of_one_process_under_one_id_the_second_is_refused(redis_url, prefix):
    """Two Workers of one process given one id share a consumer name as two processes would (each
    taking over what the other holds): the second is refused as a second process is, not let in
    because its host and pid are the first's. Once the first stopped, the id is free."""
    b = RedisBroker(redis_url, prefix=prefix)
    eng = BackgroundTasks(workers=2, broker=b)
    view = ClusterView(b)
    a = Worker(eng, concurrency=1, consumer="one-id", heartbeat_interval=0.5)
    ta, errors_a = _run_in_thread(a)
    try:
        assert a.ready.wait(10)
        c = Worker(eng, concurrency=1, consumer="one-id", heartbeat_interval=0.5)
        tc, errors_c = _run_in_thread(c)
        tc.join(20)
        if tc.is_alive():  # (it runs: the defect)
            c.stop()
            tc.join(20)
        assert not c.ready.is_set()
        assert len(errors_c) == 1 and isinstance(errors_c[0], WorkerIdInUse), errors_c
        assert errors_c[0].pid == os.getpid()
        (entry,) = view.workers()
        assert entry["state"] == "alive"
    finally:
        a.stop()
        ta.join(20)
    assert errors_a == [] and view.workers() == []
    d = Worker(eng, concurrency=1, consumer="one-id", heartbeat_interval=0.5)  # the id is free again
    td, errors_d = _run_in_thread(d)
    try:
        assert d.ready.wait(10), errors_d
    finally:
        d.stop()
        td.join(20)
        view.close()
        eng.shutdown(wait_for_completion=False)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["single", "multi"])
def test_a_setup_failure_after_the_claim_raises_and_removes_the_entry(redis_url, prefix, kind):
    """A queue whose stream key holds another type (WRONGTYPE at setup): the worker's run()
    raises, its registry entry (written by the claim) is removed, and a worker of several
    queues does not wait for ever for the queue that never gets ready."""
    b = RedisBroker(redis_url, prefix=prefix)
    eng = BackgroundTasks(workers=2, broker=b)
    view = ClusterView(b)
    b.redis.set(f"{prefix}:bad:q1", "not a stream")
    if kind == "multi":
        w = MultiQueueWorker(eng, {"good": 1, "bad": 1}, concurrency=2, consumer="mq", heartbeat_interval=0.5)
    else:
        w = Worker(
            eng,
            RedisBroker(redis_url, prefix=prefix, queue="bad"),
            concurrency=2,
            consumer="mq",
            heartbeat_interval=0.5,
        )
    t, errors = _run_in_thread(w)
    try:
        t.join(20)
        assert not t.is_alive(), "run() still waits for the queue whose setup failed"
        assert len(errors) == 1 and isinstance(errors[0], redis.ResponseError), errors
        assert "WRONGTYPE" in str(errors[0])
        assert view.workers() == []
    finally:
        if t.is_alive():
            w.stop(1)
            t.join(5)
        view.close()
        eng.shutdown(wait_for_completion=False)


@pytest.mark.timeout(120)
def test_a_lost_worker_that_comes_back_leaves_its_successors_entry_alone(redis_url, prefix, monkeypatch):
    """Worker A is frozen (SIGSTOP: a paused VM, a long partition) past 3 beats: it is lost, and
    B takes its id (the claim lets it). When A comes back, its beats must not overwrite B's
    entry (B's host/pid, alive), nor may its stop delete it: A finds its id taken, says so and
    stops."""
    monkeypatch.setenv("CT_TEST_REDIS_URL", redis_url)
    b = RedisBroker(redis_url, prefix=prefix)
    eng = BackgroundTasks(workers=2, broker=b)
    rt.register(eng)
    view = ClusterView(b)
    a = worker_with_id(redis_url, prefix, "back-id", 0.2)
    tb = None
    try:
        wait_until(
            lambda: [(x["id"], x["pid"], x["state"]) for x in view.workers()] == [("back-id", a.pid, "alive")],
            30,
            "A alive",
        )
        os.kill(a.pid, signal.SIGSTOP)
        wait_until(lambda: [x["state"] for x in view.workers()] == ["lost"], 30, "A lost")
        # B beats slowly: an entry A deleted would stay missing until B's next beat
        w = Worker(eng, concurrency=1, consumer="back-id", heartbeat_interval=10)
        tb, errors_b = _run_in_thread(w)
        assert w.ready.wait(20), errors_b
        assert [(x["pid"], x["state"]) for x in view.workers()] == [(os.getpid(), "alive")]
        os.kill(a.pid, signal.SIGCONT)
        # A's next beat either overwrites B's entry (the defect) or finds the id taken and stops A
        wait_until(
            lambda: (
                a.poll() is not None or b.redis.hget(f"{prefix}:cluster:worker:back-id", "pid") == str(a.pid).encode()
            ),
            30,
            "A's next beat",
        )
        assert b.redis.hget(f"{prefix}:cluster:worker:back-id", "pid") == str(os.getpid()).encode(), "A overwrote B"
        out, _ = a.communicate(timeout=30)  # (A stopped, gracefully: its stop must not delete B's entry)
        assert "taken over" in out, out
        assert [(x["pid"], x["state"]) for x in view.workers()] == [(os.getpid(), "alive")]
    finally:
        if a.poll() is None:
            os.kill(a.pid, signal.SIGCONT)
        stop(a)
        if tb is not None:
            w.stop()
            tb.join(20)
        assert view.workers() == []  # (B deregistered its own entry)
        view.close()
        eng.shutdown(wait_for_completion=False)


_WIDE = set("送信メールホスト")  # the wide characters this test's names use: two columns each


def _display_width(s: str) -> int:
    """Columns a terminal gives ``s``, for the strings of this test only (an oracle of its own,
    not the CLI's rule again): its wide characters take two, its combining acute accent none."""
    return len(s) + sum(c in _WIDE for c in s) - s.count("\u0301")


def test_cli_tables_align_wide_and_combining_characters(redis_url, prefix, capsys):
    """A task name in Japanese (Python identifiers may be), or with a combining accent: the
    columns after it line up on the terminal (padded by display width, not by code points),
    and ``--json`` keeps the names as they are."""
    import json

    from test_cluster_attack import _good

    from catzilla_tasks.cli import main

    r = redis.Redis.from_url(redis_url)
    now = float(r.time()[0])
    _good(r, prefix, "w1", now)
    tasks = {"t": 0, "送信メール": 5, "e\u0301te\u0301": 7, "ascii_name": 22}
    figures = {
        name: {
            "succeeded": n,
            "failed": 0,
            "retried": 0,
            "rate": 1.0,
            "run": {},
            "run_sum_ns": 0,
            "wait": {},
            "wait_sum_ns": 0,
        }
        for name, n in tasks.items()
    }
    r.hset(f"{prefix}:cluster:worker:w1", "tasks", json.dumps(figures))
    r.hset(f"{prefix}:cluster:worker:w1", "host", "ホスト")
    assert main(["tasks", "--broker", redis_url, "--prefix", prefix]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if any(ln.startswith(n) for n in ("TASK", *tasks))]
    assert len(lines) == 1 + len(tasks), lines
    # the PROCESSED column is right-aligned: its last character ends at one column in every row
    head = lines[0]
    want = _display_width(head[: head.index("PROCESSED") + len("PROCESSED")])
    for ln in lines[1:]:
        n = str(next(v for k, v in tasks.items() if ln.startswith(k + " ")))
        assert _display_width(ln[: ln.index(" " + n + " ") + 1 + len(n)]) == want, lines
    assert main(["workers", "--broker", redis_url, "--prefix", prefix]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert _display_width(lines[1][: lines[1].index(" 7 ") + 2]) == _display_width(
        lines[0][: lines[0].index("PID") + 3]
    )
    assert main(["tasks", "--broker", redis_url, "--prefix", prefix, "--json"]) == 0
    assert sorted(t["name"] for t in json.loads(capsys.readouterr().out)) == sorted(tasks)
    r.close()
