"""OpenTelemetry tracing (catzilla_tasks.tracing) with the SDK's in-memory exporter, in-process
and through Redis (a worker on its own engine: the trace context crosses only in the message);
and the contextvars of the submitting code inside in-process tasks."""

from __future__ import annotations

import contextvars
import gc
import sys
import threading

import pytest
import redis_tasks as rt
from redis_helpers import prefix, redis, redis_url  # noqa: F401  (fixtures)

from catzilla_tasks import BackgroundTasks
from catzilla_tasks.brokers import RedisBroker, Worker
from catzilla_tasks.brokers.protocol import MSG_HEADERS, headers_of

trace = pytest.importorskip("opentelemetry.trace")
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402
from otel_helpers import no_provider, spans  # noqa: E402, F401  (fixtures)

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("test_tracing_var", default="unset")


def by_kind(exporter, kind):
    return [s for s in exporter.get_finished_spans() if s.kind is kind]


def wait_for_spans(exporter, kind, n, timeout=10.0):
    # the consumer span ends right after the task's call returns, on the worker thread
    ev = threading.Event()
    for _ in range(int(timeout / 0.01)):
        got = by_kind(exporter, kind)
        if len(got) >= n:
            return got
        ev.wait(0.01)
    raise AssertionError(f"{n} {kind} spans not finished in {timeout} s: {exporter.get_finished_spans()}")


# -- contextvars in-process -------------------------------------------------------------------
def test_in_process_tasks_see_the_submitters_contextvars(make_tasks, no_provider):
    tasks = make_tasks(workers=2)
    token = VAR.set("submitter")
    try:

        async def coro():
            return VAR.get()

        def setter():
            VAR.set("task")
            return VAR.get()

        assert tasks.add_task(VAR.get).wait(5) == "submitter"
        assert tasks.add_task(coro).wait(5) == "submitter"
        assert tasks.add_task(lambda a, b=0: (a, b, VAR.get()), 1, b=2).wait(5) == (1, 2, "submitter")
        assert tasks.options(priority="HIGH").add_task(VAR.get).wait(5) == "submitter"
        # what a task sets stays in its own copy: neither the submitter nor the next task sees it
        assert tasks.add_task(setter).wait(5) == "task"
        assert VAR.get() == "submitter"
        assert tasks.add_task(VAR.get).wait(5) == "submitter"
        # the value at add_task time, not at run time
        VAR.set("later")
        assert tasks.add_task(VAR.get).wait(5) == "later"
    finally:
        VAR.reset(token)


@pytest.mark.timeout(30)
def test_a_task_run_by_the_worker_that_waits_for_it_sees_its_own_snapshot(make_tasks, no_provider):
    # workers=1: the waiting task's worker runs the waited-for task itself (help while waiting)
    tasks = make_tasks(workers=1)

    def setter():
        VAR.set("inner-task")
        return VAR.get()

    def outer():
        VAR.set("at-submit")
        seen = tasks.add_task(VAR.get)
        changed = tasks.add_task(setter)
        VAR.set("after-submit")
        return seen.wait(5), changed.wait(5), VAR.get()

    assert tasks.add_task(outer).wait(10) == ("at-submit", "inner-task", "after-submit")


@pytest.mark.timeout(30)
def test_each_attempt_of_a_retried_task_starts_from_the_submitters_values(make_tasks, no_provider):
    tasks = make_tasks(workers=1)
    seen = []

    def flaky():
        seen.append(VAR.get())
        VAR.set("set-by-attempt")
        if len(seen) < 3:
            raise ValueError("again")
        return VAR.get()

    token = VAR.set("submitter")
    try:
        h = tasks.options(max_retries=2, retry_base_ms=1, retry_backoff="fixed").add_task(flaky)
        assert h.wait(10) == "set-by-attempt"
    finally:
        VAR.reset(token)
    assert seen == ["submitter"] * 3


