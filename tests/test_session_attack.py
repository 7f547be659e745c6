"""Attacks on the session's changes: ClusterView.inspect on a queue without a consumer group,
the consumer span run in the message's context (baggage), the dashboards' hash-based CSP and
the Redis worker's second release of idempotency claims at acknowledgement."""

from __future__ import annotations

import contextvars
import threading

import pytest
import redis_tasks as rt
from redis_helpers import prefix, redis, redis_url  # noqa: F401  (fixtures)

from catzilla_tasks import BackgroundTasks
from catzilla_tasks.brokers import RedisBroker, Worker

trace = pytest.importorskip("opentelemetry.trace")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry import baggage, context  # noqa: E402
from otel_helpers import no_provider, spans  # noqa: E402, F401  (fixtures)

LEAK: contextvars.ContextVar[str] = contextvars.ContextVar("test_session_attack_leak", default="unset")


# -- tasks (registered by name on the engines below) -------------------------------------------
def seen_and_leak(key: str) -> list:
    """What the task sees (baggage ``key``, a ``leak`` baggage entry and contextvar left by an
    earlier task), then leaves both set behind (an attach it never detaches, a set it never
    resets): a later task on the same thread must not see them."""
    seen = [baggage.get_baggage(key), baggage.get_baggage("leak"), LEAK.get()]
    context.attach(baggage.set_baggage("leak", f"from-{key}-{seen[0]}"))
    LEAK.set(f"from-{seen[0]}")
    return [None if v is None else str(v) for v in seen]


async def seen_async(key: str) -> str | None:
    v = baggage.get_baggage(key)
    return None if v is None else str(v)


def seen(key: str) -> str | None:
    v = baggage.get_baggage(key)
    return None if v is None else str(v)


FUNCS = (seen_and_leak, seen_async, seen)


def _register(engine: BackgroundTasks) -> None:
    rt.register(engine)
    for f in FUNCS:
        engine._registered[f"{f.__module__}.{f.__qualname__}"] = f


class _Redis:
    def __init__(self, url: str, prefix: str, tracing: bool = True, workers: int = 2, **kw) -> None:  # noqa: F811
        self.producer = BackgroundTasks(workers=2, broker=RedisBroker(url, prefix=prefix, **kw), tracing=tracing)
        self.worker_engine = BackgroundTasks(
            workers=workers, broker=RedisBroker(url, prefix=prefix, **kw), tracing=tracing
        )
        for eng in (self.producer, self.worker_engine):
            _register(eng)
        self.r = self.producer.broker.redis
        self.worker: Worker | None = None
        self.thread: threading.Thread | None = None

    def start_worker(self, concurrency: int = 8) -> Worker:
        self.worker = Worker(self.worker_engine, concurrency=concurrency)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()
        assert self.worker.ready.wait(20)
        return self.worker

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


def _with_baggage(pairs: dict[str, str], fn):
    ctx = context.get_current()
    for k, v in pairs.items():
        ctx = baggage.set_baggage(k, v, ctx)
    token = context.attach(ctx)
    try:
        return fn()
    finally:
        context.detach(token)


# == 2. OpenTelemetry: the consumer span in the message's context ==============================
@pytest.mark.timeout(120)
def test_redis_worker_tasks_on_one_thread_see_only_their_own_baggage(redis_pair, spans):
    """Concurrency 1, one engine thread: each task sees its own message's baggage and nothing
    an earlier task on that thread attached (and never detached) or set."""
    pair = redis_pair(workers=1)
    handles = []
    tracer = trace.get_tracer("attack")
    for i in range(24):
        if i % 3 == 2:  # no baggage at all (a span only)
            with tracer.start_as_current_span("req"):
                handles.append((i, None, pair.producer.add_task(seen_and_leak, "k")))
        else:
            handles.append(
                (i, f"v{i}", _with_baggage({"k": f"v{i}"}, lambda: pair.producer.add_task(seen_and_leak, "k")))
            )
    pair.start_worker(concurrency=1)
    for i, want, h in handles:
        got = h.wait(30)
        # (LEAK, a plain contextvar, is not checked here: a worker's tasks run in its thread's
        # own context, the engine's documented fast path, so what one sets the next one sees)
        assert got[:2] == [want, None], (i, got)


