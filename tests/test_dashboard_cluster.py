"""The cluster dashboard (issue 20, part 3) against a real redis-server with worker processes:
its JSON routes, the refusals of its actions (token, CSRF, cross-origin), the CLI, the ASGI app
mounted in Starlette, and headless Chromium driving the page (re-drive, look up, cancel)."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis_tasks as rt
from http_helpers import get
from redis_helpers import redis, redis_url, wait_until  # noqa: F401  (fixtures)
from test_dashboard import browser  # noqa: F401  (the fixture: Debian's Chromium, Playwright)

from catzilla_tasks import BackgroundTasks, TaskCancelled
from catzilla_tasks.brokers import RedisBroker
from catzilla_tasks.dashboard import cluster_app, serve_cluster
from catzilla_tasks.dashboard.cluster import PAGE_CSP

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = Path(TESTS).parent
TOKEN = "dash-tok-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BEAT = 0.2
SECRET = "hunter2"


class Cluster:
    def __init__(self, url: str, prefix: str) -> None:
        self.url, self.prefix = url, prefix
        self.procs = [self.start_worker() for _ in range(2)]
        self.producer = BackgroundTasks(workers=2, broker=RedisBroker(url, prefix=prefix, visibility_timeout=2.0))
        self.r = redis.Redis.from_url(url)

    def start_worker(self) -> subprocess.Popen:
        env = dict(os.environ, CT_TEST_REDIS_URL=self.url, CT_TEST_PREFIX=self.prefix, CT_TEST_VT="2",
                   PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
        return subprocess.Popen(
            [sys.executable, "-m", "catzilla_tasks.cli", "worker", "redis_tasks:tasks", "--concurrency", "2",
             "--heartbeat", str(BEAT)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self.producer.shutdown(wait_for_completion=False)
        keys = list(self.r.scan_iter(f"{self.prefix}:*", count=1000))
        if keys:
            self.r.delete(*keys)
        self.r.close()


@pytest.fixture(scope="module")
def cluster(redis_url):
    c = Cluster(redis_url, f"ctd{uuid.uuid4().hex[:10]}")
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def dash(cluster):
    server, thread = serve_cluster(cluster.url, token=TOKEN, prefix=cluster.prefix)
    yield server
    server.stop()
    thread.join(10)
    assert not thread.is_alive()


def api(server, path, headers=AUTH):
    status, ctype, body = get(server.url + path, headers)
    assert ctype.startswith("application/json"), (status, ctype, body)
    return status, json.loads(body)


def overview(server):
    status, data = api(server, "api/cluster.json")
    assert status == 200, data
    return data


def csrf_of(server):
    status, _, page = get(server.url, AUTH)
    assert status == 200
    return re.search(rb'<meta name="csrf-token" content="([^"]+)">', page).group(1).decode()


def post(server, path, body, headers=None, csrf=None, auth=True, ctype="application/json"):
    h = {"Content-Type": ctype}
    if auth:
        h.update(AUTH)
    if csrf is not None:
        h["X-CSRF-Token"] = csrf
    h.update(headers or {})
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    from urllib.error import HTTPError
    from urllib.request import Request, urlopen
    try:
        with urlopen(Request(server.url + path, data=data, headers=h, method="POST"), timeout=15) as r:
            return r.status, json.loads(r.read())
    except HTTPError as e:
        return e.code, json.loads(e.read())


def workers_alive(server, n=2):
    wait_until(lambda: sum(w["state"] == "alive" for w in overview(server)["workers"]) >= n, 60, f"{n} workers")


def dead_letter(cluster, value, message="the flag is not set"):
    """A task dead-lettered at its first failure (its flag is not set yet): (result, flag key)."""
    flag = f"{cluster.prefix}:flag:{uuid.uuid4().hex[:8]}"
    r = cluster.producer.add_task(rt.fails_until_set, flag, value, message)
    with pytest.raises(Exception, match=re.escape(message[:20])):
        r.wait(30)
    return r, flag


def dead_ids(server, task_id, queue_name="default"):
    status, d = api(server, f"api/dead-letters.json?queue={queue_name}")
    assert status == 200
    return [x["id"] for x in d["dead_letters"] if x["task_id"] == task_id]


# ----------------------------------------------------------------------------- JSON routes


@pytest.mark.timeout(180)
def test_json_routes_show_workers_queues_task_names_failures_dead_letters_and_a_task(cluster, dash):
    workers_alive(dash)
    p = cluster.producer
    ok = [p.add_task(rt.add, i, 1) for i in range(20)]
    assert [r.wait(30) for r in ok] == [i + 1 for i in range(20)]
    bad, _ = dead_letter(cluster, 1, f"cannot reach redis://:{SECRET}@db.internal:6379/0")

    seen = {}

    def figures_in():
        # one snapshot that shows every worker's last beat since the tasks ran (checked below):
        # the workers, the task names and the totals are three reads of the workers' entries,
        # each beat on its own; a beat can hold the figures of a worker's last task and still
        # count it in flight (given back a moment later), and a worker whose beats were late by
        # 3 intervals (a loaded machine) reads as lost until its next one
        data = seen["data"] = overview(dash)
        names = {t["name"]: t for t in data["tasks"]}
        ws = data["workers"]
        return (names.get("redis_tasks.add", {}).get("processed", 0) >= 20
                and names.get("redis_tasks.fails_until_set", {}).get("failed", 0) >= 1
                and all(w["state"] == "alive" and w["in_flight"] == 0 for w in ws)
                and sum(w["processed"] for w in ws) >= 21 and sum(w["failed"] for w in ws) >= 1
                and data["totals"]["workers_alive"] == 2 and data["totals"]["processed"] >= 21)
    wait_until(figures_in, 30, "the figures of the tasks run")
    data = seen["data"]
    assert data["prefix"] == cluster.prefix
    ws = {w["pid"]: w for w in data["workers"]}
    assert set(ws) == {pr.pid for pr in cluster.procs}
    for w in ws.values():
        assert w["state"] == "alive" and w["host"] and w["queues"] == ["default"] and w["concurrency"] == 2
        assert w["in_flight"] == 0 and w["rss_bytes"] > 10 * 2**20 and abs(w["last_seen"] - time.time()) < 10
    assert sum(w["processed"] for w in ws.values()) >= 21 and sum(w["failed"] for w in ws.values()) >= 1
    assert data["totals"]["workers_alive"] == 2 and data["totals"]["processed"] >= 21
    rows = {(q["queue"], q["priority"]): q for q in data["queues"]}
    assert set(rows[("default", "normal")]) == {"queue", "priority", "queued", "delayed", "in_flight", "dead_letters"}
    assert rows[("default", "normal")]["dead_letters"] >= 1
    add = {t["name"]: t for t in data["tasks"]}["redis_tasks.add"]
    assert add["processed"] >= 20 and add["failed"] == 0
    assert 0 <= add["run"]["p50"] <= add["run"]["p95"] <= add["run"]["p99"] < 1
    assert 0 <= add["wait"]["p50"] <= add["wait"]["p99"] < 30
    # the latency histogram: [upper bound (s), count], by bound, adding up to the samples
    bounds = [b for b, _ in add["run_buckets"]]
    assert bounds == sorted(bounds) and sum(c for _, c in add["run_buckets"]) == add["run"]["samples"]
    # recent failures: with their traceback, redacted
    f = next(f for f in data["failures"] if f["task_id"] == bad.task_id)
    assert f["task"] == "redis_tasks.fails_until_set" and f["error"].startswith("RuntimeError: cannot reach")
    assert "Traceback" in f["traceback"] and "fails_until_set" in f["traceback"]
    text = json.dumps(data)
    assert SECRET not in text and "redis://:***@db.internal" in text
    # the dead letters of a queue
    status, d = api(dash, "api/dead-letters.json?queue=default&count=10")
    assert status == 200 and d["queue"] == "default"
    mine = [x for x in d["dead_letters"] if x["task_id"] == bad.task_id]
    assert len(mine) == 1 and mine[0]["name"] == "redis_tasks.fails_until_set" and SECRET not in json.dumps(mine)
    assert mine[0]["error"] == "RuntimeError: cannot reach redis://:***@db.internal:6379/0"
    assert "Traceback" in mine[0]["traceback"]
    # one task by id: a success, a failure, an unknown id
    status, t = api(dash, f"api/task.json?id={ok[3].task_id}")
    assert status == 200 and t["status"] == "succeeded" and t["result"] == 4 and t["name"] == "redis_tasks.add"
    status, t = api(dash, f"api/task.json?id={bad.task_id}")
    assert t["status"] == "failed" and t["error"]["type"].endswith("RuntimeError")
    assert SECRET not in json.dumps(t) and "Traceback" in t["error"]["traceback"]
    assert api(dash, "api/task.json?id=no-such-task")[1]["status"] == "unknown"
    # bad requests
    assert api(dash, "api/task.json")[0] == 400
    assert api(dash, "api/dead-letters.json")[0] == 400
    assert api(dash, "api/dead-letters.json?queue=default&count=0")[0] == 400
    assert get(dash.url + "api/nothing", AUTH)[0] == 404
    assert get(dash.url + "api/redrive", AUTH)[0] == 405   # an action is a POST, never a GET


@pytest.mark.timeout(120)
def test_every_route_needs_the_token(cluster, dash):
    for path in ("", "api/cluster.json", "api/dead-letters.json?queue=default", "api/task.json?id=x"):
        assert get(dash.url + path)[0] == 401, path
        assert get(dash.url + path, {"Authorization": "Bearer wrong"})[0] == 401, path
        assert get(dash.url + path + ("&" if "?" in path else "?") + f"token={TOKEN}")[0] == 200, path
    status, _, _ = get(dash.url, {"Host": "attacker.example"} | AUTH)   # DNS rebinding: refused
    assert status == 403
    status, ctype, page = get(dash.url, AUTH)
    assert status == 200 and ctype.startswith("text/html")
    # every page gets its own CSRF token; the page fetches nothing from elsewhere
    assert csrf_of(dash) != csrf_of(dash)
    assert not re.search(rb"https?://", page) and b"innerHTML" not in page and b"__CATZILLA_CSRF__" not in page


@pytest.mark.timeout(120)
def test_actions_refused_without_token_csrf_or_from_another_origin(cluster, dash):
    workers_alive(dash)
    bad, flag = dead_letter(cluster, 7)
    ids = dead_ids(dash, bad.task_id)
    assert len(ids) == 1
    csrf = csrf_of(dash)
    body = {"queue": "default", "ids": ids}
    origin = dash.url.rstrip("/")
    refusals = [
        (401, dict(auth=False, csrf=csrf)),                                    # no token
        (401, dict(auth=False, csrf=csrf, headers={"Authorization": "Bearer nope"})),
        (403, dict(csrf=None)),                                                # no CSRF token
        (403, dict(csrf="abc.def")),                                           # a forged one
        (403, dict(csrf=csrf[:-2] + ("00" if not csrf.endswith("00") else "11"))),
        (403, dict(csrf=csrf, headers={"Origin": "http://attacker.example"})),  # cross-origin
        (403, dict(csrf=csrf, headers={"Origin": "null"})),
        (403, dict(csrf=csrf, headers={"Sec-Fetch-Site": "cross-site"})),
        (403, dict(csrf=csrf, headers={"Sec-Fetch-Site": "same-site"})),
        (415, dict(csrf=csrf, ctype="text/plain")),                            # what a form can send
        (415, dict(csrf=csrf, ctype="application/x-www-form-urlencoded")),
    ]
    for want, kw in refusals:
        status, answer = post(dash, "api/redrive", body, **kw)
        assert status == want, (kw, answer)
        assert "error" in answer
    # the token in the query string does not do for a POST
    status, _ = post(dash, f"api/redrive?token={TOKEN}", body, auth=False, csrf=csrf)
    assert status == 401
    assert post(dash, "api/redrive", b"[1, 2]", csrf=csrf)[0] == 400
    assert post(dash, "api/redrive", {"queue": "default", "ids": "all"}, csrf=csrf)[0] == 400
    assert post(dash, "api/redrive", {"ids": ids}, csrf=csrf)[0] == 400
    assert post(dash, "api/cancel", {}, csrf=csrf)[0] == 400
    assert post(dash, "api/redrive", {"queue": "default", "ids": ["x"] * 2000}, csrf=csrf)[0] in (400, 413)
    assert dead_ids(dash, bad.task_id) == ids   # nothing moved

    # the same request, same-origin, with the page's CSRF token: moved, and the task runs
    cluster.r.set(flag, 1)
    status, answer = post(dash, "api/redrive", body, csrf=csrf,
                          headers={"Origin": origin, "Sec-Fetch-Site": "same-origin"})
    assert (status, answer) == (200, {"queue": "default", "moved": 1})
    assert cluster.producer.broker.result(bad.task_id).wait(30) == 7
    assert dead_ids(dash, bad.task_id) == []
    assert post(dash, "api/redrive", body, csrf=csrf)[1] == {"queue": "default", "moved": 0}


@pytest.mark.timeout(120)
def test_cancel_a_waiting_task_by_id(cluster, dash):
    r = cluster.producer.options(delay_ms=600_000).add_task(rt.add, 1, 2)
    wait_until(lambda: api(dash, f"api/task.json?id={r.task_id}")[1]["status"] == "delayed", 20, "delayed")
    csrf = csrf_of(dash)
    status, answer = post(dash, "api/cancel", {"task_id": r.task_id}, csrf=csrf)
    assert (status, answer) == (200, {"task_id": r.task_id, "cancelled": True})
    with pytest.raises(TaskCancelled):
        r.wait(10)
    assert api(dash, f"api/task.json?id={r.task_id}")[1]["status"] == "cancelled"
    assert post(dash, "api/cancel", {"task_id": r.task_id}, csrf=csrf)[1]["cancelled"] is False


# ----------------------------------------------------------------------------- ASGI, CLI


@pytest.mark.timeout(120)
def test_cluster_app_mounts_in_starlette(cluster):
    pytest.importorskip("starlette")
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.testclient import TestClient

    dash = cluster_app(cluster.url, token=TOKEN, prefix=cluster.prefix)
    app = Starlette(routes=[Mount("/ops/cluster", dash)])
    bad, flag = dead_letter(cluster, 11)
    try:
        with TestClient(app) as client:
            assert client.get("/ops/cluster/api/cluster.json").status_code == 401
            page = client.get("/ops/cluster/", headers=AUTH)
            assert page.status_code == 200 and page.headers["content-security-policy"] == PAGE_CSP
            csrf = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text).group(1)
            data = client.get("/ops/cluster/api/cluster.json", headers=AUTH).json()
            assert data["prefix"] == cluster.prefix and "workers" in data
            ids = [x["id"] for x in client.get("/ops/cluster/api/dead-letters.json?queue=default",
                                                headers=AUTH).json()["dead_letters"] if x["task_id"] == bad.task_id]
            assert len(ids) == 1
            body = {"queue": "default", "ids": ids}
            assert client.post("/ops/cluster/api/redrive", json=body, headers=AUTH).status_code == 403
            evil = {**AUTH, "X-CSRF-Token": csrf, "Origin": "http://evil.example"}
            assert client.post("/ops/cluster/api/redrive", json=body, headers=evil).status_code == 403
            cluster.r.set(flag, 1)
            answer = client.post("/ops/cluster/api/redrive", json=body, headers={**AUTH, "X-CSRF-Token": csrf})
            assert answer.status_code == 200 and answer.json()["moved"] == 1
            assert cluster.producer.broker.result(bad.task_id).wait(30) == 11
            r = client.get("/ops/cluster?token=x", headers=AUTH, follow_redirects=False)
            assert r.status_code in (307, 308) and r.headers["location"].endswith("/ops/cluster/?token=x")
    finally:
        dash.close()
    with pytest.raises(TypeError, match="token"):
        cluster_app(cluster.url)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="token"):
        cluster_app(cluster.url, token="")


def _asgi_post(app, scheme, headers, path="/api/redrive", body=b'{"queue": "default"}'):
    """One POST through the ASGI app with ``scope["scheme"]`` as an ASGI server behind a
    TLS-terminating proxy sets it (uvicorn --proxy-headers): (status, JSON answer)."""
    import asyncio

    sent, msgs = [], [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return msgs.pop(0)

    async def send(m):
        sent.append(m)

    scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "scheme": scheme, "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"])


@pytest.mark.timeout(60)
def test_cluster_app_same_origin_uses_the_request_scheme_and_default_ports(redis_url):
    """Behind a TLS-terminating proxy the page is https://host/...: its POSTs carry Origin
    https://host, which is this dashboard's origin whatever way the Host header spells the
    default port; http://evil, the same host over http, or another port is not."""
    app = cluster_app(redis_url, token=TOKEN, prefix=f"cto{uuid.uuid4().hex[:8]}")
    try:
        base = {**AUTH, "X-CSRF-Token": app.dashboard.new_csrf(), "Content-Type": "application/json"}
        accepted = [
            ("https", "host", "https://host"),
            ("https", "HOST", "https://host"),
            ("https", "host:443", "https://host"),      # a proxy that spells out the default port
            ("https", "host", "https://host:443"),
            ("http", "host:80", "http://host"),
            ("https", "host:8443", "https://host:8443"),
            ("https", "[::1]:8443", "https://[::1]:8443"),
        ]
        for scheme, host, origin in accepted:
            got = _asgi_post(app, scheme, {**base, "Host": host, "Origin": origin, "Sec-Fetch-Site": "same-origin"})
            assert got == (200, {"queue": "default", "moved": 0}), (scheme, host, origin, got)
        refused = [
            ("https", "host", "http://evil"),
            ("https", "host", "http://host"),            # the page is https: an http page is another origin
            ("http", "host", "https://host"),
            ("https", "host", "https://host:8443"),
            ("https", "host:8443", "https://host"),
            ("https", "host", "https://host.evil"),
            ("https", "host", "https://user@host"),
            ("https", "host", "https://host/path"),
            ("https", "host:x", "https://host"),
            ("https", "host", "null"),
        ]
        for scheme, host, origin in refused:
            status, answer = _asgi_post(app, scheme, {**base, "Host": host, "Origin": origin})
            assert status == 403 and "cross-origin" in answer["error"], (scheme, host, origin, answer)
        # X-Forwarded-Proto is not trusted by the dashboard (the ASGI server decides the scheme)
        status, _ = _asgi_post(app, "http", {**base, "Host": "host", "Origin": "https://host",
                                             "X-Forwarded-Proto": "https"})
        assert status == 403
    finally:
        app.close()


