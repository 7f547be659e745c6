"""Web framework integrations: Catzilla (``.catzilla``), Starlette (``.starlette``), FastAPI (``.fastapi``).

Each integration serves the same read-only routes under a prefix (``/tasks`` by default):

- ``GET <prefix>/stats``: ``tasks.monitor.get_stats()`` as JSON,
- ``GET <prefix>/dashboard/``: the live dashboard page (it polls ``<prefix>/dashboard/stats.json``),
- ``GET <prefix>/metrics``: Prometheus text (404 with the reason when prometheus-client is missing).

The Starlette and FastAPI modules also give drop-ins for their ``BackgroundTasks`` that keep the
framework's semantics and run the tasks on the engine (see ``.starlette``).

Nothing here imports a framework: each module imports its own on first use.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .. import dashboard

__all__ = ["ROUTES", "stats_response", "metrics_response", "dashboard_response", "normalise_prefix"]

# path below the prefix -> what it serves
ROUTES = {
    "/stats": "stats JSON",
    "/dashboard/": "dashboard page",
    "/dashboard/stats.json": "stats JSON",
    "/metrics": "Prometheus text",
}

Reply = tuple[int, str, bytes, dict[str, str]]
_NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def normalise_prefix(prefix: str) -> str:
    """``"/tasks"`` from ``"/tasks"``, ``"tasks/"`` or ``"/tasks/"``; ``""`` mounts at the root."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix: expected a path such as '/tasks', got {type(prefix).__name__}")
    p = "/" + prefix.strip("/")
    return "" if p == "/" else p


def stats_response(stats_fn: Callable[[], Any]) -> Reply:
    """The stats as JSON (503 with the reason if they cannot be read)."""
    try:
        body = dashboard.json_stats(stats_fn)
    except Exception as exc:  # the route reports it; the server goes on
        msg = {"error": f"could not read the stats: {dashboard.error_text(exc)}"}
        return 503, "application/json", json.dumps(msg).encode(), dict(_NO_STORE)
    return 200, "application/json", body, dict(_NO_STORE)


def metrics_response(stats_fn: Callable[[], Any]) -> Reply:
    """Prometheus text, or 404 saying which extra to install."""
    try:
        status, ctype, body = dashboard._metrics(stats_fn)
    except Exception as exc:
        return (
            503,
            "text/plain; charset=utf-8",
            f"could not read the stats: {dashboard.error_text(exc)}\n".encode(),
            dict(_NO_STORE),
        )
    return status, ctype, body, dict(_NO_STORE)


def dashboard_response() -> Reply:
    headers = dict(_NO_STORE, **{"Content-Security-Policy": dashboard.PAGE_CSP})
    return 200, "text/html; charset=utf-8", dashboard.html().encode(), headers