def test_a_thread_that_never_used_contextvars_submits_and_the_task_sets_freely(make_tasks, no_provider):
    # a fresh thread has no context yet: its task runs in a context of its own all the same
    tasks = make_tasks(workers=1)
    out = []

    def setter():
        VAR.set("task")
        return VAR.get()

    def submit():
        out.append(tasks.add_task(setter).wait(5))
        out.append(VAR.get())

    th = threading.Thread(target=submit)
    th.start()
    th.join(10)
    assert out == ["task", "unset"]


@pytest.mark.timeout(30)
def test_what_a_task_sets_does_not_reach_the_next_task_of_its_worker(make_tasks, no_provider):
    # submitters with no context variables (a fresh thread each time: nothing to copy): the
    # tasks run one after another on the one worker thread, and none sees what another set
    tasks = make_tasks(workers=1, enable_auto_scaling=False)
    out = []

    def setter(i):
        seen = VAR.get()
        VAR.set(f"task {i}")
        return seen

    def submit(i):
        out.append(tasks.add_task(setter, i).wait(5))

    for i in range(4):
        th = threading.Thread(target=submit, args=(i,))
        th.start()
        th.join(10)
    assert out == ["unset"] * 4


@pytest.mark.timeout(60)
def test_tasks_with_and_without_a_context_mixed_on_four_workers_each_see_their_own(make_tasks, no_provider):
    tasks = make_tasks(workers=4, enable_auto_scaling=False)

    def setter(expected):
        seen = VAR.get()
        VAR.set(f"set by {expected}")  # never seen by another task
        return seen == expected

    def with_value(i):
        VAR.set(f"v{i}")
        return tasks.add_task(setter, f"v{i}")

    handles = []
    for i in range(2000):
        if i % 2:
            handles.append(contextvars.Context().run(with_value, i))
        else:  # an empty context: nothing kept, the task starts with no variables
            handles.append(contextvars.Context().run(tasks.add_task, setter, "unset"))
    assert all(h.wait(30) for h in handles)


def _contexts() -> int:
    # Context objects are tracked by the GC: a thread's own context is one once made
    return sum(1 for o in gc.get_objects() if type(o) is contextvars.Context)


@pytest.mark.timeout(30)
@pytest.mark.skipif(sys.version_info >= (3, 14), reason="3.14's Thread.run runs in a Context of its own")
def test_a_thread_without_a_context_submits_without_making_one(make_tasks, no_provider):
    # the fast path: a thread that never used contextvars has no context (PyThreadState.context
    # is NULL); add_task takes no snapshot, so it does not make one for the thread either (a
    # PyContext_CopyCurrent would: the thread's empty context, tracked by the GC)
    tasks = make_tasks(workers=1)
    out = []

    def submit():
        before = _contexts()
        handles = [tasks.add_task(lambda i=i: i * 2) for i in range(20)]
        out.append([h.wait(5) for h in handles])
        out.append(_contexts() - before)

    th = threading.Thread(target=submit)
    th.start()
    th.join(20)
    assert out == [[i * 2 for i in range(20)], 0]


@pytest.mark.timeout(30)
def test_a_thread_that_set_a_variable_propagates_it_and_one_that_only_read_does_not_need_to(make_tasks, no_provider):
    tasks = make_tasks(workers=1)
    out: dict[str, object] = {}

    def setter_thread():
        VAR.set("from-thread")
        out["set"] = tasks.add_task(VAR.get).wait(5)

    def reader_thread():
        # a context exists now (empty): the snapshot is not kept, the task sees the default
        out["read"] = (VAR.get(), tasks.add_task(VAR.get).wait(5))

    for fn in (setter_thread, reader_thread):
        th = threading.Thread(target=fn)
        th.start()
        th.join(20)
    assert out == {"set": "from-thread", "read": ("unset", "unset")}


