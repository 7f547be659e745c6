"""OpenTelemetry tracing of tasks (the ``[otel]`` extra: ``opentelemetry-api`` only).

Tracing is on when a tracer provider is set (``trace.set_tracer_provider(...)``, as the SDK's
set-up and ``opentelemetry-instrument`` do) and the engine was not made with
``BackgroundTasks(tracing=False)``. Then:

* ``add_task`` (and ``options(...).add_task``, periodic runs, workflow steps) makes a
  PRODUCER span ``send <destination>`` around the submission; in distributed mode the W3C
  trace context of that span (``traceparent``, ``tracestate``, and ``baggage`` with the default
  propagators: whatever the global propagator injects) travels in the message's headers
  (see :mod:`.brokers.protocol`).
* the run of the task is wrapped in a CONSUMER span ``process <destination>``, a child of the
  producer span (the message's creation context is its parent: one trace from the producer into
  the worker), one per attempt; an exception that ends the attempt is recorded on it with
  status ERROR. In-process the same spans are made around the engine's own queue.

Attributes follow OpenTelemetry's messaging semantic conventions: ``messaging.system``
(``catzilla_tasks``), ``messaging.operation.type`` (``send`` / ``process``),
``messaging.operation.name``, ``messaging.destination.name`` (the Redis stream of the task's
priority, or the engine's name in-process), ``messaging.message.id`` (the task id), plus
``catzilla_tasks.task.name``.

The decision costs a dictionary lookup when no provider is set (this module never imports
OpenTelemetry itself until a provider is set: a process that does not use it pays nothing). A
no-op tracer provider (``NoOpTracerProvider``) makes no spans; a task is then traced only to
carry a context it was given (a valid parent, as the API's no-op tracer does, or baggage).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["provider_set", "publish", "submit_local", "consumer", "Traced"]

SYSTEM = "catzilla_tasks"
_MISSING = object()


def _provider() -> Any:
    """The global tracer provider once one is set, else None.

    ``opentelemetry.trace`` keeps it in a module global, ``_TRACER_PROVIDER`` (None until
    ``set_tracer_provider``), read here (and by the C gate, ``trace_wanted``) as a fast answer:
    the public ``get_tracer_provider()`` is a Python call that also looks up an environment
    variable each time, ~1.6 us per task against a dict lookup. That global is the API's private
    state, so an API without it is asked the public way: a ``ProxyTracerProvider`` means none
    is set."""
    m = sys.modules.get("opentelemetry.trace")
    if m is None:
        return None
    p = getattr(m, "_TRACER_PROVIDER", _MISSING)
    if p is _MISSING:  # (an API version without that global: the public, slower way)
        get = getattr(m, "get_tracer_provider", None)
        if get is None:  # (the module is still being imported by another thread)
            return None
        p = get()
        return None if isinstance(p, m.ProxyTracerProvider) else p
    return p


def provider_set() -> bool:
    """True when OpenTelemetry is imported and a global tracer provider is set."""
    return _provider() is not None


def _quiet(o: _Otel) -> bool:
    """Nothing to record nor to carry: a no-op tracer, and no context of the caller's (no span,
    no baggage) to pass on."""
    return o.noop and not o.context.get_current()


class _Otel:
    """The OpenTelemetry pieces, imported once a provider is set, and the tracer of the current
    provider (set once per process by the API: cached by identity)."""

    def __init__(self) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self.trace = trace
        self.context = context
        self._propagate: Any = None
        self.PRODUCER = SpanKind.PRODUCER
        self.CONSUMER = SpanKind.CONSUMER
        self.Status = Status
        self.ERROR = StatusCode.ERROR
        self.provider: Any = None
        self.tracer: Any = None
        self.noop = False

    @property
    def propagate(self) -> Any:
        if self._propagate is None:
            from opentelemetry import propagate

            self._propagate = propagate
        return self._propagate

    def get(self) -> Any:
        p = _provider()
        if p is not self.provider:
            from . import __version__

            self.tracer = p.get_tracer("catzilla_tasks", __version__)
            self.noop = isinstance(self.tracer, self.trace.NoOpTracer)
            self.provider = p
        return self.tracer


_otel: _Otel | None = None


def _o() -> _Otel:
    global _otel
    if _otel is None:
        _otel = _Otel()
    return _otel


def _attrs(op: str, destination: str, task_id: str | None, name: str | None) -> dict[str, Any]:
    a: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": op,
        "messaging.operation.name": op,
        "messaging.destination.name": destination,
    }
    if task_id is not None:
        a["messaging.message.id"] = task_id
    if name is not None:
        a["catzilla_tasks.task.name"] = name
    return a


def _fail(o: _Otel, span: Any, exc: BaseException) -> None:
    if span.is_recording():
        span.record_exception(exc)
        span.set_status(o.Status(o.ERROR, f"{type(exc).__name__}: {exc}"))


def _name_of(func: Any) -> str:
    if isinstance(func, str):
        return func
    mod = getattr(func, "__module__", None)
    qual = getattr(func, "__qualname__", None) or getattr(func, "name", None) or type(func).__name__
    return f"{mod}.{qual}" if mod else str(qual)


def _task_id(handle: Any) -> str | None:
    tid = getattr(handle, "task_id", None)
    return tid if isinstance(tid, str) else None


# -- producer --------------------------------------------------------------------------------
def publish(submit: Callable[[], Any], func: Any, destination: Callable[[], str], headers_var: Any) -> Any:
    """Run ``submit()`` (a broker's publish of one task) in a PRODUCER span whose W3C context
    is injected into the message's headers: ``headers_var`` (protocol.OUTGOING_HEADERS) holds
    them while ``submit`` builds the message. ``destination()``: the queue's name."""
    o = _o()
    tracer = o.get()
    if _quiet(o):
        return submit()
    span, token, reset = _send_start(o, tracer, func, destination, headers_var)
    try:
        handle = submit()
    except BaseException as exc:
        _fail(o, span, exc)
        span.end()
        raise
    finally:
        headers_var.reset(reset)
        o.context.detach(token)
    _send_end(span, handle)
    return handle


async def publish_async(
    submit: Callable[[], Awaitable[Any]], func: Any, destination: Callable[[], str], headers_var: Any
) -> Any:
    """:func:`publish` for a coroutine publish (``add_task_async``): the span stays open, and
    the headers set, while ``submit()`` is awaited (in this task's context)."""
    o = _o()
    tracer = o.get()
    if _quiet(o):
        return await submit()
    span, token, reset = _send_start(o, tracer, func, destination, headers_var)
    try:
        handle = await submit()
    except BaseException as exc:
        _fail(o, span, exc)
        span.end()
        raise
    finally:
        headers_var.reset(reset)
        o.context.detach(token)
    _send_end(span, handle)
    return handle


def _send_start(o: _Otel, tracer: Any, func: Any, destination: Callable[[], str], headers_var: Any) -> Any:
    dest = destination()
    span = tracer.start_span(f"send {dest}", kind=o.PRODUCER, attributes=_attrs("send", dest, None, _name_of(func)))
    headers: dict[str, str] = {}
    ctx = o.trace.set_span_in_context(span)
    o.propagate.inject(headers, context=ctx)
    token = o.context.attach(ctx)
    reset = headers_var.set(headers or None)
    return span, token, reset


def _send_end(span: Any, handle: Any) -> None:
    tid = _task_id(handle)
    if tid is not None and span.is_recording():
        span.set_attribute("messaging.message.id", tid)
    span.end()


def submit_local(engine: Any, func: Any, args: tuple, kwargs: dict | None, cfg: Any, block: Any) -> Any:
    """The in-process engine's submission when tracing is on (called by the C ``add_task`` and
    ``_submit``): a PRODUCER span around it, and the task queued wrapped in :class:`Traced`
    (its CONSUMER span). A task run in a child process (``isolation="process"``) or as
    native code gets the producer span only (its run is not Python code of this process)."""
    o = _o()
    tracer = o.get()
    plain = engine._submit_plain
    if _quiet(o):
        return plain(func, args, kwargs, cfg, block)
    destination = engine.name
    name = _name_of(func)
    span = tracer.start_span(f"send {destination}", kind=o.PRODUCER, attributes=_attrs("send", destination, None, name))
    parent = o.trace.set_span_in_context(span)
    own = cfg if cfg is not None else getattr(func, "__catzilla_task__", None)
    runs_here = own is None or (getattr(own, "isolation", "thread") == "thread" and own._native is None)
    try:
        target = Traced(func, parent, destination, name) if runs_here else func
        handle = plain(target, args, kwargs, cfg, block)
    except BaseException as exc:
        _fail(o, span, exc)
        span.end()
        raise
    tid = _task_id(handle)
    if tid is not None:
        if span.is_recording():
            span.set_attribute("messaging.message.id", tid)
        if runs_here:
            target.task_id = tid
    span.end()
    return handle


# -- consumer --------------------------------------------------------------------------------
def consumer(func: Any, headers: Any, task_id: str, name: str, destination: str) -> Any:
    """What a worker runs for a message: ``func`` wrapped in its CONSUMER span, the child of
    the context extracted from ``headers`` (a message without them starts a new trace). With
    a no-op tracer and nothing extracted (no valid parent, no baggage: as :func:`_quiet` on the
    producer's side, which sends the caller's baggage without a span), ``func`` itself."""
    o = _o()
    o.get()
    if o.noop and not headers:
        return func
    parent = o.propagate.extract(headers) if isinstance(headers, dict) and headers else None
    if o.noop and not parent:  # (a Context is a dict: empty when the headers carried nothing valid)
        return func
    t = Traced(func, parent, destination, name)
    t.task_id = task_id
    return t


class Traced:
    """A task function run in a CONSUMER span (see the module docstring). Anything else is
    the function's own (its config, its name in the engine's records)."""

    __slots__ = ("func", "parent", "destination", "name", "task_id")

    def __init__(self, func: Any, parent: Any, destination: str, name: str) -> None:
        self.func = func
        self.parent = parent
        self.destination = destination
        self.name = name
        self.task_id: str | None = None

    def __getattr__(self, attr: str) -> Any:  # __qualname__, __catzilla_task__, ...
        return getattr(self.func, attr)

    # __module__ is found on the class, so __getattr__ never sees it: the function's, for what
    # names a task by module and qualname (a rate or concurrency limit's count, limits.py)
    @property
    def __module__(self) -> Any:  # type: ignore[override]
        return getattr(self.func, "__module__", None)

    def __repr__(self) -> str:
        return f"<traced {self.func!r}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        o = _o()
        span = o.get().start_span(
            f"process {self.destination}",
            context=self.parent,
            kind=o.CONSUMER,
            attributes=_attrs("process", self.destination, self.task_id, self.name),
        )
        # the task runs in the parent's context with its span set in it: on a worker that is the
        # message's extracted context, so what it carried besides the trace (baggage) is seen
        # in the task too (without headers, parent None: the worker's current context)
        token = o.context.attach(o.trace.set_span_in_context(span, self.parent))
        try:
            res = self.func(*args, **kwargs)
        except BaseException as exc:
            _fail(o, span, exc)
            span.end()
            raise
        finally:
            o.context.detach(token)
        if type(res) is types.CoroutineType:
            return _run_coroutine(o, span, res, self.parent)
        span.end()
        return res


async def _run_coroutine(o: _Otel, span: Any, coro: Any, parent: Any = None) -> Any:
    token = o.context.attach(o.trace.set_span_in_context(span, parent))
    try:
        return await coro
    except BaseException as exc:
        _fail(o, span, exc)
        raise
    finally:
        o.context.detach(token)
        span.end()