@pytest.mark.timeout(120)
def test_redis_garbage_baggage_with_a_valid_traceparent_runs_in_the_trace(redis_pair, spans):
    pair = redis_pair()
    ser = pair.producer.broker.serializer
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    stream = pair.producer.broker.streams[2]
    name = f"{seen.__module__}.{seen.__qualname__}"
    bad = {"traceparent": tp, "baggage": "%%%,=,k==,;;" + "x" * 9000}
    pair.r.xadd(stream, {"m": ser.dumps(["g-1", name, ["k"], {}, 0, {}, bad])})
    pair.r.xadd(stream, {"m": ser.dumps(["g-2", name, ["k"], {}, 0, {}, {"traceparent": tp, "baggage": "k=ok"}])})
    pair.r.xadd(stream, {"m": ser.dumps(["g-3", name, ["k"], {}, 0, {}, {"baggage": "k=alone"}])})
    pair.r.xadd(stream, {"m": ser.dumps(["g-4", name, ["k"], {}, 0, {}, {"baggage": 5, "traceparent": None}])})
    pair.start_worker()
    assert pair.producer.result("g-1").wait(20) is None
    assert pair.producer.result("g-2").wait(20) == "ok"
    assert pair.producer.result("g-3").wait(20) == "alone"
    assert pair.producer.result("g-4").wait(20) is None


@pytest.mark.timeout(120)
def test_redis_async_task_sees_the_messages_baggage_and_retries_keep_it(redis_pair, spans):
    pair = redis_pair()
    pair.start_worker()
    h = _with_baggage({"k": "async"}, lambda: pair.producer.add_task(seen_async, "k"))
    assert h.wait(30) == "async"
    assert pair.producer.add_task(seen_async, "k").wait(30) is None


@pytest.mark.timeout(120)
def test_redis_noop_provider_still_carries_baggage_it_sent(redis_pair, no_provider):
    """With a no-op tracer provider the producer sends the baggage of the caller's context
    (tracing.publish: not quiet when the context holds any); the worker must hand it to the
    task, not drop it because the message has no valid span."""
    trace.set_tracer_provider(trace.NoOpTracerProvider())
    pair = redis_pair()
    h = _with_baggage({"k": "noop"}, lambda: pair.producer.add_task(seen, "k"))
    pair.start_worker()
    assert h.wait(30) == "noop"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["sdk", "noop", "none", "off"])
def test_in_process_tasks_see_baggage_set_in_process(mode, no_provider):
    if mode == "sdk":
        trace.set_tracer_provider(sdk_trace.TracerProvider())
    elif mode == "noop":
        trace.set_tracer_provider(trace.NoOpTracerProvider())
    tasks = BackgroundTasks(workers=1, tracing=mode != "off")
    try:
        hs = [_with_baggage({"k": f"v{i}"}, lambda: tasks.add_task(seen_and_leak, "k")) for i in range(10)]
        hs.append(tasks.add_task(seen_and_leak, "k"))
        hs.append(tasks.add_task(seen_async, "k"))
        hs.append(_with_baggage({"k": "a"}, lambda: tasks.add_task(seen_async, "k")))
        got = [h.wait(20) for h in hs]
        assert got[:10] == [[f"v{i}", None, "unset"] for i in range(10)], got
        assert got[10:] == [[None, None, "unset"], None, "a"], got
    finally:
        tasks.shutdown(wait_for_completion=True, timeout=10)


# == 1. ClusterView on queues no worker has read (streams without the consumer group) ==========
@pytest.mark.timeout(120)
def test_cluster_view_on_queues_without_a_group(redis_url, prefix):  # noqa: F811
    import json

    from catzilla_tasks.brokers.cluster import ClusterView
    from catzilla_tasks.dashboard.cluster import ClusterDashboard

    tasks = BackgroundTasks(workers=1, broker=RedisBroker(redis_url, prefix=prefix))
    _register(tasks)
    try:
        h = tasks.add_task(rt.add, 1, 2)
        h2 = tasks.options(queue="other", priority="HIGH").add_task(rt.add, 2, 2)
        h3 = tasks.options(queue="other").add_task(rt.add, 3, 3)
        with ClusterView(redis_url, prefix=prefix) as view:
            assert view.workers() == []
            got = view.inspect(h.task_id)
            assert got["status"] == "queued" and got["queue"] == "default" and "worker" not in got, got
            got2 = view.inspect(h2.task_id)
            assert (got2["status"], got2["queue"], got2["priority"]) == ("queued", "other", "high"), got2
            rows = {(r["queue"], r["priority"]): r for r in view.queues()}
            assert rows[("default", "normal")]["queued"] == 1 and rows[("other", "high")]["queued"] == 1, rows
            assert all(r["in_flight"] == 0 and r["dead_letters"] == 0 for r in rows.values()), rows
            assert view.dead_letters("other") == [] and view.redrive("other") == 0
            assert view.inspect("no-such-task")["status"] == "unknown"
            # the dashboard's lookup, overview and cancel on the same queues
            dash = ClusterDashboard(redis_url, token="t" * 20, prefix=prefix)
            try:
                auth = {"authorization": "Bearer " + "t" * 20}
                st, _, body, _ = dash.handle("GET", "/api/task.json", f"id={h3.task_id}", auth, b"")
                assert st == 200 and json.loads(body)["status"] == "queued", body
                st, _, body, _ = dash.handle("GET", "/api/cluster.json", "", auth, b"")
                assert st == 200, body
                assert view.cancel(h3.task_id) is True  # found in "other" by inspect
            finally:
                dash.close()
            assert view.inspect(h3.task_id)["status"] == "cancelled"
    finally:
        tasks.shutdown(wait_for_completion=False, timeout=10)
        tasks.broker.close()


