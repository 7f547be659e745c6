"""A live, read-only dashboard of an engine's figures: one self-contained HTML page.

``html()`` is the page (inline CSS and JS, nothing fetched from elsewhere). It polls
``stats.json`` *relative to its own URL* every second, so a framework can serve it at any
prefix that ends with ``/``: ``GET <prefix>/`` → ``html()``, ``GET <prefix>/stats.json`` →
``json_stats(tasks)``. A page opened with ``?token=...`` sends that token as
``Authorization: Bearer ...`` with each poll.

``serve(tasks)`` is a small standalone server on the stdlib's ``http.server``::

    from catzilla_tasks.dashboard import serve
    server, thread = serve(tasks, port=8765)      # http://127.0.0.1:8765/
    ...
    server.stop()

The cluster of a Redis broker (workers, queues, task names, failures, dead letters with a
re-drive, a task by id) has a page of its own: ``cluster_app(broker_url, token=...)`` (ASGI)
and ``serve_cluster(broker_url, token=...)``, in :mod:`.cluster`.

Routes: ``/`` (the page), ``/stats.json`` (``tasks.monitor.get_stats()`` as JSON), ``/metrics``
(Prometheus text when prometheus-client is installed, else 404). With ``token=...`` every route
needs ``?token=...`` or ``Authorization: Bearer ...`` (401 otherwise); serving beyond the
loopback interface needs a token. A server on the loopback interface answers only requests
whose ``Host`` is a loopback name or address (403 otherwise): a web page the user visits cannot
read it through a DNS name rebound to 127.0.0.1 (an absolute-form target's host counts, as
HTTP says). "Loopback" is the address bound, not the name given. Credentials in URLs inside
the served stats (error texts that quote a connection string) are masked (see
``catzilla_tasks._redact``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import ipaddress
import json
import logging
import math
import re
import socket
import threading
from collections.abc import Callable, Mapping
from enum import Enum
from functools import lru_cache
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .._redact import redact_text

__all__ = ["DashboardServer", "html", "json_safe", "json_stats", "serve", "stats_function"]

log = logging.getLogger("catzilla_tasks.dashboard")

StatsSource = Callable[[], Mapping[str, Any]]

PROMETHEUS_MISSING = "Prometheus metrics need the prometheus-client package: pip install 'catzilla-tasks[prometheus]'\n"


def stats_function(source: Any) -> StatsSource:
    """A zero-argument function returning the stats dict, from an engine, a monitor or a callable.

    Accepts a ``BackgroundTasks`` (anything with ``.monitor.get_stats()``), a ``TaskMonitor``
    (anything with ``.get_stats()``) or a function returning the stats dict.
    """
    monitor = getattr(source, "monitor", None)
    if monitor is not None and callable(getattr(monitor, "get_stats", None)):
        return monitor.get_stats
    if callable(getattr(source, "get_stats", None)):
        return source.get_stats
    if callable(source):
        return source
    raise TypeError(
        f"expected a BackgroundTasks, a TaskMonitor or a function returning the stats, got {type(source).__name__}"
    )


@lru_cache(maxsize=1)
def html() -> str:
    """The dashboard page: one self-contained HTML document."""
    return resources.files(__name__).joinpath("index.html").read_text(encoding="utf-8")


def json_safe(value: Any) -> Any:
    """``value`` with tuples as lists and NaN/infinities as None: what strict JSON can carry."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f if math.isfinite(f) else None


def json_stats(source: Any) -> bytes:
    """The stats of ``source`` (engine, monitor or function) as UTF-8 JSON, read now, with
    credentials in the error texts masked."""
    stats = json_safe(stats_function(source)())
    failures = stats.get("recent_failures") if isinstance(stats, dict) else None
    if isinstance(failures, list):
        stats["recent_failures"] = [
            {k: redact_text(v) if isinstance(v, str) else v for k, v in f.items()} if isinstance(f, dict) else f
            for f in failures
        ]
    return json.dumps(stats, allow_nan=False, separators=(",", ":")).encode()


def error_text(exc: BaseException) -> str:
    """``Type: message`` of an exception, with credentials masked (for 503 answers and logs)."""
    return redact_text(f"{type(exc).__name__}: {exc}")


def _is_loopback(host: str) -> bool:
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _metrics(fn: StatsSource) -> tuple[int, str, bytes]:
    try:
        from .. import prometheus
    except ImportError:
        return 404, "text/plain; charset=utf-8", PROMETHEUS_MISSING.encode()
    return 200, prometheus.CONTENT_TYPE_LATEST, prometheus.metrics_text(fn)


def script_hashes(page: str) -> str:
    """The CSP sources that allow exactly the page's own inline scripts: ``'sha256-...'`` each."""
    return " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode("ascii") + "'"
        for body in re.findall(r"<script>(.*?)</script>", page, flags=re.S)
    )


