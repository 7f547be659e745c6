"""The dashboard page and its standalone server; the browser test drives headless Chromium."""

import datetime as dt
import json
import math
import os
import re
import sys
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.request import urlopen

import pytest
from http_helpers import get

import catzilla_tasks
from catzilla_tasks import BackgroundTasks, TaskPriority, dashboard
from catzilla_tasks.dashboard import html, json_safe, serve

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CATZILLA_TASKS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

# The stats contract: every figure the page must show (histograms are for Prometheus).
CONTRACT = {
    "queue_metrics": ["critical_queue_size", "high_queue_size", "normal_queue_size", "low_queue_size",
                      "total_queued", "queue_pressure"],
    "worker_metrics": ["active_workers", "idle_workers", "total_workers", "avg_worker_utilization"],
    "performance_metrics": ["tasks_per_second", "avg_execution_time_ms", "p95_execution_time_ms",
                            "p99_execution_time_ms", "avg_queue_wait_ms", "p95_queue_wait_ms", "p99_queue_wait_ms",
                            "memory_usage_mb", "memory_efficiency"],
    "error_metrics": ["failed_tasks", "retry_count", "timeout_count", "error_rate"],
    "totals": ["submitted", "succeeded", "failed", "cancelled", "retried", "timed_out", "rejected"],
    "engine": ["name", "uptime_s", "paused", "accepting"],
}
CONTRACT_KEYS = {f"{g}.{k}" for g, keys in CONTRACT.items() for k in keys}




@pytest.fixture
def engine():
    eng = BackgroundTasks(workers=2, enable_auto_scaling=False, queue_size=1000, name="dash-test")
    yield eng
    eng.resume()
    eng.shutdown(wait_for_completion=False, timeout=10)


@pytest.fixture
def served():
    servers = []

    def start(source, **kw):
        server, thread = serve(source, **kw)
        servers.append((server, thread))
        return server

    yield start
    for server, thread in servers:
        server.stop()
        assert not thread.is_alive()


def load(eng, ok=12, failing=("first", "second <b>bold</b> & 'quoted'")):
    """``ok`` tasks that succeed (a quarter of them take 3 ms: latencies in µs and in ms), then failures."""
    def fails(msg):
        raise ValueError(msg)

    results = [eng.add_task(time.sleep, 0.003) if i % 4 == 0 else eng.add_task(int, "5") for i in range(ok)]
    for m in failing:  # one after the other: the page lists failures newest first
        results.append(eng.add_task(fails, m))
        with pytest.raises(ValueError):
            results[-1].wait(30)
    eng.join(30)
    assert sum(r.status.name == "FAILED" for r in results) == len(failing)
    return results


def pause_with_queue(eng, sizes=(1, 2, 3, 4)):
    eng.pause()
    for prio, n in zip(TaskPriority, sizes, strict=True):
        for _ in range(n):
            eng.options(priority=prio).add_task(int)


def stable(stats):
    """The figures of a paused engine that cannot change between two reads."""
    keep = {g: dict(stats[g]) for g in ("queue_metrics", "error_metrics", "totals", "histograms")}
    # (the node slab is process-wide: nodes in use move with other engines and other tests' garbage)
    keep["perf"] = {k: v for k, v in stats["performance_metrics"].items()
                    if k not in ("tasks_per_second", "memory_in_use_mb", "memory_cached_mb", "memory_efficiency")}
    keep["workers"] = stats["worker_metrics"]["total_workers"]
    keep["failures"] = stats["recent_failures"]
    keep["engine"] = {k: v for k, v in stats["engine"].items() if k != "uptime_s"}
    return json.loads(json.dumps(json_safe(keep)))


# ----------------------------------------------------------------------------- the page


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.metrics, self.refs, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "data-metric" in a:
            self.metrics.append(a["data-metric"])
        for k in ("src", "href", "action"):
            if a.get(k):
                self.refs.append(a[k])


