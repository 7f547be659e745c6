"""The ``catzilla-tasks`` command: look at a running engine from a terminal or a browser.

    catzilla-tasks stats URL [--token T] [--watch SECONDS [--count N]]
    catzilla-tasks dashboard URL [--port P] [--token T] [--serve-token S]
    catzilla-tasks dashboard --broker URL [--host H] [--port P] [--token T] [--prefix P]
    catzilla-tasks metrics URL [--token T]
    catzilla-tasks demo-server [--port P]
    catzilla-tasks worker MODULE:TASKS [--concurrency N]      (distributed mode, see brokers/commands.py)
    catzilla-tasks dead-letters list|redrive ...
    catzilla-tasks schedules --app MODULE:TASKS                 (cluster-wide periodic tasks)
    catzilla-tasks cancel TASK_ID --broker URL                  (cancel remote tasks)
    catzilla-tasks workers|queues|tasks --broker URL [--json]   (the cluster, see brokers/cluster_commands.py)
    catzilla-tasks inspect TASK_ID --broker URL [--json]
    catzilla-tasks exporter --broker URL [--port P]

``URL`` is where a running engine exposes its stats: a dashboard server
(``http://127.0.0.1:8765/``, its ``/stats.json`` is used) or a framework route that returns the
JSON of ``tasks.monitor.get_stats()`` (used as given). The token may also come from the
``CATZILLA_TASKS_TOKEN`` environment variable, which keeps it out of the process list; it is
sent as ``Authorization: Bearer ...``.

Exit status: 0 on success, 1 when the stats cannot be read, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO
from urllib.parse import quote, urlsplit, urlunsplit

__all__ = ["RemoteStats", "StatsError", "format_stats", "main", "redirect_allowed", "stats_url", "wait_for_stop"]

TOKEN_ENV = "CATZILLA_TASKS_TOKEN"  # noqa: S105 - the name of an environment variable, not a token
SERVE_TOKEN_ENV = "CATZILLA_TASKS_SERVE_TOKEN"  # noqa: S105 - the name of an environment variable, not a token
DASH = "\u2013"


class StatsError(Exception):
    """The stats of a running engine could not be read (the message says why)."""


# ----------------------------------------------------------------------------- fetching


def stats_url(url: str) -> str:
    """The stats JSON URL for ``url``: a URL ending in ``/`` gets ``stats.json`` appended."""
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise StatsError(f"not an http(s) URL: {url}")
    if not parts.netloc:
        raise StatsError(f"no host in URL: {url}")
    path = parts.path or "/"
    if path.endswith("/"):
        path += "stats.json"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _with_path(url: str, path: str) -> str:
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc, path, p.query, ""))


class RemoteStats:
    """A stats function that reads a running engine's stats JSON over HTTP."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 5.0) -> None:
        self.url = stats_url(url)
        self.token = token
        self.timeout = timeout

    def _get(self, url: str) -> tuple[str, bytes]:
        # urllib.request (http.client, email) is imported here: `catzilla-tasks worker` never needs it
        from urllib.error import HTTPError, URLError
        from urllib.request import Request, build_opener

        headers = {"Accept": "application/json", "User-Agent": "catzilla-tasks-cli"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        opener = build_opener(_redirect_handler(bool(self.token) or _has_credentials(url)))
        try:
            with opener.open(Request(url, headers=headers), timeout=self.timeout) as resp:  # noqa: S310 - http(s) only (stats_url), redirects checked
                return resp.headers.get_content_type(), resp.read()
        except HTTPError as exc:
            if exc.code == 401:
                hint = "the token was refused" if self.token else f"it needs a token: --token or {TOKEN_ENV}"
                raise StatsError(f"{_redact(url)}: 401 Unauthorized ({hint})") from None
            detail = exc.read(300).decode("utf-8", "replace").strip()
            raise StatsError(
                f"{_redact(url)}: HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else "")
            ) from None
        except URLError as exc:
            raise StatsError(f"cannot reach {_redact(url)}: {exc.reason}") from None
        except (TimeoutError, OSError) as exc:
            raise StatsError(f"cannot reach {_redact(url)}: {exc}") from None

    def __call__(self) -> dict[str, Any]:
        ctype, body = self._get(self.url)
        url = self.url
        if ctype == "text/html":
            # a dashboard page: .../index.html has its stats beside it, a page mounted at
            # .../dash (no trailing slash) has them at .../dash/stats.json
            path = urlsplit(url).path
            if path.endswith(".html"):
                url = _with_path(url, path.rsplit("/", 1)[0] + "/stats.json")
            else:
                url = _with_path(url, path.rstrip("/") + "/stats.json")
            ctype, body = self._get(url)
        try:
            stats = json.loads(body)
        except ValueError:
            raise StatsError(f"{_redact(url)} did not answer with JSON ({ctype})") from None
        if not isinstance(stats, dict) or not {"queue_metrics", "totals"} <= stats.keys():
            raise StatsError(f"{_redact(url)} did not answer with an engine's stats (tasks.monitor.get_stats())")
        return stats


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urlsplit(url)
    try:
        port = p.port
    except ValueError:
        port = -1
    scheme = p.scheme.lower()
    return scheme, (p.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


def _has_credentials(url: str) -> bool:
    from ._redact import redact_url

    return redact_url(url) != url


def redirect_allowed(old: str, new: str, credentials: bool) -> str | None:
    """None when a redirect from ``old`` to ``new`` may be followed, else why not: never from
    https to anything else, and with credentials (a token, a password or a token parameter in
    the URL) only to the same origin (scheme, host and port), where they were meant to go."""
    o, n = _origin(old), _origin(new)
    if n[0] not in ("http", "https"):
        return f"it points to a {n[0] or 'relative'}: URL"
    if o[0] == "https" and n[0] != "https":
        return "it leaves https for plain http"
    if credentials and o != n:
        return "it points to another origin and the request carries credentials"
    return None


def _redirect_handler(credentials: bool) -> Any:
    from urllib.request import HTTPRedirectHandler

    class _Redirects(HTTPRedirectHandler):
        """Follows a redirect only where redirect_allowed says, before anything is sent there."""

        def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
            why = redirect_allowed(req.full_url, newurl, credentials)
            if why is not None:
                fp.close()
                raise StatsError(
                    f"{_redact(req.full_url)} redirects ({code}) to {_redact(newurl)}: not followed, "
                    f"{why}; use the final URL directly"
                )
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return _Redirects()


def _redact(url: str) -> str:
    """``url`` without credentials (userinfo, token and password parameters), for messages."""
    from ._redact import redact_url

    return redact_url(url)


# ----------------------------------------------------------------------------- formatting
# The same figures, the same way, as the dashboard page shows them.


def fmt_int(v: Any) -> str:
    return DASH if v is None else f"{round(v):,}"


def fmt_num(v: Any) -> str:
    if v is None:
        return DASH
    if abs(v) < 10:
        return f"{v:.2f}"
    if abs(v) < 1000:
        return f"{v:.1f}"
    return f"{round(v):,}"


def fmt_ms(v: Any) -> str:
    if v is None:
        return DASH
    if v < 1:
        return f"{v * 1000:.1f} \u00b5s"
    if v < 1000:
        return f"{v:.2f} ms"
    return f"{v / 1000:.2f} s"


def fmt_pct(v: Any) -> str:
    return DASH if v is None else f"{v * 100:.1f} %"


def fmt_mb(v: Any) -> str:
    return DASH if v is None else f"{v:.2f} MB"


def fmt_duration(v: Any) -> str:
    if v is None:
        return DASH
    if v < 60:
        return f"{v:.1f} s"
    s = int(v)
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if s < 3600:
        return f"{m} min {s % 60:02d} s"
    if s < 86400:
        return f"{h} h {m:02d} min"
    return f"{d} d {h:02d} h"


def fmt_time(v: Any) -> str:
    return DASH if v is None else _dt.datetime.fromtimestamp(v).strftime("%H:%M:%S")


def _get(stats: Mapping[str, Any], path: str) -> Any:
    cur: Any = stats
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _block(title: str, rows: Sequence[tuple[str, str]], width: int = 30) -> list[str]:
    lines = [title]
    for label, value in rows:
        lines.append(f"  {label:<{width - 14}}{value:>12}")
    return lines


def _side_by_side(left: list[str], right: list[str], gap: int = 6, width: int = 30) -> list[str]:
    n = max(len(left), len(right))
    left = left + [""] * (n - len(left))
    right = right + [""] * (n - len(right))
    return [f"{a:<{width + gap}}{b}".rstrip() for a, b in zip(left, right, strict=True)]


def format_stats(
    stats: Mapping[str, Any], source: str | None = None, max_failures: int = 10, columns: int | None = None
) -> str:
    """A readable plain-text table of an engine's stats (what ``catzilla-tasks stats`` prints)."""
    from ._redact import redact_text

    g = lambda path: _get(stats, path)  # noqa: E731
    columns = columns or shutil.get_terminal_size((100, 24)).columns
    state = "paused" if g("engine.paused") else "running"
    accepting = "accepting" if g("engine.accepting") else "not accepting"
    up = fmt_duration(g("engine.uptime_s"))
    head = f"catzilla-tasks \u00b7 {g('engine.name') or '?'} \u00b7 {state} \u00b7 {accepting} \u00b7 up {up}"
    out = [head]
    if source:
        out.append(f"  from {_redact(source)}")
    out.append("")
    out.append(f"Throughput  {fmt_num(g('performance_metrics.tasks_per_second'))} tasks/s")
    out.append("")
    queues = _block(
        "Queues",
        [
            ("critical", fmt_int(g("queue_metrics.critical_queue_size"))),
            ("high", fmt_int(g("queue_metrics.high_queue_size"))),
            ("normal", fmt_int(g("queue_metrics.normal_queue_size"))),
            ("low", fmt_int(g("queue_metrics.low_queue_size"))),
            ("total", fmt_int(g("queue_metrics.total_queued"))),
            ("pressure", fmt_pct(g("queue_metrics.queue_pressure"))),
        ],
    )
    workers = _block(
        "Workers",
        [
            ("active", fmt_int(g("worker_metrics.active_workers"))),
            ("idle", fmt_int(g("worker_metrics.idle_workers"))),
            ("total", fmt_int(g("worker_metrics.total_workers"))),
            ("utilization", fmt_pct(g("worker_metrics.avg_worker_utilization"))),
        ],
    )
    out += _side_by_side(queues, workers)
    out.append("")
    out.append(f"Latency{'avg':>19}{'p95':>12}{'p99':>12}")
    for label, key in (("execution", "execution_time_ms"), ("queue wait", "queue_wait_ms")):
        vals = [fmt_ms(g(f"performance_metrics.{p}_{key}")) for p in ("avg", "p95", "p99")]
        out.append(f"  {label:<12}{vals[0]:>12}{vals[1]:>12}{vals[2]:>12}")
    out.append("")
    errors = _block(
        "Errors",
        [
            ("error rate", fmt_pct(g("error_metrics.error_rate"))),
            ("failed tasks", fmt_int(g("error_metrics.failed_tasks"))),
            ("retries", fmt_int(g("error_metrics.retry_count"))),
            ("timeouts", fmt_int(g("error_metrics.timeout_count"))),
            ("", ""),
            ("memory", fmt_mb(g("performance_metrics.memory_usage_mb"))),
            ("efficiency", fmt_pct(g("performance_metrics.memory_efficiency"))),
        ],
    )
    totals = _block(
        "Totals",
        [
            (k.replace("_", " "), fmt_int(g(f"totals.{k}")))
            for k in ("submitted", "succeeded", "failed", "cancelled", "retried", "timed_out", "rejected")
        ],
    )
    out += _side_by_side(errors, totals)
    failures = g("recent_failures") or []
    out.append("")
    if not failures:
        out.append("Recent failures: none")
    else:
        shown = failures[:max_failures]
        more = f", {len(failures) - len(shown)} more" if len(failures) > len(shown) else ""
        out.append(f"Recent failures (newest first{more})")
        name_w = min(28, max(len(str(f.get("name", ""))) for f in shown))
        id_w = max(len(str(f.get("task_id", ""))) for f in shown)
        for f in shown:
            name, tid = str(f.get("name", ""))[:name_w], str(f.get("task_id", ""))
            prefix = f"  {fmt_time(f.get('finished_at'))}  {name:<{name_w}}  {tid:<{id_w}}  "
            err = " ".join(redact_text(str(f.get("error", ""))).split())
            room = max(20, columns - len(prefix) - 1)
            out.append(prefix + (err if len(err) <= room else err[: room - 1] + "\u2026"))
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- commands


def _token(args: argparse.Namespace) -> str | None:
    return args.token or os.environ.get(TOKEN_ENV) or None


def wait_for_stop() -> None:
    """Block until Ctrl-C or SIGTERM."""
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):  # a wait on an event, in slices so Ctrl-C is seen at once
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def cmd_stats(args: argparse.Namespace, out: TextIO) -> int:
    remote = RemoteStats(args.url, _token(args), timeout=args.timeout)
    if args.watch is None:
        out.write(format_stats(remote(), remote.url))
        return 0
    clear = out.isatty()
    n = 0
    try:
        while True:
            try:
                text = format_stats(remote(), remote.url)
            except StatsError as exc:
                text = f"catzilla-tasks: {exc} (retrying every {args.watch:g} s)\n"
            if clear:
                out.write("\x1b[H\x1b[2J")
            elif n:
                out.write("\n")
            out.write(text)
            out.flush()
            n += 1
            if args.count is not None and n >= args.count:
                return 0
            time.sleep(args.watch)  # the refresh period, not a synchronisation
    except KeyboardInterrupt:
        return 0


def cmd_metrics(args: argparse.Namespace, out: TextIO) -> int:
    try:
        from . import prometheus
    except ImportError as exc:
        raise StatsError(str(exc)) from None
    remote = RemoteStats(args.url, _token(args), timeout=args.timeout)
    stats = remote()
    out.write(prometheus.metrics_text(lambda: stats).decode())
    return 0


BROKER_ENV = "CATZILLA_TASKS_BROKER"


class UsageError(Exception):
    """A command line that cannot be run (exit status 2)."""


def cmd_cluster_dashboard(args: argparse.Namespace, out: TextIO) -> int:
    """``dashboard --broker URL``: the cluster page of a Redis broker, with its actions."""
    from .dashboard.cluster import serve_cluster

    if args.serve_token:
        raise UsageError("with --broker the page's token is --token (or $CATZILLA_TASKS_SERVE_TOKEN)")
    url = args.broker or os.environ.get(BROKER_ENV)
    # the page can re-drive and cancel: it always needs a token (a random one unless given)
    token = args.token or os.environ.get(SERVE_TOKEN_ENV) or None
    if token is None:
        import secrets

        token = secrets.token_urlsafe(24)
    try:
        server, _ = serve_cluster(
            url, host=args.host or "127.0.0.1", port=args.port, token=token, prefix=args.prefix or "catzilla"
        )
    except (TypeError, ValueError) as exc:
        raise UsageError(_redact(str(exc))) from None
    page = f"{server.url}?token={quote(token, safe='')}"
    out.write(f"catzilla-tasks cluster dashboard of {_redact(str(url))} at {page}  (Ctrl-C to stop)\n")
    out.flush()
    try:
        wait_for_stop()
    finally:
        server.stop()
    return 0


def cmd_dashboard(args: argparse.Namespace, out: TextIO) -> int:
    from .dashboard import serve

    if args.broker or (args.url is None and os.environ.get(BROKER_ENV)):
        if args.url is not None:
            raise UsageError("give either URL (an engine's stats) or --broker (a Redis cluster), not both")
        if args.timeout is not None:
            raise UsageError("--timeout is the HTTP timeout of an engine's URL, not of --broker")
        return cmd_cluster_dashboard(args, out)
    if args.url is None:
        raise UsageError(f"give URL (an engine's stats) or --broker redis://... (or set {BROKER_ENV})")
    if args.host is not None or args.prefix is not None:
        raise UsageError("--host and --prefix go with --broker (an engine's page is re-served on 127.0.0.1)")
    if args.timeout is None:
        args.timeout = 5.0
    remote = RemoteStats(args.url, _token(args), timeout=args.timeout)
    # Stats that need a credential are not re-served without one: the local server gets its own
    # token (--serve-token, $CATZILLA_TASKS_SERVE_TOKEN, or a random one printed in its URL).
    local_token = args.serve_token or os.environ.get(SERVE_TOKEN_ENV) or None
    if local_token is None and (remote.token or _has_credentials(remote.url)):
        import secrets

        local_token = secrets.token_urlsafe(24)
    try:
        remote()
    except StatsError as exc:  # serve anyway: the page says what is wrong and retries
        print(f"catzilla-tasks: warning: {exc}", file=sys.stderr)
    server, _ = serve(remote, host="127.0.0.1", port=args.port, token=local_token)  # loopback only
    local = server.url + (f"?token={quote(local_token, safe='')}" if local_token else "")  # '+', '&', '#' as given
    out.write(f"catzilla-tasks dashboard of {_redact(remote.url)} at {local}  (Ctrl-C to stop)\n")
    out.flush()
    try:
        wait_for_stop()
    finally:
        server.stop()
    return 0


# The demo: a few kinds of work at every priority, some failing, retrying or timing out.

_demo_rnd = random.Random()  # noqa: S311 - the demo's sample load, not a secret


def _busy(seconds: float) -> None:
    """Work for about ``seconds`` (sleeping in slices, so a timeout or a cancel request lands)."""
    from . import current_task

    end = time.monotonic() + seconds
    me = current_task()
    while time.monotonic() < end and not (me is not None and me.cancel_requested):
        time.sleep(min(0.005, max(0.0, end - time.monotonic())))


def charge_card(order: int) -> str:
    _busy(_demo_rnd.uniform(0.001, 0.004))
    if _demo_rnd.random() < 0.01:
        raise RuntimeError(f"card declined for order {order}")
    return "charged"


def send_email(to: str) -> str:
    _busy(_demo_rnd.uniform(0.002, 0.012))
    if _demo_rnd.random() < 0.06:
        raise ConnectionError(f"SMTP server did not answer for {to}")
    return "sent"


def resize_image(name: str) -> str:
    _busy(_demo_rnd.uniform(0.005, 0.040))
    if _demo_rnd.random() < 0.02:
        raise ValueError(f"cannot decode {name}: not a PNG file")
    return name


def rebuild_index(shard: int) -> int:
    _busy(_demo_rnd.uniform(0.040, 0.130))
    return shard


def _ignore(result: Any) -> None:
    pass


def _demo_engine(rate: float) -> tuple[Any, Callable[[], None]]:
    from . import BackgroundTasks, QueueFull, TaskFuture, TaskPriority, task

    tasks = BackgroundTasks(workers=4, min_workers=2, max_workers=8, name="demo", queue_size=5000)
    rnd = _demo_rnd
    task(priority=TaskPriority.CRITICAL)(charge_card)
    task(priority=TaskPriority.HIGH, max_retries=2, retry_base_ms=20)(send_email)
    task(priority=TaskPriority.NORMAL)(resize_image)
    task(priority=TaskPriority.LOW, timeout_ms=120)(rebuild_index)

    kinds: list[tuple[Callable[[Any], object], float]] = [
        (charge_card, 0.15),
        (send_email, 0.30),
        (resize_image, 0.40),
        (rebuild_index, 0.15),
    ]
    stop = threading.Event()

    def load() -> None:
        t0 = time.monotonic()
        next_burst = 5.0
        i = 0
        while not stop.is_set():
            phase = time.monotonic() - t0
            # a slow wave of load, and a burst every 20 s, so the figures move
            now_rate = rate * (0.6 + 0.4 * math.sin(phase / 6))
            burst = 0
            if phase >= next_burst:  # a backlog for a few seconds: queue depth and auto-scaling show
                burst, next_burst = int(rate * 8), next_burst + 20
            for _ in range(1 + burst):
                func = rnd.choices([k for k, _ in kinds], [w for _, w in kinds])[0]
                i += 1
                try:
                    arg = i if func in (charge_card, rebuild_index) else f"item-{i}"
                    # catch() observes each failure: the demo's failures show on the dashboard
                    # instead of being logged with a traceback each (a success-only
                    # add_callback does not read a failure, which is then logged)
                    TaskFuture(tasks.add_task(func, arg)).catch(_ignore)
                except QueueFull:
                    pass
                except RuntimeError:  # shutting down
                    return
            stop.wait(1.0 / max(now_rate, 1.0))  # pacing of the generated load

    loader = threading.Thread(target=load, name="catzilla-tasks-demo-load", daemon=True)
    loader.start()

    def close() -> None:
        stop.set()
        loader.join(5)
        tasks.shutdown(wait_for_completion=False, timeout=10)

    return tasks, close


def cmd_demo_server(args: argparse.Namespace, out: TextIO) -> int:
    from .dashboard import serve

    tasks, close = _demo_engine(args.rate)
    try:
        server, _ = serve(tasks, host="127.0.0.1", port=args.port)
    except BaseException:
        close()
        raise
    url = server.url
    out.write(
        f"catzilla-tasks demo: dashboard at {url}  (stats: {url}stats.json, metrics: {url}metrics)  Ctrl-C to stop\n"
    )
    out.flush()
    try:
        wait_for_stop()
    finally:
        server.stop()
        close()
        out.write("catzilla-tasks demo: stopped\n")
        out.flush()
    return 0


# ----------------------------------------------------------------------------- parser


def _add_url_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument(
        "url",
        metavar="URL",
        nargs="?" if optional else None,
        help="a running engine's stats: a dashboard server (http://127.0.0.1:8765/) "
        "or a route returning tasks.monitor.get_stats() as JSON",
    )
    p.add_argument(
        "--token",
        help=f"bearer token of the engine's stats (default: ${TOKEN_ENV}, which other "
        "users cannot read in the process list, as they can this option)"
        + (
            f"; with --broker: the token the cluster page requires (default: ${SERVE_TOKEN_ENV}, else random)"
            if optional
            else ""
        ),
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None if optional else 5.0,
        help="HTTP timeout in seconds (default: 5)" + ("; not with --broker" if optional else ""),
    )


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="catzilla-tasks",
        description="Look at a running catzilla_tasks engine: figures in the terminal, a live dashboard, "
        "Prometheus metrics.",
    )
    parser.add_argument("--version", action="version", version=f"catzilla-tasks {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "stats", help="print an engine's figures as a table", description="Print an engine's figures as a table."
    )
    _add_url_args(p)
    p.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")
    p.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N tables")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser(
        "dashboard",
        help="serve the live dashboard of a running engine, or of a Redis cluster (--broker)",
        description="Serve the dashboard page on 127.0.0.1, reading the stats of the engine at URL. "
        "When those need a token, the local page needs one too: --serve-token, "
        f"${SERVE_TOKEN_ENV}, or a random one shown in the printed URL. "
        "With --broker redis://... instead of URL: the cluster's page (workers, queues, task names, "
        "failures, dead letters with re-drive, a task by id with cancel) on --host/--port; it always "
        f"needs a token: --token, ${SERVE_TOKEN_ENV}, or a random one shown in the printed URL.",
    )
    _add_url_args(p, optional=True)
    p.add_argument("--broker", metavar="URL", help=f"a Redis cluster's page instead (default: ${BROKER_ENV})")
    p.add_argument("--prefix", help="with --broker: the brokers' key prefix (default: catzilla)")
    p.add_argument(
        "--host",
        help="with --broker: the address to listen on (default: 127.0.0.1; a loopback server answers "
        "only loopback Host names)",
    )
    p.add_argument(
        "--serve-token",
        help="token the local page requires (default: "
        f"${SERVE_TOKEN_ENV}, which stays out of the process list; a random one when the "
        "engine's stats need a token)",
    )
    p.add_argument("--port", type=int, default=8765, help="local port (default: 8765; 0: any free port)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser(
        "metrics",
        help="print an engine's figures in the Prometheus text format",
        description="Print an engine's figures in the Prometheus text format (needs prometheus-client).",
    )
    _add_url_args(p)
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser(
        "demo-server",
        help="run a demo engine with sample load and serve its dashboard",
        description="Run an in-process engine with sample load and serve its dashboard on 127.0.0.1.",
    )
    p.add_argument("--port", type=int, default=8765, help="local port (default: 8765; 0: any free port)")
    p.add_argument("--rate", type=float, default=60.0, help="average tasks submitted per second (default: 60)")
    p.set_defaults(func=cmd_demo_server)

    from .brokers.commands import add_commands  # distributed mode: worker, dead-letters

    add_commands(sub)
    # -- distributed mode: the cluster's workers, queues, task names, one task, the exporter
    from .brokers.cluster_commands import add_cluster_commands

    add_cluster_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "stats":
        if args.watch is not None and not args.watch > 0:
            parser.error("stats: --watch needs a positive number of seconds")
        if args.count is not None and (args.watch is None or args.count < 1):
            parser.error("stats: --count needs --watch and a count >= 1")
    if getattr(args, "port", 0) is not None and not 0 <= getattr(args, "port", 0) <= 65535:
        parser.error(f"{args.command}: --port must be between 0 and 65535")
    try:
        return int(args.func(args, sys.stdout))
    except StatsError as exc:
        print(f"catzilla-tasks {args.command}: {exc}", file=sys.stderr)
        return 1
    except UsageError as exc:
        print(f"catzilla-tasks {args.command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the port is taken
        print(f"catzilla-tasks {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