# -- is a provider set? ------------------------------------------------------------------------
def test_without_the_apis_private_global_the_public_getter_decides(make_tasks, spans, monkeypatch):
    # the C gate reads opentelemetry.trace._TRACER_PROVIDER as a fast "no"; an API without it
    # is asked through the public get_tracer_provider() (a ProxyTracerProvider until one is set)
    provider = trace.get_tracer_provider()
    tasks = make_tasks(workers=1, name="eng-fallback")
    monkeypatch.delattr(trace, "_TRACER_PROVIDER")
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: trace.ProxyTracerProvider())
    assert tasks.add_task(lambda: 1).wait(5) == 1
    assert spans.get_finished_spans() == ()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    assert tasks.add_task(lambda: 2).wait(5) == 2
    assert [s.name for s in wait_for_spans(spans, SpanKind.CONSUMER, 1)] == ["process eng-fallback"]
    assert [s.name for s in by_kind(spans, SpanKind.PRODUCER)] == ["send eng-fallback"]


def test_the_gate_sees_opentelemetry_leave_and_come_back(make_tasks, spans, monkeypatch):
    # the gate caches opentelemetry.trace's globals while sys.modules keeps its size
    import sys

    tasks = make_tasks(workers=1, name="eng-modules")
    otel = sys.modules["opentelemetry.trace"]
    monkeypatch.delitem(sys.modules, "opentelemetry.trace")
    assert tasks.add_task(lambda: 1).wait(5) == 1
    assert spans.get_finished_spans() == ()
    sys.modules["opentelemetry.trace"] = otel
    assert tasks.add_task(lambda: 2).wait(5) == 2
    assert len(wait_for_spans(spans, SpanKind.CONSUMER, 1)) == 1


# -- the option --------------------------------------------------------------------------------
def test_tracing_option_is_a_bool(make_tasks):
    assert make_tasks(workers=1).tracing is True
    assert make_tasks(workers=1, tracing=False).tracing is False
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="tracing"):
            BackgroundTasks(workers=1, tracing=bad)


# -- in-process ---------------------------------------------------------------------------------
def _fails():
    raise ValueError("boom")


def test_in_process_one_trace_producer_then_consumer(make_tasks, spans):
    tasks = make_tasks(workers=2, name="eng-a")
    tracer = trace.get_tracer("test")

    async def coro():
        return trace.get_current_span().get_span_context().span_id

    with tracer.start_as_current_span("request") as root:
        h = tasks.add_task(lambda: trace.get_current_span().get_span_context().span_id)
        inner_id = h.wait(5)
        assert tasks.add_task(coro).wait(5)
    producers = wait_for_spans(spans, SpanKind.PRODUCER, 2)
    consumers = wait_for_spans(spans, SpanKind.CONSUMER, 2)
    tid = root.get_span_context().trace_id
    for p in producers:
        assert p.name == "send eng-a"
        assert p.context.trace_id == tid and p.parent.span_id == root.get_span_context().span_id
        assert p.attributes["messaging.system"] == "catzilla_tasks"
        assert p.attributes["messaging.operation.type"] == "send"
        assert p.attributes["messaging.destination.name"] == "eng-a"
    by_parent = {c.parent.span_id: c for c in consumers}
    for p in producers:
        c = by_parent[p.context.span_id]  # the consumer span is the producer span's child
        assert c.name == "process eng-a" and c.context.trace_id == tid
        assert c.attributes["messaging.operation.type"] == "process"
        assert c.attributes["messaging.message.id"] == p.attributes["messaging.message.id"]
    assert h.task_id in {p.attributes["messaging.message.id"] for p in producers}
    # the task itself runs inside its consumer span
    assert inner_id in {c.context.span_id for c in consumers}


