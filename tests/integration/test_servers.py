"""Catzilla (both patterns) and FastAPI on uvicorn, as real servers in subprocesses.

Each test: routes enqueue tasks of several priorities over HTTP; the tasks' side effects (lines
in a file) and /tasks/stats are checked; SIGTERM with tasks still queued must run them all
before the process exits. The server has one worker held by a blocker task while the others
are queued, so "still queued" and the priority order are facts, not timing luck.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

APP = "tests/integration/server_app.py"
MODES = ["catzilla_plain", "catzilla_enable", "fastapi", "fastapi_plain"]
# POST order; the only worker is blocked meanwhile, so they run by priority, FIFO within one
JOBS = [("low", "a"), ("normal", "b"), ("high", "c"), ("critical", "d"), ("low", "e"), ("high", "f")]
EXPECTED_ORDER = ["critical d", "high c", "high f", "normal b", "low a", "low e"]


def _block_worker(srv, seconds: float) -> None:
    srv.json("POST", f"/block?s={seconds}")
    # the blocker has left the queue and holds the only worker
    srv.wait_stats(lambda s: s["totals"]["submitted"] == 1 and s["queue_metrics"]["total_queued"] == 0
                   and s["worker_metrics"]["active_workers"] == 1, "the blocker to start")


def _queue_jobs(srv) -> None:
    for prio, key in JOBS:
        body = srv.json("POST", f"/jobs/{prio}/{key}")
        assert body["status"] == "queued" and body["task_id"]
    q = srv.stats()["queue_metrics"]
    assert (q["critical_queue_size"], q["high_queue_size"], q["normal_queue_size"], q["low_queue_size"]) == (1, 2, 1, 2)
    assert q["total_queued"] == 6


def _lines(out: Path) -> list[str]:
    return out.read_text().splitlines() if out.exists() else []


@pytest.mark.parametrize("mode", MODES)
def test_routes_enqueue_tasks_that_run_by_priority(mode, start_server, tmp_path):
    out = tmp_path / "out.txt"
    srv = start_server(APP, mode, "{port}", str(out))
    _block_worker(srv, 60)
    _queue_jobs(srv)
    assert _lines(out) == []
    assert srv.json("POST", "/release") == {"released": True}
    s = srv.wait_stats(lambda s: s["totals"]["succeeded"] == 7, "all 7 tasks to succeed")
    assert _lines(out) == EXPECTED_ORDER
    assert s["totals"]["submitted"] == 7 and s["totals"]["failed"] == 0
    assert s["queue_metrics"]["total_queued"] == 0
    assert s["performance_metrics"]["p99_execution_time_ms"] > 0

    status, ctype, page = srv.request("GET", "/tasks/dashboard/")
    assert status == 200 and ctype.startswith("text/html") and b"<html" in page
    assert srv.json("GET", "/tasks/dashboard/stats.json")["totals"]["succeeded"] == 7
    status, ctype, metrics = srv.request("GET", "/tasks/metrics")
    assert status == 200 and b"catzilla_tasks_tasks_succeeded_total" in metrics

    assert srv.terminate() in (0, -signal.SIGTERM, 128 + signal.SIGTERM)


@pytest.mark.parametrize("mode", MODES)
def test_sigterm_runs_every_queued_task_before_exit(mode, start_server, tmp_path):
    out = tmp_path / "out.txt"
    srv = start_server(APP, mode, "{port}", str(out))
    _block_worker(srv, 60)  # it ends when the shutdown begins: a running task, then 6 queued
    _queue_jobs(srv)
    rc = srv.terminate()
    log = srv.output()
    assert _lines(out) == EXPECTED_ORDER, log
    assert "Traceback" not in log, log
    # Catzilla returns from listen() and exits normally (0). uvicorn re-raises SIGTERM after its
    # shutdown: with the lifespan's engine nothing handles it (-SIGTERM, the queue already drained);
    # with a module-level engine our handler drains it and exits with 128 + SIGTERM.
    expected = {"fastapi": -signal.SIGTERM, "fastapi_plain": 128 + signal.SIGTERM}.get(mode, 0)
    assert rc == expected, (rc, log)


@pytest.mark.parametrize("example", ["examples/catzilla_app.py", "examples/fastapi_app.py"])
def test_examples_serve_the_seed_routes(example, start_server):
    srv = start_server(example, "--port", "{port}")
    for i in range(3):
        body = srv.json("POST", f"/users/7/notify?message=hi{i}")
        assert body["status"] == "queued" and body["task_id"]
    r = srv.json("POST", "/data", {"values": [3, 1, 4, 1, 5]})
    assert r["status"] == "queued" and r["task_id"]
    srv.wait_stats(lambda s: s["totals"]["succeeded"] == 4, "the 3 notifications and the data task")
    got = srv.json("GET", "/users/7/notifications")
    assert got["count"] == 3 and sorted(got["messages"]) == ["hi0", "hi1", "hi2"]
    status, ctype, page = srv.request("GET", "/tasks/dashboard/")
    assert status == 200 and b"<html" in page
    assert srv.terminate() in (0, -signal.SIGTERM), srv.output()


@pytest.mark.stress
@pytest.mark.parametrize("mode", MODES)
def test_concurrent_requests_each_run_their_task_exactly_once(mode, start_server, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    out = tmp_path / "out.txt"
    srv = start_server(APP, mode, "{port}", str(out))
    clients, per_client = 8, 40
    prios = ["critical", "high", "normal", "low"]
    expected = {f"{c}-{i}": prios[(c + i) % 4] for c in range(clients) for i in range(per_client)}

    def client(c: int) -> list[str]:
        return [srv.json("POST", f"/jobs/{prios[(c + i) % 4]}/{c}-{i}")["task_id"] for i in range(per_client)]

    with ThreadPoolExecutor(clients) as pool:
        ids = [tid for ids in pool.map(client, range(clients)) for tid in ids]
    assert len(set(ids)) == len(expected)  # every request got its own task id
    n = len(expected)
    s = srv.wait_stats(lambda s: s["totals"]["succeeded"] == n, f"{n} tasks to succeed")
    assert s["totals"]["submitted"] == n and s["totals"]["failed"] == 0
    ran = [line.split() for line in _lines(out)]
    assert len(ran) == n and {key: prio for prio, key in ran} == expected
    assert srv.terminate() in (0, -signal.SIGTERM, 128 + signal.SIGTERM), srv.output()