@pytest.mark.timeout(60)
def test_inspect_raises_other_errors_than_nogroup(redis_url, prefix, monkeypatch):  # noqa: F811
    from catzilla_tasks.brokers.cluster import ClusterView

    tasks = BackgroundTasks(workers=1, broker=RedisBroker(redis_url, prefix=prefix))
    try:
        h = tasks.add_task(rt.add, 1, 2)
        with ClusterView(redis_url, prefix=prefix) as view:

            def fail(*a, **k):
                raise redis.ResponseError("WRONGTYPE something went wrong")

            monkeypatch.setattr(view.r, "xpending_range", fail)
            with pytest.raises(redis.ResponseError, match="something went wrong"):
                view.inspect(h.task_id)
    finally:
        tasks.shutdown(wait_for_completion=False, timeout=10)
        tasks.broker.close()


@pytest.mark.timeout(60)
def test_a_key_of_another_type_under_a_queues_names_is_no_queue_for_inspect(redis_url, prefix):  # noqa: F811
    # as queues() (it counts such a key as empty): inspect passes over it, the task on the
    # other queue is found and an unknown id is unknown, not a WRONGTYPE error (dashboard 503)
    from catzilla_tasks.brokers.cluster import ClusterView

    tasks = BackgroundTasks(workers=1, broker=RedisBroker(redis_url, prefix=prefix))
    try:
        h = tasks.options(queue="zz").add_task(rt.add, 1, 2)
        r = tasks.broker.redis
        r.xadd(f"{prefix}:aa:q0", {"x": "1"})  # a queue 'aa' (read before 'zz') with one stream
        r.set(f"{prefix}:aa:q2", "not a stream")  # and keys of other types under its names
        r.set(f"{prefix}:aa:dead", "not a stream")
        r.set(f"{prefix}:aa:delayed", "not a sorted set")
        with ClusterView(redis_url, prefix=prefix) as view:
            assert "aa" in view.queue_names()
            got = view.inspect(h.task_id)
            assert (got["status"], got["queue"]) == ("queued", "zz"), got
            assert view.inspect("no-such-task")["status"] == "unknown"
            rows = {(x["queue"], x["priority"]): x for x in view.queues()}
            assert rows[("aa", "normal")]["queued"] == 0 and rows[("aa", "normal")]["dead_letters"] == 0, rows
    finally:
        tasks.shutdown(wait_for_completion=False, timeout=10)
        tasks.broker.close()


# == 3. the dashboards' CSP: the served scripts are the ones the header allows ===================
def _hashes_of_served(body: bytes) -> set[str]:
    import base64
    import hashlib
    import re

    # as a browser: every <script ...> element's text, from the bytes served
    out = set()
    for attrs, text in re.findall(rb"<script\b([^>]*)>(.*?)</script\s*>", body, flags=re.S | re.I):
        assert not attrs.strip(), attrs  # (an attribute, e.g. src or type=module, is another case)
        out.add("'sha256-" + base64.b64encode(hashlib.sha256(text).digest()).decode() + "'")
    return out


def _script_src(csp: str) -> set[str]:
    return set(csp.split("script-src", 1)[1].split(";", 1)[0].split())


