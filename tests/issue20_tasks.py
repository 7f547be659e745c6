"""Tasks for tests/test_issue20_contract.py (issue 20 checked from the outside: only what the
README and the issue tell a user). Producers (the test process) and workers
(``catzilla-tasks worker issue20_tasks:tasks``) both import this module, as the README's
``jobs.py``; it is configured by the environment:

- ``I20_URL`` / ``I20_PREFIX``: the Redis server and key prefix;
- ``I20_VT``: the broker's visibility timeout (long: a killed worker's tasks stay its own);
- ``I20_OTEL=1``: this process sets an SDK tracer provider with an in-memory exporter, read
  back through the ``spans`` task.
"""

from __future__ import annotations

import os
import time
from typing import Any

from catzilla_tasks import BackgroundTasks, current_task
from catzilla_tasks.brokers import RedisBroker

URL = os.environ["I20_URL"]
PREFIX = os.environ["I20_PREFIX"]
VT = float(os.environ.get("I20_VT", "300"))

_exporter: Any = None
if os.environ.get("I20_OTEL") == "1":
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    _exporter = InMemorySpanExporter()
    _provider = TracerProvider()
    _provider.add_span_processor(SimpleSpanProcessor(_exporter))
    trace.set_tracer_provider(_provider)

tasks = BackgroundTasks(workers=4, name="i20", broker=RedisBroker(URL, prefix=PREFIX, visibility_timeout=VT))
# the same tasks on an engine with tracing off (a producer or a worker that makes no spans)
quiet = BackgroundTasks(
    workers=2, name="i20quiet", tracing=False, broker=RedisBroker(URL, prefix=PREFIX, visibility_timeout=VT)
)


def _client():
    import redis

    return redis.Redis.from_url(URL, socket_timeout=None)


@quiet.task
@tasks.task
def ok(x: int) -> int:
    return x * 2


@quiet.task
@tasks.task
def boom(x: int) -> None:
    raise ValueError(f"boom {x}")


@tasks.task
def hold(key: str) -> str:
    """Reports progress, then runs until ``key`` is pushed to (or 600 s): a task that stays in
    flight."""
    current_task().set_progress(0.5, "holding")
    c = _client()
    try:
        c.blpop([key], timeout=600)
    finally:
        c.close()
    return "released"


@quiet.task
@tasks.task
def current_trace() -> str | None:
    """The trace id (hex) of the span current in the task, None without one."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


@quiet.task
@tasks.task
def spans(trace_id: str) -> list[dict]:
    """The spans this process finished in trace ``trace_id`` (hex)."""
    if _exporter is None:
        return []
    out = []
    for s in _exporter.get_finished_spans():
        if format(s.context.trace_id, "032x") != trace_id:
            continue
        out.append(
            {
                "name": s.name,
                "kind": s.kind.name,
                "trace_id": format(s.context.trace_id, "032x"),
                "span_id": format(s.context.span_id, "016x"),
                "parent_id": format(s.parent.span_id, "016x") if s.parent is not None else None,
                "status": s.status.status_code.name,
                "events": [e.name for e in s.events],
                "attributes": {
                    k: v if isinstance(v, (str, int, float, bool)) else list(v) for k, v in s.attributes.items()
                },
            }
        )
    return out


@tasks.task(max_retries=2, retry_backoff="fixed", retry_base_ms=5)
def always_fails(x: int) -> None:
    raise ValueError(f"always {x}")


@tasks.task(max_retries=2, retry_backoff="fixed", retry_base_ms=5)
def fails_once(key: str) -> str:
    """Fails its first attempt (counted in Redis under ``key``), then succeeds."""
    c = _client()
    try:
        n = c.incr(key)
    finally:
        c.close()
    if n == 1:
        raise RuntimeError("first attempt")
    return "second"


@tasks.task
def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@tasks.task
def boom_other(x: int) -> None:
    """As ``boom``, under a name of its own (tests other than the main scenario's)."""
    raise ValueError(f"boom {x}")


@tasks.task
def ok_other(x: int) -> int:
    return x * 2


@quiet.task
@tasks.task
def current_baggage(key: str) -> str | None:
    """The OpenTelemetry baggage entry ``key`` seen in the task."""
    from opentelemetry import baggage

    value = baggage.get_baggage(key)
    return None if value is None else str(value)


@tasks.task
async def current_baggage_async(key: str) -> str | None:
    """``current_baggage`` as an ``async def`` task."""
    from opentelemetry import baggage

    value = baggage.get_baggage(key)
    return None if value is None else str(value)