@pytest.mark.timeout(120)
def test_cli_dashboard_with_a_broker(cluster):
    env = dict(os.environ, PYTHONUNBUFFERED="1", CATZILLA_TASKS_BROKER=cluster.url)
    env.pop("CATZILLA_TASKS_SERVE_TOKEN", None)
    for args in (["--broker", cluster.url, "--prefix", cluster.prefix], ["--prefix", cluster.prefix]):
        proc = subprocess.Popen([sys.executable, "-m", "catzilla_tasks.cli", "dashboard", "--port", "0", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda p=proc, q=lines: [q.put(x) for x in p.stdout], daemon=True).start()
        try:
            first = lines.get(timeout=60)
            m = re.search(r"cluster dashboard of redis://\S+ at (http://127\.0\.0\.1:\d+/)\?token=(\S+)", first)
            assert m, first
            url, tok = m.groups()
            assert len(tok) >= 20    # a random token: the page can act
            assert get(url + "api/cluster.json")[0] == 401
            status, _, body = get(url + "api/cluster.json", {"Authorization": f"Bearer {tok}"})
            assert status == 200 and json.loads(body)["prefix"] == cluster.prefix
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0
    run = subprocess.run([sys.executable, "-m", "catzilla_tasks.cli", "dashboard", "http://127.0.0.1:1/",
                          "--broker", cluster.url], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 2 and "not both" in run.stderr
    run = subprocess.run([sys.executable, "-m", "catzilla_tasks.cli", "dashboard", "--broker", cluster.url,
                          "--serve-token", "x"], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 2 and "--token" in run.stderr


# ----------------------------------------------------------------------------- the browser


@pytest.fixture
def page(browser, dash):  # noqa: F811
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000}, reduced_motion="reduce")
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.errors = errors
    pg.goto(dash.url + f"?token={TOKEN}")
    pg.wait_for_function("() => window.catzillaCluster.seq >= 1", timeout=20000)
    yield pg
    ctx.close()


@pytest.mark.browser
@pytest.mark.timeout(180)
def test_browser_shows_workers_and_a_dead_letter_and_redrive_runs_it(cluster, dash, page):
    workers_alive(dash)
    hostile = "<img src=x onerror=window.pwned=1> & <b>bold</b>"
    bad, flag = dead_letter(cluster, 42, hostile)
    for w in overview(dash)["workers"]:   # the workers, by id, as rows
        page.wait_for_selector(f'#workers tr[data-worker="{w["id"]}"]', timeout=20000)
    row = f'#dead tr[data-task-id="{bad.task_id}"]'
    page.wait_for_selector(row, timeout=20000)
    # the error is shown as text: no element made from it, nothing run
    err = page.evaluate(f"() => document.querySelector('{row} td.err').firstChild.textContent")
    assert err == f"RuntimeError: {hostile}"
    assert "Traceback" in page.text_content(f"{row} td.err pre.tb")
    made = "() => document.querySelectorAll('#dead b, #dead img, #failures b, #failures img').length"
    assert page.evaluate(made) == 0
    assert page.evaluate("() => window.pwned === undefined")
    page.wait_for_selector(f'#failures tr[data-task-id="{bad.task_id}"] details', timeout=20000)
    page.click(f'#failures tr[data-task-id="{bad.task_id}"] summary')
    assert "Traceback" in page.text_content(f'#failures tr[data-task-id="{bad.task_id}"] pre.tb')

    cluster.r.set(flag, 1)
    page.click(f"{row} button.redrive")
    page.wait_for_function("() => window.catzillaCluster.actions >= 1", timeout=20000)
    assert page.evaluate("() => window.catzillaCluster.lastAction") == {"queue": "default", "moved": 1}
    assert cluster.producer.broker.result(bad.task_id).wait(30) == 42   # re-driven: it ran
    page.wait_for_selector(row, state="detached", timeout=20000)
    assert "re-drove 1 from default" in page.text_content("#action-status")

    # looked up by id: its status, then its result
    page.fill("#task-id", bad.task_id)
    page.click("#lookup-button")
    page.wait_for_function("() => { const t = window.catzillaCluster.task; return t && t.status === 'succeeded'; }",
                           timeout=20000)
    assert page.text_content('#task [data-field="status"]') == "succeeded"
    assert page.text_content('#task [data-field="result"]') == "42"
    assert page.text_content('#task [data-field="name"]') == "redis_tasks.fails_until_set"
    assert not page.errors, page.errors
    out = ROOT / "build" / "cluster-dashboard.png"   # for a look (build/ is not in git)
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out), full_page=True)