def test_every_served_page_variant_runs_its_script_under_its_csp(redis_url, prefix):  # noqa: F811
    import urllib.request

    from catzilla_tasks import dashboard, integrations
    from catzilla_tasks.dashboard.cluster import ClusterDashboard

    variants = []
    st, _, body, headers = integrations.dashboard_response()
    variants.append(("integrations", body, headers["Content-Security-Policy"]))
    tasks = BackgroundTasks(workers=1)
    server, _ = dashboard.serve(tasks, host="127.0.0.1", port=0)
    try:
        with urllib.request.urlopen(server.url, timeout=20) as resp:  # noqa: S310 - 127.0.0.1
            variants.append(("engine server", resp.read(), resp.headers["Content-Security-Policy"]))
    finally:
        server.stop()
        tasks.shutdown(wait_for_completion=False, timeout=10)
    dash = ClusterDashboard(redis_url, token="t" * 20, prefix=prefix)
    try:
        for method in ("GET", "HEAD"):
            st, _, body, headers = dash.handle(method, "/", "", {"authorization": "Bearer " + "t" * 20}, b"")
            assert st == 200
            variants.append((f"cluster {method}", body, headers["Content-Security-Policy"]))
    finally:
        dash.close()
    for what, body, csp in variants:
        served = _hashes_of_served(body)
        assert served and served == _script_src(csp), (what, served, csp)
        assert b"__CATZILLA_CSRF__" not in body, what


# == 4. the idempotency claims: a renewal between the commit and the acknowledgement ============
def _boom(x):
    raise ValueError(f"boom {x}")


def _ok(x):
    return x * 10


FUNCS = (*FUNCS, _boom, _ok)


@pytest.fixture
def racing_ack(monkeypatch):
    """RedisConsumer.ack, with what the heartbeat does first when it read its list of claims
    before the commit: a renewal of those copies' claims (idem_renew.lua). Records, per claim,
    the holder after that renewal and after the acknowledgement; ``between(r, claim)`` runs
    after the renewal too (another copy taking the key, say)."""
    from catzilla_tasks.brokers.redis_consumer import RedisConsumer

    real = RedisConsumer.ack
    seen: list[tuple[str, bytes | None, bytes | None]] = []
    hooks: dict[str, object] = {"acked": threading.Event()}

    def ack(self, pending):
        later, claims = pending
        prio = {eid: p for p, ids in enumerate(later) for eid in ids}
        for claim_key, token in claims:
            eid = token.rsplit(" ", 1)[1].encode()
            self.heartbeat([(eid, prio[eid])], [(eid, (claim_key, token))])
        renewed = {k: self._r.get(k) for k, _ in claims}
        if "between" in hooks:
            for claim in claims:
                hooks["between"](self._r, claim)
        real(self, pending)
        for k, _ in claims:
            seen.append((k, renewed[k], self._r.get(k)))
        hooks["acked"].set()  # (a result is readable once committed, before this ack)

    monkeypatch.setattr(RedisConsumer, "ack", ack)
    return seen, hooks


@pytest.mark.timeout(120)
@pytest.mark.parametrize("func", ["ok", "fails"])
def test_a_claim_renewed_between_commit_and_ack_is_released_by_the_ack(redis_pair, no_provider, racing_ack, func):
    seen, hooks = racing_ack
    pair = redis_pair(visibility_timeout=60)
    pair.start_worker()
    f = _ok if func == "ok" else _boom
    h = pair.producer.options(idempotency_key=f"k-{func}", max_retries=0).add_task(f, 1)
    if func == "ok":
        assert h.wait(30) == 10
    else:
        with pytest.raises(ValueError, match="boom 1"):
            h.wait(30)
    assert hooks["acked"].wait(30)
    assert len(seen) == 1, seen
    key, renewed, after = seen[0]
    assert renewed is not None  # the race is real: the renewal took the ended copy's claim back
    assert after is None and pair.r.get(key) is None  # and the acknowledgement let go of it again
    if func == "ok":  # the key's next copy is skipped: the first one's result
        assert pair.producer.options(idempotency_key="k-ok", max_retries=0).add_task(_ok, 2).wait(30) == 10


@pytest.mark.timeout(120)
def test_the_ack_leaves_the_claim_another_copy_took_meanwhile(redis_pair, no_provider, racing_ack):
    seen, hooks = racing_ack
    hooks["between"] = lambda r, claim: r.set(claim[0], "someone-else 1-1", px=60_000)
    pair = redis_pair(visibility_timeout=60)
    pair.start_worker()
    with pytest.raises(ValueError, match="boom 1"):
        pair.producer.options(idempotency_key="k-other", max_retries=0).add_task(_boom, 1).wait(30)
    assert hooks["acked"].wait(30)
    assert len(seen) == 1 and seen[0][2] == b"someone-else 1-1", seen


