"""Real servers in subprocesses on a free 127.0.0.1 port, and a tiny stdlib HTTP client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 60.0   # a cold start under ASan on a busy 2-core machine takes seconds
HTTP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    parts = [str(REPO / "src")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Server:
    """``python ARGS...`` serving on ``self.port``; output goes to a log file for failure messages."""

    def __init__(self, args: list[str], port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self._logf = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, *args], stdout=self._logf, stderr=subprocess.STDOUT,
                                     env=child_env(), cwd=REPO)
        self._wait_ready()

    def output(self) -> str:
        if not self._logf.closed:
            self._logf.flush()
        return self.log.read_text(errors="replace")

    def _wait_ready(self) -> None:
        # bounded connect loop: the port accepting a connection is the readiness event
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode} before listening:\n{self.output()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(
                        f"server not listening after {READY_TIMEOUT_S} s:\n{self.output()}"
                    ) from None
                time.sleep(0.02)

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, str, bytes]:
        data = json.dumps(body).encode() if body is not None else b"" if method == "POST" else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method, data=data,
                                     headers={"Content-Type": "application/json"} if body is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
                return r.status, r.headers.get("Content-Type", ""), r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type", ""), e.read()

    def json(self, method: str, path: str, body: Any = None) -> Any:
        status, ctype, body = self.request(method, path, body)
        assert status == 200, f"{method} {path} -> {status}: {body[:500]!r}\n{self.output()}"
        assert ctype.startswith("application/json"), ctype
        return json.loads(body)

    def stats(self) -> dict[str, Any]:
        return self.json("GET", "/tasks/stats")

    def wait_stats(self, pred: Any, what: str, timeout: float = 60.0) -> dict[str, Any]:
        """Poll /tasks/stats until pred(stats) (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if pred(s):
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; last stats: {s}")
            time.sleep(0.02)

    def terminate(self, timeout: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._logf.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        if not self._logf.closed:
            self._logf.close()


@pytest.fixture
def start_server(tmp_path: Path):
    started: list[Server] = []

    def start(*args: str) -> Server:
        """``start(script, ..., "{port}", ...)``: "{port}" becomes the free port picked."""
        port = free_port()
        srv = Server([a.replace("{port}", str(port)) for a in args], port, tmp_path / f"server{len(started)}.log")
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()
