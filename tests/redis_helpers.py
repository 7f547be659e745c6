"""A real redis-server for the distributed-mode tests, started on a free 127.0.0.1 port in a
temporary directory (never the machine's 6379). ``REDIS_URL`` in the environment points the
tests at a server of your own instead (each test then uses its own key prefix; nothing is
flushed). Tests that restart Redis always start their own server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import pytest

redis = pytest.importorskip("redis", reason="the [redis] extra is part of the test extra")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)  # the ASan run preloads libasan: not for redis-server
    return env


class RedisServer:
    def __init__(self, appendonly: bool = False, tls: bool = False) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server; .ci/run does it)")
        self.exe = exe
        self.dir = tempfile.mkdtemp(prefix="catzilla-redis-")
        self.port = free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.cert: str | None = None
        if tls:  # a self-signed certificate for 127.0.0.1 (openssl is installed by .ci/run)
            self.cert = os.path.join(self.dir, "cert.pem")
            self.key = os.path.join(self.dir, "key.pem")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                            "-keyout", self.key, "-out", self.cert], check=True, env=clean_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.url = f"rediss://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        args = [self.exe, "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
                "--daemonize", "no", "--logfile", os.path.join(self.dir, "redis.log")]
        if self.cert:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.cert,
                     "--tls-key-file", self.key, "--tls-ca-cert-file", self.cert, "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port, **self.client_options())
        deadline = time.monotonic() + 20
        while True:  # wait until it answers (and has loaded its data)
            try:
                if client.ping():
                    break
            except (redis.ConnectionError, redis.BusyLoadingError) as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = open(os.path.join(self.dir, "redis.log")).read()
                    raise RuntimeError(f"redis-server did not start: {log}") from exc
                time.sleep(0.02)
        client.close()

    def client_options(self) -> dict:
        return {"ssl": True, "ssl_ca_certs": self.cert} if self.cert else {}

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url():
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    server = RedisServer()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def prefix(redis_url):
    """A key prefix of this test's own; its keys are deleted afterwards."""
    p = f"ctt{uuid.uuid4().hex[:10]}"
    yield p
    r = redis.Redis.from_url(redis_url)
    keys = list(r.scan_iter(f"{p}:*", count=1000))
    for i in range(0, len(keys), 1000):
        r.delete(*keys[i:i + 1000])
    r.close()


def wait_until(cond, timeout: float = 30.0, what: str = "condition") -> None:
    """Re-check ``cond`` until true (for state in another process, where no event reaches us)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