def page_csp(page: str) -> str:
    """A dashboard page's Content-Security-Policy: it runs only its own inline scripts (by their
    hashes: a script injected into the page does not run), fetches nothing from elsewhere and
    talks to its own origin only."""
    return (
        f"default-src 'none'; script-src {script_hashes(page)}; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


PAGE_CSP = page_csp(html())  # the engine page's


class DashboardHandler(http.server.BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = "catzilla-tasks-dashboard"
    sys_version = ""
    # HTTP/1.0: one request per connection, so stop() leaves no kept-alive connection being served
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        # The request line may carry ?token=...: log the path only, and only at debug level.
        log.debug("%s %s %s", self.address_string(), self.command, urlsplit(self.path).path)

    def _send(self, status: int, ctype: str, body: bytes, extra: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _authorized(self, query: dict[str, list[str]]) -> bool:
        token = self.server.token
        if token is None:
            return True
        offered: list[str] = list(query.get("token", []))
        auth = self.headers.get("Authorization", "")
        scheme, _, credentials = auth.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            offered.append(credentials.strip())
        want = token.encode()
        # compare every offer in constant time (no early exit on the first match)
        ok = False
        for o in offered:
            ok |= hmac.compare_digest(o.encode(), want)
        return ok

    def _host_allowed(self) -> bool:
        """On a loopback server, only a loopback Host (DNS rebinding: a page of attacker.example,
        its name rebound to 127.0.0.1, sends ``Host: attacker.example``)."""
        if not self.server.loopback:
            return True
        target = urlsplit(self.path)
        # an absolute-form target (GET http://name/...) names the host itself; Host is then
        # ignored (RFC 9112, 3.2.2), so that is the name to check
        host = target.netloc.rpartition("@")[2] if target.scheme else self.headers.get("Host")
        if host is None:  # HTTP/1.0 without a Host header: no browser sends that
            return True
        host = host.strip()
        if host.startswith("["):
            name = host[1 : host.find("]")] if "]" in host else ""
        else:
            name = host.rpartition(":")[0] if ":" in host else host
        return bool(name) and _is_loopback(name)

    def do_GET(self) -> None:
        if not self._host_allowed():
            self._send(
                403,
                "text/plain; charset=utf-8",
                b"403 Forbidden: this dashboard answers only to a loopback Host (localhost, 127.0.0.1, [::1])\n",
            )
            return
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        if not self._authorized(query):
            self._send(
                401,
                "text/plain; charset=utf-8",
                b"401 Unauthorized: this dashboard needs ?token=... or Authorization: Bearer ...\n",
                {"WWW-Authenticate": 'Bearer realm="catzilla-tasks"'},
            )
            return
        path = parts.path
        if path in ("/", "/index.html"):
            self._send(200, "text/html; charset=utf-8", html().encode(), {"Content-Security-Policy": PAGE_CSP})
        elif path == "/stats.json":
            try:
                body = json_stats(self.server.stats_fn)
            except Exception as exc:
                log.warning("dashboard: could not read the stats: %s", error_text(exc))
                msg = json.dumps({"error": f"could not read the stats: {error_text(exc)}"}).encode()
                self._send(503, "application/json", msg)
                return
            self._send(200, "application/json", body)
        elif path == "/metrics":
            try:
                status, ctype, body = _metrics(self.server.stats_fn)
            except Exception as exc:
                log.warning("dashboard: could not build the metrics: %s", error_text(exc))
                self._send(503, "text/plain; charset=utf-8", f"could not read the stats: {error_text(exc)}\n".encode())
                return
            self._send(status, ctype, body)
        else:
            self._send(404, "text/plain; charset=utf-8", b"404 Not Found: try /, /stats.json or /metrics\n")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _read_only(self) -> None:
        self._send(
            405,
            "text/plain; charset=utf-8",
            b"405 Method Not Allowed: the dashboard is read-only\n",
            {"Allow": "GET, HEAD"},
        )

    do_POST = do_PUT = do_DELETE = do_PATCH = _read_only


class DashboardServer(http.server.ThreadingHTTPServer):
    """The standalone dashboard server: ``url`` to open, ``stop()`` to end it."""

    daemon_threads = True
    allow_reuse_address = True

    handler_class: type[http.server.BaseHTTPRequestHandler] = DashboardHandler

    def __init__(self, address: tuple[str, int], stats_fn: StatsSource, token: str | None) -> None:
        self.stats_fn = stats_fn
        self.token = token
        self.thread: threading.Thread | None = None
        super().__init__(address, self.handler_class)
        host = self.server_address[0]
        self.loopback = _is_loopback(host.decode() if isinstance(host, (bytes, bytearray)) else host)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if isinstance(host, bytes):
            host = host.decode()
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop serving, close the socket and join the serving thread."""
        self.shutdown()
        self.server_close()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)


class DashboardServer6(DashboardServer):
    address_family = socket.AF_INET6


def __getattr__(name: str) -> Any:
    """``cluster_app`` and ``serve_cluster`` (the cluster dashboard, ``.cluster``), imported on
    first use: the engine's dashboard needs no Redis client."""
    if name in ("cluster_app", "serve_cluster"):
        from . import cluster

        return getattr(cluster, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def serve(
    tasks_or_stats_fn: Any,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
) -> tuple[DashboardServer, threading.Thread]:
    """Serve the dashboard of an engine in a background thread; returns ``(server, thread)``.

    ``tasks_or_stats_fn``: a BackgroundTasks, a TaskMonitor, or a function returning the stats
    dict. ``port=0`` picks a free port (``server.url`` tells which). A host other than the
    loopback interface needs a ``token``. Stop with ``server.stop()``.
    """
    fn = stats_function(tasks_or_stats_fn)
    if token is not None and not isinstance(token, str):
        raise TypeError("token: must be a string")
    if token == "":
        raise ValueError("token: must not be empty")
    if token is None and not _is_loopback(host):
        raise ValueError(
            f"serving the dashboard beyond localhost needs a token (host={host!r}): "
            "pass token=... (clients then send ?token=... or Authorization: Bearer ...)"
        )
    cls = DashboardServer6 if ":" in host else DashboardServer
    server = cls((host.strip("[]"), port), fn, token)
    if token is None and not server.loopback:  # the name said loopback, the resolver did not
        bound = server.server_address[0]
        server.server_close()
        raise ValueError(
            f"serving the dashboard beyond localhost needs a token: host={host!r} is bound to {bound!r}, "
            "not a loopback address; pass token=..."
        )
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.25},
        name=f"catzilla-tasks-dashboard:{server.server_address[1]}",
        daemon=True,
    )
    server.thread = thread
    thread.start()
    return server, thread