def test_page_is_self_contained_and_marks_every_figure():
    page = html()
    p = _Collect()
    p.feed(page)
    assert page.lstrip().lower().startswith("<!doctype html>")
    # nothing loaded from elsewhere: no external script, style, font or image
    assert all(ref.startswith("data:") for ref in p.refs), p.refs
    assert not re.search(r"https?://", page), "the page references an absolute URL"
    assert "@import" not in page and "url(" not in page
    assert {"script", "style", "canvas"} <= set(p.tags)
    # polls the relative stats.json, every second
    assert 'fetch("stats.json"' in page and "POLL_MS = 1000" in page
    # every figure of the contract has its element, and every element names a real figure
    assert CONTRACT_KEYS <= set(p.metrics), CONTRACT_KEYS - set(p.metrics)
    optional = {"queue_metrics.scheduled", "performance_metrics.memory_in_use_mb"}
    assert set(p.metrics) <= CONTRACT_KEYS | optional
    assert len(p.metrics) == len(set(p.metrics)), "a figure is shown twice"
    # error messages are put in as text, never parsed as HTML
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page and "document.write" not in page


def test_json_safe_makes_strict_json():
    raw = {"a": (1, 2.5, float("nan")), "b": {"c": float("inf"), 3: None, "d": [True, "x"]},
           "p": TaskPriority.HIGH, "n": -float("inf")}
    out = json_safe(raw)
    assert out == {"a": [1, 2.5, None], "b": {"c": None, "3": None, "d": [True, "x"]}, "p": "HIGH", "n": None}
    json.dumps(out, allow_nan=False)


# ----------------------------------------------------------------------------- the server


def test_routes_serve_page_stats_and_metrics(engine, served):
    load(engine)
    pause_with_queue(engine)
    server = served(engine)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", server.url)
    status, ctype, body = get(server.url)
    assert status == 200 and ctype.startswith("text/html") and body.decode() == html()
    status, ctype, body = get(server.url + "index.html")
    assert status == 200 and body.decode() == html()
    status, ctype, body = get(server.url + "stats.json")
    assert status == 200 and ctype == "application/json"
    shown = json.loads(body)
    assert stable(shown) == stable(engine.monitor.get_stats())
    assert shown["totals"]["submitted"] == 24 and shown["totals"]["failed"] == 2
    assert [shown["queue_metrics"][f"{p}_queue_size"] for p in ("critical", "high", "normal", "low")] == [1, 2, 3, 4]
    assert shown["recent_failures"][0]["error"] == "ValueError: second <b>bold</b> & 'quoted'"
    assert isinstance(shown["histograms"]["execution_time_seconds"]["buckets"][0], list)
    status, ctype, body = get(server.url + "metrics")
    assert status == 200 and ctype.startswith("text/plain")
    assert b'catzilla_tasks_tasks_submitted_total{engine="dash-test"} 24.0' in body
    assert b'catzilla_tasks_queue_size{engine="dash-test",priority="low"} 4.0' in body
    status, _, body = get(server.url + "nope")
    assert status == 404
    status, _, body = get(server.url, method="HEAD")
    assert status == 200 and body == b""
    for method in ("POST", "PUT", "DELETE"):
        status, _, _ = get(server.url + "stats.json", method=method)
        assert status == 405


