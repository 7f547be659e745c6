"""The catzilla-tasks command: stats, metrics, dashboard (proxy) and demo-server."""

import http.server
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from http_helpers import get

from catzilla_tasks import BackgroundTasks, TaskPriority, cli
from catzilla_tasks.dashboard import json_safe, serve

PY = sys.executable




@pytest.fixture
def engine():
    """A paused engine with known figures: 10 done, 2 failed, queued 1/2/3/4 by priority."""
    eng = BackgroundTasks(workers=2, enable_auto_scaling=False, queue_size=1000, name="cli-test")

    def fails(msg):
        raise ValueError(msg)

    results = [eng.add_task(int, "1") for _ in range(10)] + [eng.add_task(fails, m) for m in ("boom one", "boom two")]
    eng.join(30)
    assert [r.status.name for r in results].count("FAILED") == 2
    eng.pause()
    for prio, n in zip(TaskPriority, (1, 2, 3, 4), strict=True):
        for _ in range(n):
            eng.options(priority=prio).add_task(int)
    yield eng
    eng.resume()
    eng.shutdown(wait_for_completion=False, timeout=10)


@pytest.fixture
def server(engine):
    srv, _ = serve(engine)
    yield srv
    srv.stop()


def run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def row(out, label):
    """The value of a `label   value` cell of the stats table: the left column first, then the right."""
    value = r"(\S+(?: (?:%|MB|\u00b5s|ms|s))?)(?=\s{2,}|\s*$)"
    for where in (r"^\s{2}", r"\S\s{2,}"):
        m = re.search(rf"{where}{re.escape(label)}\s+{value}", out, re.M)
        if m:
            return m.group(1)
    raise AssertionError(f"no {label!r} cell in:\n{out}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stats_prints_the_engines_figures(server, capsys):
    rc, out, err = run(["stats", server.url], capsys)
    assert rc == 0, err
    assert out.startswith("catzilla-tasks \u00b7 cli-test \u00b7 paused \u00b7 accepting \u00b7 up ")
    assert f"from {server.url}stats.json" in out
    for label, value in (("critical", "1"), ("high", "2"), ("normal", "3"), ("low", "4"), ("total", "10"),
                         ("submitted", "22"), ("succeeded", "10"), ("failed tasks", "2"), ("retries", "0"),
                         ("timeouts", "0"), ("cancelled", "0"), ("rejected", "0"), ("pressure", "1.0 %"),
                         ("error rate", "16.7 %")):
        assert row(out, label) == value, label
    assert row(out, "total") == "10"  # queues (the first "total" row)
    assert re.search(r"^\s+execution\s+\S+ [\u00b5m]?s\s+\S+ [\u00b5m]?s\s+\S+ [\u00b5m]?s$", out, re.M)
    assert re.search(r"^\s+queue wait\s+\S+ [\u00b5m]?s", out, re.M)
    # recent failures, newest first
    lines = out.splitlines()
    i = lines.index("Recent failures (newest first)")
    assert "ValueError: boom two" in lines[i + 1] and "fails" in lines[i + 1]
    assert "ValueError: boom one" in lines[i + 2]


def test_stats_figures_equal_the_json(server, engine, capsys):
    rc, out, _ = run(["stats", server.url], capsys)
    st = engine.monitor.get_stats()
    assert rc == 0
    assert row(out, "submitted") == f"{st['totals']['submitted']:,}"
    assert row(out, "idle") == str(st["worker_metrics"]["idle_workers"])
    assert row(out, "memory") == f"{st['performance_metrics']['memory_usage_mb']:.2f} MB"


@pytest.mark.parametrize("suffix", ["", "stats.json", "index.html", "<noslash>"])
def test_stats_accepts_the_dashboard_url_in_any_form(server, capsys, suffix):
    url = server.url.rstrip("/") if suffix == "<noslash>" else server.url + suffix
    rc, out, err = run(["stats", url], capsys)
    assert rc == 0, err
    assert row(out, "submitted") == "22"


def test_stats_from_a_framework_route(engine, capsys):
    """Any route that returns the JSON of get_stats() works, whatever its path."""

    class Route(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/api/v1/tasks/stats":
                self.send_error(404)
                return
            body = json.dumps(json_safe(engine.monitor.get_stats())).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Route)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        rc, out, err = run(["stats", f"http://127.0.0.1:{httpd.server_address[1]}/api/v1/tasks/stats"], capsys)
        assert rc == 0, err
        assert row(out, "succeeded") == "10"
        rc, out, err = run(["stats", f"http://127.0.0.1:{httpd.server_address[1]}/elsewhere"], capsys)
        assert rc == 1 and "HTTP 404" in err
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_stats_with_a_token(engine, capsys, monkeypatch):
    srv, _ = serve(engine, token="tok-42")
    try:
        monkeypatch.delenv(cli.TOKEN_ENV, raising=False)
        rc, out, err = run(["stats", srv.url], capsys)
        assert rc == 1 and "401" in err and "--token" in err and cli.TOKEN_ENV in err
        rc, out, err = run(["stats", srv.url, "--token", "wrong"], capsys)
        assert rc == 1 and "refused" in err and "wrong" not in err
        rc, out, err = run(["stats", srv.url, "--token", "tok-42"], capsys)
        assert rc == 0 and row(out, "submitted") == "22"
        monkeypatch.setenv(cli.TOKEN_ENV, "tok-42")
        rc, out, err = run(["stats", srv.url], capsys)
        assert rc == 0, err
        monkeypatch.delenv(cli.TOKEN_ENV)
        query = "?token=tok-42"
        for url in (srv.url + query, srv.url + "index.html" + query, srv.url.rstrip("/") + query):
            rc, out, err = run(["stats", url], capsys)
            assert rc == 0, (url, err)
            assert "token=***" in out and "tok-42" not in out
    finally:
        srv.stop()


def test_stats_watch_refreshes(server, capsys):
    rc, out, err = run(["stats", server.url, "--watch", "0.01", "--count", "3"], capsys)
    assert rc == 0, err
    assert out.count("catzilla-tasks \u00b7 cli-test") == 3
    assert "\x1b[" not in out  # not a terminal: no screen clearing


def test_stats_errors_are_clear(capsys):
    port = free_port()
    rc, out, err = run(["stats", f"http://127.0.0.1:{port}/"], capsys)
    assert rc == 1 and "cannot reach" in err and str(port) in err and out == ""
    srv, _ = serve(lambda: {"hello": "world"})  # JSON, but not an engine's stats
    try:
        rc, out, err = run(["stats", srv.url], capsys)
        assert rc == 1 and "did not answer with an engine's stats" in err
    finally:
        srv.stop()


def test_usage_errors(capsys):
    for argv in (["stats"], ["stats", "http://x/", "--watch", "0"], ["stats", "http://x/", "--count", "2"],
                 ["dashboard", "http://x/", "--port", "70000"], ["nope"], []):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2, argv
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("stats", "dashboard", "metrics", "demo-server"):
        assert cmd in out


def test_metrics_prints_prometheus_text(server, engine, capsys):
    from prometheus_client.parser import text_string_to_metric_families

    rc, out, err = run(["metrics", server.url], capsys)
    assert rc == 0, err
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for fam in text_string_to_metric_families(out) for s in fam.samples}
    assert values[("catzilla_tasks_tasks_submitted_total", (("engine", "cli-test"),))] == 22
    assert values[("catzilla_tasks_tasks_failed_total", (("engine", "cli-test"),))] == 2
    assert values[("catzilla_tasks_queue_size", (("engine", "cli-test"), ("priority", "low")))] == 4


