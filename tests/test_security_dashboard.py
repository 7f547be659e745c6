"""The dashboard's exposure rules (issue 14, item 3): a loopback server answers only loopback
Host names (DNS rebinding); the CLI's re-serving proxy needs its own token; error texts in the
served stats carry no credentials."""

import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading

import pytest
from http_helpers import get

from catzilla_tasks import BackgroundTasks
from catzilla_tasks.dashboard import json_stats, serve

SECRET = "hunter2-xyz"


def _get_with_host(server, host, path="/stats.json", token=None):
    port = server.server_address[1]
    conn = http.client.HTTPConnection(server.server_address[0], port, timeout=10)
    try:
        headers = {"Host": host}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request("GET", path, headers=headers)   # an explicit Host replaces the automatic one
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


@pytest.fixture
def engine():
    eng = BackgroundTasks(workers=1, min_workers=1, enable_auto_scaling=False, name="sec-test")

    def fails():
        raise ConnectionError(f"cannot reach redis://:{SECRET}@db.internal:6379/0 (dsn password={SECRET})")

    r = eng.add_task(fails)
    with pytest.raises(ConnectionError):
        r.wait(30)
    yield eng
    eng.shutdown(wait_for_completion=False, timeout=10)


@pytest.mark.parametrize("token", [None, "tok-1"])
def test_loopback_server_refuses_foreign_host(engine, token):
    srv, _ = serve(engine, token=token)
    try:
        port = srv.server_address[1]
        for host in ("attacker.example", f"attacker.example:{port}", f"127.0.0.1.attacker.example:{port}", "",
                     "[::1.evil]"):
            status, body = _get_with_host(srv, host, token=token)
            assert status == 403, host
            assert b"sec-test" not in body and b"recent_failures" not in body
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", f"app.localhost:{port}",
                     "LOCALHOST."):
            status, body = _get_with_host(srv, host, token=token)
            assert status == 200, host
            assert json.loads(body)["engine"]["name"] == "sec-test"
        assert _get_with_host(srv, "attacker.example", path="/")[0] == 403
    finally:
        srv.stop()


def test_server_beyond_loopback_takes_any_host_with_its_token(engine):
    srv, _ = serve(engine, host="0.0.0.0", token="tok-2")
    try:
        assert _get_with_host(srv, "dashboard.example.com", token="tok-2")[0] == 200
        assert _get_with_host(srv, "dashboard.example.com")[0] == 401
    finally:
        srv.stop()


def test_error_texts_in_served_stats_are_redacted(engine, caplog):
    assert SECRET not in json.dumps(engine.monitor.get_stats())
    body = json_stats(engine).decode()
    assert SECRET not in body and "redis://:***@db.internal:6379/0" in body and "password=***" in body
    # stats from elsewhere (the CLI's proxy re-serves a remote engine's): masked when served
    raw = {"recent_failures": [{"error": f"OSError: postgres://app:{SECRET}@pg/db", "name": "t"}], "totals": {}}
    assert SECRET not in json_stats(lambda: raw).decode()

    def broken():
        raise RuntimeError(f"lost https://u:{SECRET}@stats.example/x?token={SECRET}")

    srv, _ = serve(broken)
    try:
        for path in ("stats.json", "metrics"):
            status, _, body = get(srv.url + path)
            assert SECRET.encode() not in body
        status, _, body = get(srv.url + "stats.json")
        assert status == 503 and b"https://u:***@stats.example/x?token=***" in body
    finally:
        srv.stop()
    assert caplog.records and SECRET not in caplog.text   # nor in the log lines


def _start(args, env_extra=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    proc = subprocess.Popen([sys.executable, "-m", "catzilla_tasks.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] and None, daemon=True).start()
    try:
        return proc, lines.get(timeout=60)
    except queue.Empty:
        proc.kill()
        pytest.fail(f"{args}: no output; stderr: {proc.stderr.read()}")


def _stop(proc):
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the command did not stop on a signal")


@pytest.mark.timeout(180)
def test_cli_proxy_of_token_protected_stats_needs_its_own_token(engine):
    remote, _ = serve(engine, token="remote-tok")
    try:
        # no --serve-token: a random one, shown in the printed URL
        proc, first = _start(["dashboard", remote.url, "--port", "0", "--token", "remote-tok"])
        try:
            m = re.search(r"at (http://127\.0\.0\.1:(\d+)/)\?token=(\S+)", first)
            assert m, first
            local, port, tok = m.groups()
            assert tok != "remote-tok" and len(tok) >= 20
            assert get(local + "stats.json")[0] == 401
            assert get(local + "stats.json?token=remote-tok")[0] == 401
            status, _, body = get(local + "stats.json", {"Authorization": f"Bearer {tok}"})
            assert status == 200 and SECRET not in body.decode()
            with socket_probe() as probe:   # bound to the loopback interface only
                assert probe(port) is None or probe(port).startswith("127.")
        finally:
            assert _stop(proc) == 0
        # a chosen token: --serve-token or the environment
        proc, first = _start(["dashboard", remote.url, "--port", "0", "--token", "remote-tok"],
                             {"CATZILLA_TASKS_SERVE_TOKEN": "mine-123"})
        try:
            local = re.search(r"at (http://127\.0\.0\.1:\d+/)\?token=mine-123", first).group(1)
            assert get(local + "stats.json")[0] == 401
            assert get(local + "stats.json?token=mine-123")[0] == 200
        finally:
            assert _stop(proc) == 0
    finally:
        remote.stop()


class socket_probe:
    """probe(port): the local address a listening TCP socket on that port is bound to (from /proc)."""

    def __enter__(self):
        def probe(port):
            want = f"{int(port):04X}"
            for line in open("/proc/net/tcp").read().splitlines()[1:]:
                fields = line.split()
                addr, p = fields[1].split(":")
                if p == want and fields[3] == "0A":   # LISTEN
                    ip = ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
                    return ip
            return None
        return probe

    def __exit__(self, *exc):
        return False