def test_page_headers_forbid_foreign_content(engine, served):
    server = served(engine)
    with urlopen(server.url, timeout=10) as r:
        csp = r.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
        # only the page's own script runs (by its hash; the browser tests run it under this CSP)
        script_src = csp.split("script-src", 1)[1].split(";")[0].split()
        assert script_src and all(s.startswith("'sha256-") for s in script_src), csp
        assert r.headers["Cache-Control"] == "no-store"
        assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_stats_json_is_strict_json_from_any_stats_function(served):
    fake = {"queue_metrics": {"total_queued": 0}, "performance_metrics": {"avg_execution_time_ms": float("nan")},
            "histograms": {"h": {"buckets": [(1e-6, 0)], "sum": float("inf"), "count": 0}},
            "engine": {"name": "fake"}, "totals": {}}
    server = served(lambda: fake)
    status, _, body = get(server.url + "stats.json")
    assert status == 200
    out = json.loads(body, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert out["performance_metrics"]["avg_execution_time_ms"] is None
    assert out["histograms"]["h"] == {"buckets": [[1e-6, 0]], "sum": None, "count": 0}


def test_a_failing_stats_function_is_a_503_with_the_reason(served):
    def broken():
        raise RuntimeError("engine is gone")

    server = served(broken)
    status, ctype, body = get(server.url + "stats.json")
    assert status == 503 and ctype == "application/json"
    assert "engine is gone" in json.loads(body)["error"]
    status, _, _ = get(server.url)  # the page itself still loads, and shows the error
    assert status == 200


def test_token_is_required_on_every_route(engine, served):
    server = served(engine, token="s3cret-token")
    for path in ("", "index.html", "stats.json", "metrics", "nope"):
        status, _, body = get(server.url + path)
        assert status == 401, path
        assert b"s3cret" not in body
        assert get(server.url + path + "?token=wrong")[0] == 401
        assert get(server.url + path, {"Authorization": "Bearer wrong"})[0] == 401
        assert get(server.url + path, {"Authorization": "Basic s3cret-token"})[0] == 401
        for near in ("s3cret-token-x", "s3cret-toke", "S3CRET-TOKEN", " s3cret-token"):
            assert get(server.url + path + "?token=" + near.replace(" ", "%20"))[0] == 401, near
    assert get(server.url + "?token=s3cret-token")[0] == 200
    assert get(server.url + "stats.json?token=s3cret-token")[0] == 200
    assert get(server.url + "stats.json", {"Authorization": "Bearer s3cret-token"})[0] == 200
    assert get(server.url + "metrics", {"Authorization": "bearer s3cret-token"})[0] == 200
    assert get(server.url + "nope?token=s3cret-token")[0] == 404


def test_beyond_localhost_needs_a_token(engine):
    for host in ("0.0.0.0", "", "192.0.2.10", "example.org", "::"):
        with pytest.raises(ValueError, match="serving the dashboard beyond localhost needs a token"):
            serve(engine, host=host)
    for host in ("127.0.0.1", "127.5.6.7", "localhost", "::1", "[::1]"):
        assert dashboard._is_loopback(host), host
    with pytest.raises(ValueError, match="token"):
        serve(engine, token="")
    with pytest.raises(TypeError):
        serve(object())


def test_stop_releases_the_port(engine):
    server, thread = serve(engine)
    port = server.server_address[1]
    assert get(server.url + "stats.json")[0] == 200
    server.stop()
    assert not thread.is_alive()
    server2, thread2 = serve(engine, port=port)  # the port is free again
    try:
        assert get(server2.url + "stats.json")[0] == 200
    finally:
        server2.stop()


def test_metrics_route_without_prometheus_client_is_a_404_that_says_what_to_install(engine, served, monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    for mod in [m for m in sys.modules if m.startswith("prometheus_client.")]:
        monkeypatch.setitem(sys.modules, mod, None)
    monkeypatch.delitem(sys.modules, "catzilla_tasks.prometheus", raising=False)
    monkeypatch.delattr(catzilla_tasks, "prometheus", raising=False)
    server = served(engine)
    status, ctype, body = get(server.url + "metrics")
    assert status == 404 and b"pip install 'catzilla-tasks[prometheus]'" in body
    assert get(server.url + "stats.json")[0] == 200


def test_many_concurrent_readers(engine, served):
    load(engine, ok=5, failing=())
    server = served(engine)
    errors = []

    def reader():
        try:
            for _ in range(10):
                status, _, body = get(server.url + "stats.json")
                assert status == 200 and json.loads(body)["totals"]["succeeded"] == 5
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]


# ----------------------------------------------------------------------------- the browser


def _parse_shown(fmt, text, el):
    """What a figure's text says: ("none",), ("exact", value), or ("approx", value, tolerance)
    with the value in the JSON's unit and the tolerance of the digits shown."""
    if text == "\u2013":
        return ("none",)
    if fmt in ("text", "time"):
        return ("exact", text)
    if fmt == "flag":
        assert text in (el["true"], el["false"]), text
        return ("exact", text == el["true"])
    if fmt == "int":
        assert re.fullmatch(r"-?\d{1,3}(,\d{3})*", text), text
        return ("exact", int(text.replace(",", "")))
    if fmt == "duration":
        m = re.fullmatch(r"(\d+) (min|h|d) (\d\d) (s|min|h)", text)
        if m:  # floored to whole units: the truth is in [shown, shown + 1 unit)
            big = {"min": 60, "h": 3600, "d": 86400}[m.group(2)]
            small = {"s": 1, "min": 60, "h": 3600}[m.group(4)]
            low = int(m.group(1)) * big + int(m.group(3)) * small
            return ("approx", low + small / 2, small / 2 + 1e-9)
    units = {"num": {None: 1}, "ms": {"\u00b5s": 1e-3, "ms": 1, "s": 1e3}, "pct": {"%": 0.01},
             "mb": {"MB": 1}, "duration": {"s": 1}}[fmt]
    m = re.fullmatch(r"(-?\d{1,3}(?:,\d{3})*|-?\d+)(?:\.(\d+))?(?: (\S+))?", text)
    assert m and m.group(3) in units, (fmt, text)
    digits = len(m.group(2) or "")
    number = float(m.group(1).replace(",", "") + ("." + m.group(2) if digits else ""))
    scale = units[m.group(3)]
    return ("approx", number * scale, 0.5 * 10 ** -digits * scale * (1 + 1e-9) + 1e-12)


def _check_figure(metric, fmt, text, el, value):
    said = _parse_shown(fmt, text, el)
    where = f"{metric}: shows {text!r}, the JSON has {value!r}"
    if said[0] == "none":
        assert value is None, where
    elif fmt == "time":
        assert text == dt.datetime.fromtimestamp(value, dt.UTC).strftime("%H:%M:%S"), where
    elif fmt == "text":
        assert text == str(value), where
    elif said[0] == "exact":
        assert said[1] == value and type(said[1]) is type(value), where
    else:
        assert value is not None and math.isclose(said[1], value, rel_tol=0, abs_tol=said[2]), where


def _path(stats, metric):
    cur = stats
    for part in metric.split("."):
        cur = cur[int(part)] if isinstance(cur, list) else cur[part]
    return cur


SNAPSHOT_JS = """() => {
  const d = window.catzillaDashboard;
  const figures = Array.from(document.querySelectorAll("[data-metric]"))
    .filter(el => el.getClientRects().length > 0)
    .map(el => ({metric: el.dataset.metric, format: el.dataset.format, text: el.textContent,
                 true: el.dataset.true, false: el.dataset.false}));
  const bars = {};
  document.querySelectorAll("[data-bar]").forEach(el => { bars[el.dataset.bar] = el.style.width; });
  const boldInFailures = document.querySelectorAll("#failures b").length;
  return {seq: d.seq, raw: d.raw, figures, bars, boldInFailures, state: document.body.dataset.state};
}"""


def _playwright():
    """Playwright's sync API, or a failure that says what to install (CI installs both)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs Playwright's Python package: pip install playwright "
                    "(the browser is Debian's: apt-get install -y chromium; never `playwright install`)")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"the browser test needs Chromium at {CHROMIUM}: apt-get install -y chromium "
                    "(or set CATZILLA_TASKS_CHROMIUM to its path)")
    return sync_playwright


@pytest.fixture
def browser(monkeypatch):
    sync_playwright = _playwright()
    # Under the ASan run of the suite, LD_PRELOAD holds libasan: not for node and Chromium.
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.mark.browser
def test_browser_dashboard_shows_the_engines_figures(engine, served, browser):
    load(engine, ok=40)
    server = served(engine)
    # reduced motion: the bars take their width at once (no transition half-way in the screenshot)
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, timezone_id="UTC", reduced_motion="reduce")
    page = ctx.new_page()
    console_errors = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: console_errors.append(str(e)))
    page.goto(server.url)
    # rendered data from the running engine
    page.wait_for_function("() => window.catzillaDashboard.seq >= 1", timeout=15000)
    assert page.get_attribute("body", "data-state") == "live"
    first = json.loads(page.evaluate("() => window.catzillaDashboard.raw"))
    assert first["engine"]["name"] == "dash-test" and first["totals"]["succeeded"] == 40

    # pause with known work queued: the figures are stable from the next poll on
    pause_with_queue(engine, (1, 2, 3, 4))
    page.wait_for_function(
        "() => { const s = window.catzillaDashboard.stats;"
        " return s && s.engine.paused === true && s.queue_metrics.total_queued === 10; }",
        timeout=15000)
    snap = page.evaluate(SNAPSHOT_JS)  # one JS turn: figures and the JSON they were drawn from
    shown = json.loads(snap["raw"])
    truth = engine.monitor.get_stats()

    # the JSON the page rendered is the engine's (what can move while paused is left out)
    assert stable(shown) == stable(truth)
    # every figure shown matches that JSON
    metrics = {f["metric"] for f in snap["figures"]}
    assert CONTRACT_KEYS <= metrics, CONTRACT_KEYS - metrics
    for f in snap["figures"]:
        _check_figure(f["metric"], f["format"], f["text"], f, _path(shown, f["metric"]))
    # the failures table: newest first, every field, the message as text (no <b> element made)
    fail_rows = {f["metric"] for f in snap["figures"] if f["metric"].startswith("recent_failures.")}
    assert fail_rows == {f"recent_failures.{i}.{k}" for i in range(2)
                         for k in ("finished_at", "name", "task_id", "error")}
    texts = {f["metric"]: f["text"] for f in snap["figures"]}
    assert texts["recent_failures.0.error"] == "ValueError: second <b>bold</b> & 'quoted'"
    assert texts["recent_failures.1.error"] == "ValueError: first"
    assert snap["boldInFailures"] == 0
    # the visible state: paused, 10 queued, bars in proportion (low = 4 is the longest)
    assert texts["engine.paused"] == "paused" and texts["queue_metrics.total_queued"] == "10"
    assert texts["performance_metrics.p99_execution_time_ms"].endswith(" ms")  # the 3 ms tasks
    widths = {k: float(v.rstrip("%")) for k, v in snap["bars"].items() if v}
    drawn = page.evaluate("""() => { const f = document.querySelector('.fill.low');
        return f.getBoundingClientRect().width / f.parentElement.getBoundingClientRect().width; }""")
    assert drawn == pytest.approx(1, abs=0.01)  # as drawn, not only as styled
    assert widths["queue_metrics.low_queue_size"] == 100
    assert widths["queue_metrics.critical_queue_size"] == pytest.approx(25)
    assert widths["queue_metrics.high_queue_size"] == pytest.approx(50)
    assert widths["queue_metrics.normal_queue_size"] == pytest.approx(75)
    # the sparkline canvas was drawn on
    assert page.evaluate("""() => { const c = document.getElementById('spark');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        for (let i = 3; i < d.length; i += 4) if (d[i]) return true; return false; }""")
    assert not console_errors, console_errors

    out = ROOT / "build" / "dashboard.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out), full_page=True)
    assert out.stat().st_size > 10_000
    ctx.close()


@pytest.mark.browser
def test_browser_dashboard_with_a_token(engine, served, browser):
    load(engine, ok=3, failing=())
    server = served(engine, token="tok-123")
    page = browser.new_page()
    resp = page.goto(server.url)
    assert resp.status == 401
    page.goto(server.url + "?token=tok-123")  # the page sends it as a bearer token with each poll
    page.wait_for_function("() => window.catzillaDashboard.seq >= 1", timeout=15000)
    assert page.text_content('[data-metric="totals.succeeded"]') == "3"
    # the engine goes away: the page says so instead of showing stale figures as live
    server.stop()
    page.wait_for_function("() => document.body.dataset.state === 'error'", timeout=15000)
    assert page.is_visible("#banner")
    page.close()