@pytest.mark.timeout(30)
def test_in_process_routed_tasks_are_traced_once(make_tasks, spans):
    # a config with a limit or a named queue is routed (limits.py): its submission is the
    # traced one, not traced again by the route (one PRODUCER and one CONSUMER span each)
    tasks = make_tasks(workers=1, name="eng-r", queues={"emails": 1})

    def limited():
        return VAR.get()

    token = VAR.set("routed")
    try:
        hs = [
            tasks.options(rate_limit="1000/s").add_task(limited),
            tasks.options(concurrency_limit=1).add_task(limited),
            tasks.options(queue="emails").add_task(limited),
        ]
        assert [h.wait(5) for h in hs] == ["routed"] * 3
    finally:
        VAR.reset(token)
    assert len(wait_for_spans(spans, SpanKind.CONSUMER, 3)) == 3
    assert len(by_kind(spans, SpanKind.PRODUCER)) == 3
    # a limit counts a traced call under its function's own name
    from catzilla_tasks import limits, tracing

    assert limits.task_name_of(tracing.Traced(limited, None, "d", "n")) == limits.task_name_of(limited)


def test_in_process_error_span(make_tasks, spans):
    tasks = make_tasks(workers=1)
    h = tasks.add_task(_fails)
    with pytest.raises(ValueError):
        h.wait(5)
    (c,) = wait_for_spans(spans, SpanKind.CONSUMER, 1)
    assert c.status.status_code is StatusCode.ERROR
    assert "ValueError" in c.status.description
    assert any(e.name == "exception" for e in c.events)


def test_tracing_off_by_flag_makes_no_spans(make_tasks, spans):
    tasks = make_tasks(workers=1, tracing=False)
    assert tasks.add_task(VAR.get).wait(5) == "unset"
    assert tasks.options(priority="HIGH").add_task(VAR.get).wait(5) == "unset"
    assert spans.get_finished_spans() == ()


def test_no_provider_no_spans(make_tasks, no_provider):
    tasks = make_tasks(workers=1)
    assert tasks.add_task(lambda: trace.get_current_span().get_span_context().is_valid).wait(5) is False


# -- Redis: one trace from the producer into a worker ------------------------------------------
class _Redis:
    def __init__(self, url: str, prefix: str, tracing: bool = True) -> None:
        self.producer = BackgroundTasks(workers=2, broker=RedisBroker(url, prefix=prefix), tracing=tracing)
        self.worker_engine = BackgroundTasks(workers=2, broker=RedisBroker(url, prefix=prefix), tracing=tracing)
        for eng in (self.producer, self.worker_engine):
            rt.register(eng)
        self.r = self.producer.broker.redis
        self.worker: Worker | None = None
        self.thread: threading.Thread | None = None

    def start_worker(self) -> None:
        self.worker = Worker(self.worker_engine, concurrency=8)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()
        assert self.worker.ready.wait(10)

    def messages(self) -> list:
        ser = self.producer.broker.serializer
        out = []
        for s in self.producer.broker.streams:
            for _eid, fields in self.r.xrange(s):
                out.append(ser.loads(fields[b"m"]))
        return out

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.thread.join(30)
        for eng in (self.producer, self.worker_engine):
            eng.shutdown(wait_for_completion=False, timeout=10)
            eng.broker.close()