def test_format_stats_handles_missing_figures_and_long_errors():
    st = {"engine": {"name": "x", "paused": False, "accepting": False, "uptime_s": 3725.0},
          "queue_metrics": {}, "totals": {"submitted": 1234567},
          "performance_metrics": {"avg_execution_time_ms": None, "p95_execution_time_ms": 0.0123,
                                  "p99_execution_time_ms": 2500.0},
          "recent_failures": [{"task_id": "t-1", "name": "job", "error": "E: " + "x" * 500 + "\nsecond line",
                               "finished_at": time.time()}]}
    text = cli.format_stats(st, columns=100)
    assert "running \u00b7 not accepting \u00b7 up 1 h 02 min" in text
    assert row(text, "submitted") == "1,234,567"
    assert re.search(r"^\s+execution\s+\u2013\s+12\.3 \u00b5s\s+2\.50 s$", text, re.M)
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "second line" not in text and text.rstrip().endswith("\u2026")


def _start(args):
    """Start `python -m catzilla_tasks.cli ARGS`; return (process, first stdout line)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([PY, "-m", "catzilla_tasks.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] and None, daemon=True).start()
    try:
        first = lines.get(timeout=60)
    except queue.Empty:
        proc.kill()
        pytest.fail(f"{args}: no output; stderr: {proc.stderr.read()}")
    return proc, first, lines


def _stop(proc, sig=signal.SIGINT):
    proc.send_signal(sig)
    try:
        rc = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the command did not stop on a signal")
    return rc


def test_dashboard_command_proxies_a_running_engine(engine):
    srv_token, _ = serve(engine, token="remote-tok")
    try:
        proc, first, _ = _start(["dashboard", srv_token.url, "--port", "0", "--token", "remote-tok"])
        try:
            m = re.search(r"at (http://127\.0\.0\.1:\d+/)\?token=(\S+)", first)
            assert m, first
            assert "remote-tok" not in first
            local, local_token = m.groups()
            auth = {"Authorization": f"Bearer {local_token}"}
            assert get(local)[0] == 401          # the re-served stats need the local token
            status, ctype, body = get(local, auth)
            assert status == 200 and b"data-metric" in body
            status, ctype, body = get(local + "stats.json", auth)
            assert status == 200
            shown, truth = json.loads(body), engine.monitor.get_stats()
            assert shown["totals"] == truth["totals"]
            assert shown["queue_metrics"]["total_queued"] == 10
            assert shown["recent_failures"] == json.loads(json.dumps(truth["recent_failures"]))
            status, _, body = get(local + "metrics", auth)
            assert status == 200 and b'catzilla_tasks_tasks_submitted_total{engine="cli-test"} 22.0' in body
        finally:
            assert _stop(proc) == 0
    finally:
        srv_token.stop()


def test_dashboard_command_reports_an_unreachable_engine():
    port = free_port()
    proc, first, _ = _start(["dashboard", f"http://127.0.0.1:{port}/", "--port", "0"])
    try:
        local = re.search(r"at (http://127\.0\.0\.1:\d+/)", first).group(1)
        status, ctype, body = get(local + "stats.json")
        assert status == 503 and "cannot reach" in json.loads(body)["error"]
    finally:
        assert _stop(proc, signal.SIGTERM) == 0
    assert "warning" in proc.stderr.read()


def test_demo_server_runs_sample_load_and_stops_cleanly():
    proc, first, lines = _start(["demo-server", "--port", "0"])
    try:
        m = re.search(r"dashboard at (http://127\.0\.0\.1:\d+/)", first)
        assert m, first
        url = m.group(1)
        assert get(url)[0] == 200
        deadline = time.monotonic() + 60
        while True:  # wait for the load to show in the stats (condition, bounded in time)
            st = json.loads(get(url + "stats.json")[2])
            t = st["totals"]
            if t["succeeded"] >= 20:
                break
            assert time.monotonic() < deadline, t
            time.sleep(0.1)
        assert t["submitted"] >= t["succeeded"] + t["failed"]
        assert st["engine"]["name"] == "demo" and st["engine"]["accepting"] is True
        assert get(url + "metrics")[0] == 200
    finally:
        assert _stop(proc) == 0
    tail = []
    while not any("stopped" in line for line in tail):
        tail.append(lines.get(timeout=30))
    err = proc.stderr.read()
    assert "Traceback" not in err, err


def test_console_script_entry_point_and_module_run():
    out = subprocess.run([PY, "-m", "catzilla_tasks.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("catzilla-tasks ")
    assert callable(cli.main)
