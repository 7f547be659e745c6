"""The cluster commands of ``catzilla-tasks`` (wired into :mod:`catzilla_tasks.cli`):

catzilla-tasks workers --broker URL [--prefix P] [--json]
catzilla-tasks queues  --broker URL [--prefix P] [--json]
catzilla-tasks tasks   --broker URL [--prefix P] [--json]
catzilla-tasks inspect TASK_ID --broker URL [--prefix P] [--json]
catzilla-tasks exporter --broker URL [--prefix P] [--host H] [--port N] [--once]

Each reads Redis through :class:`.cluster.ClusterView`. The broker URL may also come from
``CATZILLA_TASKS_BROKER`` (a password in it then stays out of the process list).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
import unicodedata
from collections.abc import Sequence
from typing import Any, TextIO

__all__ = ["add_cluster_commands"]

BROKER_ENV = "CATZILLA_TASKS_BROKER"
DASH = "\u2013"


class _Usage(Exception):
    pass


def _view(args: argparse.Namespace) -> Any:
    from .cluster import ClusterView

    url = args.broker or os.environ.get(BROKER_ENV)
    if not url:
        raise _Usage(f"give --broker redis://... (or set {BROKER_ENV})")
    try:
        return ClusterView(url, prefix=args.prefix)
    except ValueError as exc:
        raise _Usage(str(exc)) from None


# What the tables and ``inspect`` print comes from Redis, much of it from outside: a task's
# exception message is often made of user input, a task name is the producer's, a worker's id
# and host its own. Written to a terminal as it is, an escape sequence in it would retitle the
# window, clear the screen, recolour or hide what follows; a carriage return would overwrite the
# line, a bidi override reorder it. So the C0 and C1 controls (but the newlines of a traceback),
# DEL and the bidi controls are shown escaped (\x1b, \u202e); ``--json`` keeps the text as is.
_CONTROLS = {
    c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
    for c in (*range(0x20), *range(0x7F, 0xA0), 0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
}
_CONTROLS_KEEP_NEWLINES = {c: v for c, v in _CONTROLS.items() if c != 0x0A}


def _safe(value: Any, newlines: bool = False) -> str:
    """``value`` as text a terminal shows as it is (see _CONTROLS)."""
    return str(value).translate(_CONTROLS_KEEP_NEWLINES if newlines else _CONTROLS)


def _width(text: str) -> int:
    """The columns a terminal gives ``text``: East Asian wide and full-width characters two,
    combining marks and format characters (zero-width space, joiners) none."""
    if text.isascii():
        return len(text)
    return sum(
        0
        if unicodedata.combining(c) or unicodedata.category(c) in ("Mn", "Me", "Cf")
        else 2
        if unicodedata.east_asian_width(c) in ("W", "F")
        else 1
        for c in text
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: set[int]) -> str:
    cells = [[str(c) for c in headers], *[[DASH if c is None else _safe(c) for c in r] for r in rows]]
    shown = [[_width(c) for c in r] for r in cells]  # (padded by columns on the terminal, not code points)
    widths = [max(r[i] for r in shown) for i in range(len(headers))]
    lines = []
    for r, w in zip(cells, shown, strict=True):
        parts = [" " * (widths[i] - w[i]) + c if i in right else c + " " * (widths[i] - w[i]) for i, c in enumerate(r)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines) + "\n"


def _ago(t: float | None, now: float) -> str | None:
    if t is None:
        return None
    d = max(0.0, now - t)
    return f"{d:.1f} s ago" if d < 120 else f"{d / 60:.0f} min ago" if d < 7200 else f"{d / 3600:.1f} h ago"


def _when(t: Any) -> str:
    try:
        return _dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OverflowError, OSError):  # (no time, or not one)
        return "?"


def _mib(b: int | None) -> str | None:
    return None if b is None else f"{b / 2**20:.1f} MiB"


def _secs(v: float | None) -> str | None:
    if v is None:
        return None
    if v < 1e-3:
        return f"{v * 1e6:.0f} \u00b5s"
    if v < 1:
        return f"{v * 1e3:.1f} ms"
    return f"{v:.2f} s"


def cmd_workers(args: argparse.Namespace, out: TextIO) -> int:
    with _view(args) as v:
        ws = v.workers()
    if args.json:
        json.dump(ws, out, indent=1)
        out.write("\n")
        return 0
    now = time.time()
    alive = sum(w["state"] == "alive" for w in ws)
    out.write(f"{len(ws)} worker(s): {alive} alive, {len(ws) - alive} lost\n")
    if not ws:
        return 0
    rows = [
        (
            w["id"],
            w["host"],
            w["pid"],
            w["state"],
            ",".join(f"{q}:{w['weights'][q]}" if q in w.get("weights", {}) else q for q in w["queues"]),
            w["concurrency"],
            w["in_flight"],
            w["pending"],
            f"{w['processed']:,}",
            f"{w['failed']:,}",
            _mib(w["rss_bytes"]),
            _ago(w["last_seen"], now),
        )
        for w in ws
    ]
    heads = ("ID", "HOST", "PID", "STATE", "QUEUES", "CONC", "IN FLIGHT", "PENDING", "PROCESSED", "FAILED", "RSS")
    out.write(_table((*heads, "LAST SEEN"), rows, {2, 5, 6, 7, 8, 9, 10}))
    return 0


def cmd_queues(args: argparse.Namespace, out: TextIO) -> int:
    with _view(args) as v:
        rows = v.queues()
    if args.json:
        json.dump(rows, out, indent=1)
        out.write("\n")
        return 0
    if not rows:
        out.write("no queues\n")
        return 0
    table = [
        (r["queue"], r["priority"], *(f"{r[k]:,}" for k in ("queued", "delayed", "in_flight", "dead_letters")))
        for r in rows
    ]
    out.write(_table(("QUEUE", "PRIORITY", "QUEUED", "DELAYED", "IN FLIGHT", "DEAD LETTERS"), table, {2, 3, 4, 5}))
    return 0


def cmd_tasks(args: argparse.Namespace, out: TextIO) -> int:
    with _view(args) as v:
        names = v.task_names()
    if args.json:
        json.dump(names, out, indent=1)
        out.write("\n")
        return 0
    if not names:
        out.write("no task figures (no worker registered)\n")
        return 0
    rows = [
        (
            t["name"],
            f"{t['processed']:,}",
            f"{t['failed']:,}",
            f"{t['retried']:,}",
            f"{t['rate']:.1f}",
            _secs(t["wait"]["p50"]),
            _secs(t["wait"]["p99"]),
            _secs(t["run"]["p50"]),
            _secs(t["run"]["p95"]),
            _secs(t["run"]["p99"]),
        )
        for t in names
    ]
    heads = ("TASK", "PROCESSED", "FAILED", "RETRIED", "PER S", "WAIT P50", "WAIT P99", "RUN P50", "RUN P95", "RUN P99")
    out.write(_table(heads, rows, set(range(1, 10))))
    for t in names:
        if t["errors"]:
            e = t["errors"][0]
            when = _when(e.get("at"))
            first = str(e.get("error", "")).split("\n", 1)[0] if e.get("error") else ""
            line = f"latest failure of {t['name']} ({when}, task {e.get('task_id', '?')}): {first}"
            out.write(_safe(line) + "\n")
    return 0


def cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    if not args.task_id:
        raise _Usage("TASK_ID: give a task id (not an empty string)")
    with _view(args) as v:
        info = v.inspect(args.task_id)
    if args.json:
        from ..dashboard import json_safe  # (a result is the task's: NaN and infinities as null)

        json.dump(json_safe(info), out, indent=1, allow_nan=False)
        out.write("\n")
        return 0 if info["status"] != "unknown" else 1
    for key in ("task_id", "name", "status", "queue", "priority", "worker", "deliveries", "due", "progress"):
        if key in info and info[key] is not None:
            value = info[key]
            if key == "due":
                value = _when(value)
            elif key == "progress":
                value = f"{value['fraction']:.0%}" + (f" {value['message']}" if value.get("message") else "")
            out.write(f"{key + ':':<12}{_safe(value)}\n")
    if "result" in info:
        out.write(f"{'result:':<12}{_safe(repr(info['result']))}\n")
    if "error" in info:
        err = info["error"]
        out.write(f"{'error:':<12}{_safe(err.get('type'))}: {_safe(err.get('message'), newlines=True)}\n")
        if err.get("traceback"):
            out.write(_safe(str(err["traceback"]).rstrip(), newlines=True) + "\n")
    if info["status"] == "unknown":
        out.write("(not found: never published, or its result expired)\n")
        return 1
    return 0


def cmd_exporter(args: argparse.Namespace, out: TextIO) -> int:
    try:
        from .. import prometheus
    except ImportError as exc:
        raise _Usage(str(exc)) from None
    view = _view(args)
    collector = prometheus.ClusterCollector(view)
    if args.once:
        try:
            out.write(prometheus.collector_text(collector).decode())
        finally:
            view.close()
        if collector.last_error is not None:
            print(f"catzilla-tasks exporter: redis: {collector.last_error}", file=sys.stderr)
            return 1
        return 0
    server, _ = prometheus.serve(collector, host=args.host, port=args.port)
    url = f"http://{args.host}:{server.server_port}/metrics"
    print(f"catzilla-tasks exporter on {url}  (Ctrl-C to stop)", file=out, flush=True)
    from ..cli import wait_for_stop

    try:
        wait_for_stop()
    finally:
        server.shutdown()
        view.close()
    return 0


def _run(func: Any) -> Any:
    def wrapped(args: argparse.Namespace, out: TextIO) -> int:
        try:
            return int(func(args, out))
        except _Usage as exc:
            print(f"catzilla-tasks {args.command}: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:
            if type(exc).__module__.startswith("redis"):
                from .._redact import redact_text

                print(f"catzilla-tasks {args.command}: redis: {redact_text(str(exc))}", file=sys.stderr)
                return 1
            raise

    return wrapped


def _common(p: argparse.ArgumentParser, json_flag: bool = True) -> None:
    p.add_argument("--broker", metavar="URL", help=f"redis://... of the cluster (default: ${BROKER_ENV})")
    p.add_argument("--prefix", default="catzilla", help="the brokers' key prefix (default: catzilla)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="JSON for scripts instead of a table")


def add_cluster_commands(sub: Any) -> None:
    """Add ``workers``, ``queues``, ``tasks``, ``inspect`` and ``exporter`` to the CLI's subparsers."""
    p = sub.add_parser(
        "workers",
        help="list the workers registered in Redis (alive or lost)",
        description="Every worker registered in Redis with its figures; a worker whose heartbeat "
        "stopped for 3 of its intervals is 'lost' (PENDING: the tasks Redis holds for it, which the "
        "live workers reclaim after the visibility timeout).",
    )
    _common(p)
    p.set_defaults(func=_run(cmd_workers))
    p = sub.add_parser(
        "queues",
        help="per queue and priority: queued, delayed, in flight, dead letters",
        description="The depth of every queue in Redis, per priority.",
    )
    _common(p)
    p.set_defaults(func=_run(cmd_queues))
    p = sub.add_parser(
        "tasks",
        help="per task name across the workers: counts, rate, latency percentiles, latest failure",
        description="Figures per task name, merged over the registered workers.",
    )
    _common(p)
    p.set_defaults(func=_run(cmd_tasks))
    p = sub.add_parser(
        "inspect",
        help="one task by id: its status and result or error",
        description="One task by id: its result or error once it ended, else where it waits. Exit status 1 "
        "when it is not found.",
    )
    p.add_argument("task_id", metavar="TASK_ID")
    _common(p)
    p.set_defaults(func=_run(cmd_inspect))
    p = sub.add_parser(
        "exporter",
        help="serve Prometheus metrics of the queues and dead letters (needs prometheus-client)",
        description="Serve the depths of every queue and dead-letter stream, and the workers by state, "
        "on http://HOST:PORT/metrics (read from Redis at each scrape).",
    )
    _common(p, json_flag=False)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=9808, help="port (default: 9808; 0: any free port)")
    p.add_argument("--once", action="store_true", help="print the metrics once and exit")
    p.set_defaults(func=_run(cmd_exporter))