@pytest.fixture
def redis_pair(redis_url, prefix, monkeypatch):  # noqa: F811
    monkeypatch.setenv("CT_TEST_REDIS_URL", redis_url)
    made = []

    def make(**kw):
        p = _Redis(redis_url, prefix, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.mark.timeout(60)
def test_redis_one_trace_from_producer_into_worker(redis_pair, spans):
    pair = redis_pair()
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("request") as root:
        h = pair.producer.add_task(rt.add, 2, 3)
        h2 = pair.producer.options(priority="HIGH").add_task(rt.add, 1, 1)
    # the trace context travels in the message: W3C traceparent in its headers
    msgs = {m[0]: m for m in pair.messages()}
    headers = headers_of(msgs[h.task_id])
    assert headers is not None and headers["traceparent"].split("-")[1] == f"{root.get_span_context().trace_id:032x}"
    pair.start_worker()
    assert h.wait(10) == 5 and h2.wait(10) == 2
    producers = {p.attributes["messaging.message.id"]: p for p in wait_for_spans(spans, SpanKind.PRODUCER, 2)}
    consumers = {c.attributes["messaging.message.id"]: c for c in wait_for_spans(spans, SpanKind.CONSUMER, 2)}
    for handle in (h, h2):
        p, c = producers[handle.task_id], consumers[handle.task_id]
        assert p.context.trace_id == c.context.trace_id == root.get_span_context().trace_id
        assert c.parent.span_id == p.context.span_id  # continued from the message, not from memory
        assert p.attributes["messaging.destination.name"] == c.attributes["messaging.destination.name"]
        assert p.name == c.name.replace("process", "send")
        assert c.attributes["catzilla_tasks.task.name"] == "redis_tasks.add"
    assert producers[h2.task_id].attributes["messaging.destination.name"] == pair.producer.broker.streams[1]


@pytest.mark.timeout(60)
def test_redis_error_spans_one_per_attempt(redis_pair, spans):
    pair = redis_pair()
    pair.start_worker()
    h = pair.producer.add_task(rt.always_fails, 1)  # max_retries=2: three attempts
    with pytest.raises(ValueError, match="bad value"):
        h.wait(20)
    consumers = wait_for_spans(spans, SpanKind.CONSUMER, 3)
    (p,) = by_kind(spans, SpanKind.PRODUCER)
    assert all(c.parent.span_id == p.context.span_id for c in consumers)
    assert all(c.status.status_code is StatusCode.ERROR for c in consumers)
    # a publish that fails is an error span of the producer
    with pytest.raises(TypeError):
        pair.producer.add_task(lambda: None)
    failed = [s for s in by_kind(spans, SpanKind.PRODUCER) if s.status.status_code is StatusCode.ERROR]
    assert len(failed) == 1


@pytest.mark.timeout(60)
def test_redis_no_provider_no_headers(redis_pair, no_provider):
    pair = redis_pair()
    h = pair.producer.add_task(rt.add, 1, 2)
    (m,) = pair.messages()
    assert len(m) == 4 and headers_of(m) is None
    pair.start_worker()
    assert h.wait(10) == 3


@pytest.mark.timeout(60)
def test_redis_tracing_off_by_flag(redis_pair, spans):
    pair = redis_pair(tracing=False)
    h = pair.producer.add_task(rt.add, 1, 2)
    (m,) = pair.messages()
    assert len(m) <= MSG_HEADERS
    pair.start_worker()
    assert h.wait(10) == 3
    assert spans.get_finished_spans() == ()


@pytest.mark.timeout(60)
def test_redis_messages_with_and_without_headers_interoperate(redis_pair, spans):
    """An older producer's message (no headers) runs under a new worker as a new trace; a
    newer producer's message (headers) parses as before for a reader that ignores them."""
    pair = redis_pair()
    ser = pair.producer.broker.serializer
    pair.r.xadd(pair.producer.broker.streams[2], {"m": ser.dumps(["old-1", "redis_tasks.add", [4, 5], {}])})
    pair.r.xadd(
        pair.producer.broker.streams[2],
        {"m": ser.dumps(["old-2", "redis_tasks.add", [1, 1], {}, 0, {}, {"traceparent": "garbage"}])},
    )
    pair.start_worker()
    assert pair.producer.result("old-1").wait(10) == 9
    assert pair.producer.result("old-2").wait(10) == 2
    consumers = wait_for_spans(spans, SpanKind.CONSUMER, 2)
    assert all(c.parent is None for c in consumers)  # no (valid) context given: a new trace each


@pytest.mark.timeout(60)
def test_redis_noop_provider_carries_nothing(redis_pair, no_provider):
    trace.set_tracer_provider(trace.NoOpTracerProvider())
    pair = redis_pair()
    h = pair.producer.add_task(rt.add, 1, 2)
    (m,) = pair.messages()
    assert headers_of(m) is None
    pair.start_worker()
    assert h.wait(10) == 3


@pytest.mark.timeout(60)
def test_redis_add_task_async_keyed_and_routed_sends_are_traced(redis_pair, spans):
    # every way the producer publishes gets its PRODUCER span and carries its context:
    # add_task_async (group-committed on the loop's client), keyed (deduplicated at submit,
    # sync and async) and routed to a named queue (its own streams)
    import asyncio

    pair = redis_pair()
    broker = pair.producer.broker
    tracer = trace.get_tracer("test")

    async def publish():
        with tracer.start_as_current_span("request") as root:
            a = await pair.producer.add_task_async(rt.add, 1, 2)
            b = await pair.producer.options(idempotency_key="k-async").add_task_async(rt.add, 2, 2)
            c = await pair.producer.options(priority="HIGH").add_task_async(rt.add, 3, 3)
        return root, [a, b, c]

    root, handles = asyncio.run(publish())
    with tracer.start_as_current_span("request-2") as root2:
        handles.append(pair.producer.options(idempotency_key="k-sync").add_task(rt.add, 4, 4))
        routed = pair.producer.options(queue="emails").add_task(rt.add, 5, 5)
    emails = broker.queue_keys("emails")[0]
    routed_msgs = [ser_m for _e, f in pair.r.xrange(emails[2]) for ser_m in [broker.serializer.loads(f[b"m"])]]
    assert [m[0] for m in routed_msgs] == [routed.task_id]
    assert headers_of(routed_msgs[0])["traceparent"].split("-")[1] == f"{root2.get_span_context().trace_id:032x}"
    msgs = {m[0]: m for m in pair.messages()}
    for h, r in zip(handles, (root, root, root, root2), strict=True):
        assert headers_of(msgs[h.task_id])["traceparent"].split("-")[1] == f"{r.get_span_context().trace_id:032x}"
    producers = {p.attributes["messaging.message.id"]: p for p in by_kind(spans, SpanKind.PRODUCER)}
    assert set(producers) == {h.task_id for h in handles} | {routed.task_id}
    assert producers[routed.task_id].attributes["messaging.destination.name"] == emails[2]
    assert producers[handles[2].task_id].attributes["messaging.destination.name"] == broker.streams[1]
    pair.start_worker()
    assert [h.wait(10) for h in handles] == [3, 4, 6, 8]
    consumers = {c.attributes["messaging.message.id"]: c for c in wait_for_spans(spans, SpanKind.CONSUMER, 4)}
    for h in handles:
        assert consumers[h.task_id].parent.span_id == producers[h.task_id].context.span_id


@pytest.mark.timeout(60)
def test_memory_broker_one_trace_through_the_worker(spans):
    # the consumer span is the worker's (broker-agnostic): a MemoryBroker's Consumer continues
    # the producer's trace from the message's headers as a Redis worker does
    import asyncio

    from catzilla_tasks.brokers import Consumer, MemoryBroker

    b = MemoryBroker()
    producer = BackgroundTasks(workers=1, broker=b)
    runner = BackgroundTasks(workers=1, broker=b)
    for eng in (producer, runner):
        rt.register(eng)
    c = Consumer(runner, b, concurrency=2).start()
    try:
        tracer = trace.get_tracer("test")
        with tracer.start_as_current_span("request") as root:
            h = producer.add_task(rt.add, 2, 3)
            h2 = asyncio.run(producer.options(priority="HIGH").add_task_async(rt.add, 1, 1))
        assert h.wait(10) == 5 and h2.wait(10) == 2
        producers = {p.attributes["messaging.message.id"]: p for p in wait_for_spans(spans, SpanKind.PRODUCER, 2)}
        consumers = {s.attributes["messaging.message.id"]: s for s in wait_for_spans(spans, SpanKind.CONSUMER, 2)}
        for handle, dest in ((h, "default:q2"), (h2, "default:q1")):
            p, s = producers[handle.task_id], consumers[handle.task_id]
            assert p.context.trace_id == s.context.trace_id == root.get_span_context().trace_id
            assert s.parent.span_id == p.context.span_id
            assert p.attributes["messaging.destination.name"] == s.attributes["messaging.destination.name"] == dest
    finally:
        c.stop(10)
        for eng in (producer, runner):
            eng.shutdown(wait_for_completion=False, timeout=10)