@pytest.mark.timeout(120)
def test_an_ack_that_fails_once_is_retried_and_releases_the_claim(redis_pair, no_provider, racing_ack, monkeypatch):
    from catzilla_tasks.brokers.redis_consumer import RedisConsumer

    seen, hooks = racing_ack
    patched = RedisConsumer.ack
    failed = threading.Event()

    def flaky(self, pending):
        if not failed.is_set():
            failed.set()
            raise redis.ConnectionError("the connection dropped between commit and ack")
        patched(self, pending)

    monkeypatch.setattr(RedisConsumer, "ack", flaky)
    pair = redis_pair(visibility_timeout=60)
    pair.start_worker()
    with pytest.raises(ValueError, match="boom 1"):
        pair.producer.options(idempotency_key="k-flaky", max_retries=0).add_task(_boom, 1).wait(30)
    assert hooks["acked"].wait(30) and failed.is_set()
    assert seen and seen[0][2] is None, seen
    for s in pair.producer.broker.streams:  # nothing left pending nor queued
        assert pair.r.xlen(s) == 0


@pytest.mark.browser
@pytest.mark.timeout(120)
def test_browser_runs_the_fastapi_mounted_page_under_its_csp_and_blocks_an_injected_script(monkeypatch):
    """The engine page mounted in a FastAPI app (integrations.starlette.install), each request
    answered by the app (TestClient) for headless Chromium: the page's script runs and renders
    the engine's figures with no CSP violation; the same page with a script added runs only
    its own (the header is enforced: a control that the check can fail)."""
    import os

    sync_api = pytest.importorskip("playwright.sync_api")
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from catzilla_tasks.integrations.starlette import install

    chromium = os.environ.get("CATZILLA_TASKS_CHROMIUM", "/usr/bin/chromium")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    tasks = BackgroundTasks(workers=1)
    app = fastapi.FastAPI()
    install(app, tasks)
    for i in range(5):
        tasks.add_task(_ok, i).wait(10)
    inject = threading.Event()
    try:
        with TestClient(app) as client, sync_api.sync_playwright() as pw:

            def answer(route):
                url = route.request.url.split("http://app.test", 1)[1]
                resp = client.request(route.request.method, url)
                body = resp.content
                if inject.is_set() and url.startswith("/tasks/dashboard/?"):
                    body = body.replace(b"</body>", b"<script>window.injected = 1</script></body>")
                route.fulfill(status=resp.status_code, headers=dict(resp.headers), body=body)

            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"], headless=True)
            try:
                for injected in (False, True):
                    if injected:
                        inject.set()
                    page = browser.new_page()
                    errors: list[str] = []
                    page.on("console", lambda m, e=errors: e.append(m.text) if m.type == "error" else None)
                    page.on("pageerror", lambda x, e=errors: e.append(str(x)))
                    page.route("http://app.test/**", answer)
                    page.goto("http://app.test/tasks/dashboard/?v=1")
                    page.wait_for_function("() => window.catzillaDashboard && window.catzillaDashboard.seq >= 1",
                                           timeout=30000)
                    assert page.evaluate("() => window.injected") is None
                    if injected:
                        assert any("Content Security Policy" in e for e in errors), errors
                    else:
                        assert not errors, errors
                        assert page.get_attribute("body", "data-state") == "live"
                    page.close()
            finally:
                browser.close()
    finally:
        tasks.shutdown(wait_for_completion=False, timeout=10)


_ATTEMPTS: dict[str, list] = {}


def flaky_seen(tag: str) -> list:
    """Fails on its first two attempts; each attempt records the baggage and trace it ran in."""
    span = trace.get_current_span().get_span_context()
    _ATTEMPTS.setdefault(tag, []).append((baggage.get_baggage("k"), f"{span.trace_id:032x}"))
    if len(_ATTEMPTS[tag]) < 3:
        raise RuntimeError("again")
    return _ATTEMPTS[tag]


FUNCS = (*FUNCS, flaky_seen)


@pytest.mark.timeout(120)
def test_redis_every_attempt_of_a_retried_task_runs_in_the_messages_context(redis_pair, spans):
    pair = redis_pair()
    pair.start_worker()
    with trace.get_tracer("attack").start_as_current_span("req") as root:
        h = _with_baggage(
            {"k": "retried"},
            lambda: pair.producer.options(max_retries=2, retry_backoff="fixed", retry_base_ms=5).add_task(
                flaky_seen, "r1"
            ),
        )
    want = f"{root.get_span_context().trace_id:032x}"
    assert h.wait(30) == [["retried", want]] * 3
