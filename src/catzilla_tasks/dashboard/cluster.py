"""The cluster dashboard: the workers, queues, task names, failures and dead letters of a Redis
broker, read through :class:`~catzilla_tasks.brokers.cluster.ClusterView`, with two actions:
re-drive dead letters and cancel a task.

One page (``cluster.html``: inline CSS and JS, nothing fetched from elsewhere) and its JSON
routes, all relative to where it is mounted:

* ``GET  ./``                        the page
* ``GET  ./api/cluster.json``        workers, queues, task names, totals, recent failures
* ``GET  ./api/dead-letters.json?queue=Q[&count=N]``   the newest dead letters of a queue
* ``GET  ./api/task.json?id=ID``     one task: status, progress, result or error
* ``POST ./api/redrive``             ``{"queue": Q, "ids": [...]}`` (``ids`` omitted: all of them)
* ``POST ./api/cancel``              ``{"task_id": ID}`` (optionally ``"queue": Q``)

Every route needs the dashboard's token (``?token=...`` or ``Authorization: Bearer ...``; a
POST takes it from the header only). A POST must also carry the page's CSRF token
(``X-CSRF-Token``: a random nonce and its HMAC under a key derived from the dashboard token,
written into each page it serves), a JSON body (``Content-Type: application/json``: a cross-site
form cannot send one), and, when the browser says where it comes from, come from the page's
own origin (``Origin`` equal to the request's own scheme and host, default ports filled in;
``Sec-Fetch-Site: same-origin``). The scheme is the ASGI scope's (behind a TLS-terminating
proxy, the ASGI server's proxy settings decide it; no ``X-Forwarded-*`` header is read here),
``http`` for the standalone server. GETs only read.

Two ways to run it:

* :func:`serve_cluster` (and ``catzilla-tasks dashboard --broker URL``): a standalone server in
  a background thread, as :func:`catzilla_tasks.dashboard.serve` (a loopback server answers only
  loopback ``Host`` names);
* :func:`cluster_app`: an ASGI application to mount in a web app
  (``app.mount("/cluster", cluster_app(url, token=...))`` in Starlette or FastAPI).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import threading
from collections.abc import Awaitable, Callable, Mapping
from functools import lru_cache
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .._redact import redact_text
from . import DashboardHandler, DashboardServer, DashboardServer6, error_text, json_safe, page_csp

__all__ = ["ClusterApp", "ClusterDashboard", "cluster_app", "cluster_html", "serve_cluster"]

log = logging.getLogger("catzilla_tasks.dashboard")

Reply = tuple[int, str, bytes, dict[str, str]]

CSRF_HEADER = "X-CSRF-Token"
MAX_BODY = 64 * 1024  # bytes a POST may carry (a re-drive of 1,000 ids is ~30 KB)
MAX_IDS = 1000  # dead letters one re-drive names
RECENT_FAILURES = 50  # failures the overview lists, newest first, across the task names
_CSRF_PLACEHOLDER = "__CATZILLA_CSRF__"

_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@lru_cache(maxsize=1)
def cluster_html() -> str:
    """The cluster page, with the placeholder its CSRF token replaces."""
    return resources.files(__package__).joinpath("cluster.html").read_text(encoding="utf-8")


# the page runs only its own script (an injected inline script does not run, and this page can
# act on the cluster), fetches nothing from elsewhere and posts to itself only
PAGE_CSP = page_csp(cluster_html())


def _check_token(token: Any) -> str:
    if not isinstance(token, str):
        raise TypeError(f"token: the cluster dashboard needs a token (a string), got {type(token).__name__}")
    if not token or token.strip() != token or any(ord(c) < 33 or ord(c) > 126 for c in token):
        raise ValueError("token: must be a non-empty string of printable ASCII without spaces")
    return token


def _json(status: int, value: Any) -> Reply:
    body = json.dumps(json_safe(value), allow_nan=False, separators=(",", ":")).encode()
    return status, "application/json", body, dict(_HEADERS)


def _error(status: int, message: str, extra: Mapping[str, str] | None = None) -> Reply:
    status_, ctype, body, headers = _json(status, {"error": message})
    headers.update(extra or {})
    return status_, ctype, body, headers


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: str) -> tuple[str, str, int] | None:
    """An origin (RFC 6454) as (scheme, host, port), the default port filled in (a proxy may
    spell ``Host: host:443``, a browser's ``Origin`` never does); None for what is not one."""
    try:
        parts = urlsplit(url)
        scheme, host, port = parts.scheme.lower(), (parts.hostname or ""), parts.port
    except ValueError:  # a port that is not a number
        return None
    if scheme not in _DEFAULT_PORTS or not host or parts.username is not None or parts.password is not None:
        return None
    if parts.path or parts.query or parts.fragment:
        return None
    return scheme, host.lower(), _DEFAULT_PORTS[scheme] if port is None else port


class ClusterDashboard:
    """The cluster dashboard's routes, framework-free: :meth:`handle` answers one request.

    ``source``: a ``redis://`` URL (``prefix``, ``serializer``, ``allow_pickle`` and
    ``client_options`` say how to read it) or a ``RedisBroker``; ``token``: required, the
    credential of every route.
    """

    def __init__(
        self,
        source: Any,
        *,
        token: str,
        prefix: str = "catzilla",
        serializer: str = "msgpack",
        allow_pickle: bool = False,
        **client_options: Any,
    ) -> None:
        from ..brokers.cluster import ClusterView

        self.token = _check_token(token)
        self._csrf_key = hmac.new(token.encode(), b"catzilla-tasks dashboard csrf", hashlib.sha256).digest()
        self.view = ClusterView(
            source, prefix=prefix, serializer=serializer, allow_pickle=allow_pickle, **client_options
        )

    def close(self) -> None:
        self.view.close()

    # -- credentials -----------------------------------------------------------------------
    def new_csrf(self) -> str:
        """A fresh CSRF token: a random nonce and its HMAC (checked without server state)."""
        nonce = secrets.token_urlsafe(18)
        return f"{nonce}.{self._mac(nonce)}"

    def _mac(self, nonce: str) -> str:
        return hmac.new(self._csrf_key, nonce.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, value: str | None) -> bool:
        if not value:
            return False
        nonce, _, mac = value.strip().partition(".")
        if not nonce or not mac:
            return False
        return hmac.compare_digest(mac.encode(), self._mac(nonce).encode())

    def authorized(self, query: Mapping[str, list[str]], headers: Mapping[str, str], allow_query: bool) -> bool:
        offered: list[str] = list(query.get("token", [])) if allow_query else []
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            offered.append(credentials.strip())
        want = self.token.encode()
        ok = False
        for o in offered:  # each offer compared in constant time, no early exit
            ok |= hmac.compare_digest(o.encode(), want)
        return ok

    @staticmethod
    def same_origin(headers: Mapping[str, str], scheme: str) -> str | None:
        """None if the request may come from the page's origin, else why not."""
        site = headers.get("sec-fetch-site")
        if site is not None and site.strip().lower() != "same-origin":
            return f"Sec-Fetch-Site is {site.strip()!r}, not 'same-origin'"
        origin = headers.get("origin")
        if origin is not None:
            ours = _origin(f"{scheme}://{headers.get('host', '').strip()}")
            if ours is None or _origin(origin.strip()) != ours:
                return "the Origin is not this dashboard's"
        return None

    # -- the routes ------------------------------------------------------------------------
    def handle(
        self, method: str, path: str, query_string: str, headers: Mapping[str, str], body: bytes, scheme: str = "http"
    ) -> Reply:
        """Answer one request. ``path`` is below the mount point (``/``, ``/api/...``);
        ``headers`` have lower-case names."""
        query = parse_qs(query_string)
        is_post = method == "POST"
        if method not in ("GET", "HEAD", "POST"):
            return _error(405, "405 Method Not Allowed", {"Allow": "GET, HEAD, POST"})
        if not self.authorized(query, headers, allow_query=not is_post):
            hint = "Authorization: Bearer ..." if is_post else "?token=... or Authorization: Bearer ..."
            return _error(
                401,
                f"401 Unauthorized: the dashboard needs {hint}",
                {"WWW-Authenticate": 'Bearer realm="catzilla-tasks"'},
            )
        if is_post:
            return self._post(path, headers, body, scheme)
        if path in ("/", "/index.html"):
            page = cluster_html().replace(_CSRF_PLACEHOLDER, self.new_csrf()).encode()
            return 200, "text/html; charset=utf-8", page, dict(_HEADERS, **{"Content-Security-Policy": PAGE_CSP})
        routes: dict[str, Callable[[Mapping[str, list[str]]], Reply]] = {
            "/api/cluster.json": self._overview,
            "/api/dead-letters.json": self._dead_letters,
            "/api/task.json": self._task,
        }
        route = routes.get(path)
        if route is None:
            if path in ("/api/redrive", "/api/cancel"):
                return _error(405, "405 Method Not Allowed: use POST", {"Allow": "POST"})
            return _error(404, "404 Not Found: try ./, ./api/cluster.json, ./api/dead-letters.json, ./api/task.json")
        return self._read(route, query)

    def _read(self, route: Callable[[Mapping[str, list[str]]], Reply], query: Mapping[str, list[str]]) -> Reply:
        try:
            return route(query)
        except ValueError as exc:
            return _error(400, redact_text(str(exc)))
        except Exception as exc:  # Redis down, a timeout: the page says so and retries
            log.warning("cluster dashboard: could not read the cluster: %s", error_text(exc))
            return _error(503, f"could not read the cluster: {error_text(exc)}")

    def _overview(self, query: Mapping[str, list[str]]) -> Reply:
        v = self.view
        workers = v.workers()
        queues = v.queues()
        names = v.task_names(errors=20)
        from ..brokers.registry import bucket_upper_ns

        failures = []
        for t in names:
            for kind in ("run", "wait"):  # [[upper bound in seconds, count], ...] by bound
                hist = t.pop(f"{kind}_histogram")
                t[f"{kind}_buckets"] = [[bucket_upper_ns(int(i)) / 1e9, c] for i, c in sorted(hist.items())]
            for e in t.pop("errors"):
                failures.append({"task": t["name"], **e})
        failures.sort(key=lambda e: -float(e.get("at") or 0))
        for e in failures:
            for k in ("error", "traceback"):  # (the workers redact them; read from Redis: again)
                if isinstance(e.get(k), str):
                    e[k] = redact_text(e[k])
        return _json(
            200,
            {
                "prefix": v.prefix,
                "workers": workers,
                "queues": queues,
                "tasks": names,
                "totals": v.totals(),
                "failures": failures[:RECENT_FAILURES],
            },
        )

    @staticmethod
    def _one(query: Mapping[str, list[str]], name: str) -> str:
        values = query.get(name) or []
        if len(values) != 1 or not values[0]:
            raise ValueError(f"{name}: give exactly one, non-empty")
        return values[0]

    def _dead_letters(self, query: Mapping[str, list[str]]) -> Reply:
        queue = self._one(query, "queue")
        count = int(query.get("count", ["100"])[0])
        if not 1 <= count <= 1000:
            raise ValueError("count: between 1 and 1000")
        letters = self.view.dead_letters(queue, count=count)
        for x in letters:  # "Type: message" on the first line, the traceback after it
            x["error"], _, x["traceback"] = x["error"].partition("\n")
        return _json(200, {"queue": queue, "dead_letters": letters})

    def _task(self, query: Mapping[str, list[str]]) -> Reply:
        # (ClusterView.inspect: progress, when reported, is already {"fraction", "message"})
        return _json(200, self.view.inspect(self._one(query, "id")))

    def _post(self, path: str, headers: Mapping[str, str], body: bytes, scheme: str) -> Reply:
        actions = {"/api/redrive": self._redrive, "/api/cancel": self._cancel}
        action = actions.get(path)
        if action is None:
            return _error(404, "404 Not Found: the actions are ./api/redrive and ./api/cancel")
        why = self.same_origin(headers, scheme)
        if why is not None:
            return _error(403, f"403 Forbidden: cross-origin request ({why})")
        if not self.csrf_ok(headers.get(CSRF_HEADER.lower())):
            return _error(403, f"403 Forbidden: a missing or wrong {CSRF_HEADER} (reload the page)")
        ctype = headers.get("content-type", "").partition(";")[0].strip().lower()
        if ctype != "application/json":
            return _error(415, "415 Unsupported Media Type: send application/json")
        if len(body) > MAX_BODY:
            return _error(413, f"413 Payload Too Large: at most {MAX_BODY} bytes")
        try:
            args = json.loads(body or b"null")
        except ValueError:
            return _error(400, "the body is not JSON")
        if not isinstance(args, dict):
            return _error(400, "the body must be a JSON object")
        try:
            result = action(args)
        except ValueError as exc:
            return _error(400, redact_text(str(exc)))
        except Exception as exc:
            log.warning("cluster dashboard: %s failed: %s", path, error_text(exc))
            return _error(503, f"{path.rpartition('/')[2]} failed: {error_text(exc)}")
        log.info("cluster dashboard: %s %s", path.rpartition("/")[2], result)
        return _json(200, result)

    def _redrive(self, args: dict[str, Any]) -> dict[str, Any]:
        queue = args.get("queue")
        if not isinstance(queue, str) or not queue:
            raise ValueError("queue: a non-empty string")
        ids = args.get("ids")
        if ids is not None and (
            not isinstance(ids, list) or not ids or len(ids) > MAX_IDS or not all(isinstance(i, str) and i for i in ids)
        ):
            raise ValueError(f"ids: a list of 1 to {MAX_IDS} dead-letter ids (strings), or omitted for all")
        return {"queue": queue, "moved": self.view.redrive(queue, ids)}

    def _cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        task_id, queue = args.get("task_id"), args.get("queue")
        if not isinstance(task_id, str) or not task_id:
            raise ValueError("task_id: a non-empty string")
        if queue is not None and (not isinstance(queue, str) or not queue):
            raise ValueError("queue: a non-empty string, or omitted")
        return {"task_id": task_id, "cancelled": self.view.cancel(task_id, queue)}


# ----------------------------------------------------------------------------- ASGI


class ClusterApp:
    """An ASGI application of the cluster dashboard (HTTP only): mount it in a web app."""

    def __init__(self, dashboard: ClusterDashboard) -> None:
        self.dashboard = dashboard

    def close(self) -> None:
        self.dashboard.close()

    async def __call__(
        self,
        scope: Mapping[str, Any],
        receive: Callable[[], Awaitable[Mapping[str, Any]]],
        send: Callable[[Mapping[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":  # run alone (uvicorn module:app): nothing to start
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    self.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            raise RuntimeError(f"the cluster dashboard serves HTTP only, not {scope['type']!r}")
        root = scope.get("root_path", "")
        path = scope.get("path", "/")
        if root and path.startswith(root):  # Starlette's Mount keeps the full path (newer versions)
            path = path[len(root) :]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        body = b""
        too_big = False
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            if len(body) + len(chunk) > MAX_BODY:
                too_big = True
            else:
                body += chunk
            more = msg.get("more_body", False)
        qs = scope.get("query_string", b"").decode("latin-1")
        if path == "":  # the page's relative URLs need the slash (the query, its ?token=, is kept)
            reply: Reply = 307, "text/plain", b"", {"Location": root + "/" + (f"?{qs}" if qs else "")}
        elif too_big:
            reply = _error(413, f"413 Payload Too Large: at most {MAX_BODY} bytes")
        else:
            reply = await asyncio.to_thread(
                self.dashboard.handle, scope["method"], path, qs, headers, body, scope.get("scheme", "http")
            )
        status, ctype, payload, extra = reply
        head = [(b"content-type", ctype.encode()), (b"content-length", str(len(payload)).encode())]
        head += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else payload})


def cluster_app(source: Any, *, token: str, prefix: str = "catzilla", **options: Any) -> ClusterApp:
    """The cluster dashboard as an ASGI app: ``app.mount("/cluster", cluster_app(url, token=...))``.

    ``source``: a ``redis://`` URL or a ``RedisBroker``; ``token``: required (every route needs
    it, see the module docstring); ``prefix`` and the other options as :class:`ClusterView`'s.
    The page is then at ``/cluster/?token=...``. ``app.close()`` closes its Redis client.
    """
    return ClusterApp(ClusterDashboard(source, token=token, prefix=prefix, **options))


# ----------------------------------------------------------------------------- standalone


class _ClusterHandler(DashboardHandler):
    server: ClusterDashboardServer

    def _answer(self) -> None:
        if not self._host_allowed():
            self._send(
                403,
                "text/plain; charset=utf-8",
                b"403 Forbidden: this dashboard answers only to a loopback Host (localhost, 127.0.0.1, [::1])\n",
            )
            return
        parts = urlsplit(self.path)
        body = b""
        if self.command == "POST":
            try:
                n = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                n = -1
            if not 0 <= n <= MAX_BODY:
                self._send(*_error(413, f"413 Payload Too Large: at most {MAX_BODY} bytes")[:3])
                return
            body = self.rfile.read(n)
        headers = {k.lower(): v for k, v in self.headers.items()}
        method = "GET" if self.command == "HEAD" else self.command
        # (this server speaks plain HTTP: behind a TLS-terminating proxy, mount cluster_app in
        # an ASGI server that sets the scheme, e.g. uvicorn --proxy-headers)
        status, ctype, payload, extra = self.server.dashboard.handle(
            method, parts.path, parts.query, headers, body, "http"
        )
        self._send(status, ctype, payload, extra)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _answer


class ClusterDashboardServer(DashboardServer):
    """The standalone cluster dashboard: ``url`` to open (add ``?token=...``), ``stop()``."""

    handler_class = _ClusterHandler
    dashboard: ClusterDashboard

    def stop(self, timeout: float | None = 5.0) -> None:
        super().stop(timeout)
        self.dashboard.close()


class _ClusterDashboardServer6(ClusterDashboardServer, DashboardServer6):
    pass


def serve_cluster(
    source: Any,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    token: str,
    prefix: str = "catzilla",
    **options: Any,
) -> tuple[ClusterDashboardServer, threading.Thread]:
    """Serve the cluster dashboard in a background thread; returns ``(server, thread)``.

    ``source``: a ``redis://`` URL or a ``RedisBroker``; ``token`` is required (the page is
    ``server.url + "?token=..."``); ``port=0`` picks a free port. Stop with ``server.stop()``
    (which also closes the Redis client it opened).
    """
    dash = ClusterDashboard(source, token=token, prefix=prefix, **options)
    cls = _ClusterDashboardServer6 if ":" in host else ClusterDashboardServer
    try:
        server = cls((host.strip("[]"), port), lambda: {}, token)
    except BaseException:
        dash.close()
        raise
    server.dashboard = dash
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.25},
        name=f"catzilla-tasks-cluster-dashboard:{server.server_address[1]}",
        daemon=True,
    )
    server.thread = thread
    thread.start()
    return server, thread