@pytest.mark.browser
@pytest.mark.timeout(180)
def test_browser_looks_up_tasks_cancels_one_and_shows_progress(cluster, dash, page):
    r = cluster.producer.options(delay_ms=600_000).add_task(rt.add, 5, 6)
    page.fill("#task-id", r.task_id)
    page.press("#task-id", "Enter")
    page.wait_for_function("() => { const t = window.catzillaCluster.task; return t && t.status === 'delayed'; }",
                           timeout=20000)
    assert page.text_content('#task [data-field="queue"]') == "default"
    page.click("#cancel-task")
    page.wait_for_function("() => { const t = window.catzillaCluster.task; return t && t.status === 'cancelled'; }",
                           timeout=20000)
    assert page.evaluate("() => window.catzillaCluster.lastAction") == {"task_id": r.task_id, "cancelled": True}
    with pytest.raises(TaskCancelled):
        r.wait(10)
    # a running task's progress, as its worker reported it (text: the message is the task's)
    gate = f"{cluster.prefix}:gate:{uuid.uuid4().hex[:8]}"
    running = cluster.producer.add_task(rt.progress_then_hold, gate, 0.4, "<i>step</i> 2 of 5")
    page.fill("#task-id", running.task_id)
    page.click("#lookup-button")
    page.wait_for_function("() => { const t = window.catzillaCluster.task;"
                           " return t && t.status === 'in_flight' && t.progress; }", timeout=20000)
    assert page.text_content('#task [data-field="progress"]') == "40 % \u00b7 <i>step</i> 2 of 5"
    assert page.evaluate("() => document.querySelectorAll('#task i').length") == 0
    status, t = api(dash, f"api/task.json?id={running.task_id}")
    assert t["progress"] == {"fraction": 0.4, "message": "<i>step</i> 2 of 5"} and t["worker"]
    cluster.r.rpush(gate, 1)
    assert running.wait(30) == 0.4
    page.wait_for_function("() => window.catzillaCluster.task.status === 'succeeded'", timeout=20000)
    # a page whose token is wrong gets nothing and says so
    other = page.context.new_page()
    resp = other.goto(dash.url + "?token=wrong")
    assert resp.status == 401
    assert not page.errors, page.errors
