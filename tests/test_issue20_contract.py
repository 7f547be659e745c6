"""Issue 20 ("See the whole cluster") checked from the outside, as a user's own tests would:
written from the issue's text and the README only, calling the names they spell.

- The cluster commands are run as a user runs them: the ``catzilla-tasks`` console script in a
  subprocess (``workers``/``queues``/``inspect``/``exporter``, ``--broker URL --json``), against a
  real ``redis-server`` on 127.0.0.1, with three real worker processes (``catzilla-tasks worker
  issue20_tasks:tasks``), one of them SIGKILLed and shown lost, and the figures compared with
  what was run.
- Prometheus: a worker's ``--metrics-port`` and the ``exporter`` (served and ``--once``), parsed
  with prometheus-client's parser, names checked against Prometheus' naming conventions.
- OpenTelemetry with the SDK's in-memory exporter: one trace from a producer span into the
  task's consumer span, in-process and through Redis into a worker process;
  ``BackgroundTasks(tracing=False)``; contextvars in-process.

State in other processes is waited for by polling with hard deadlines, never by sleeping a
fixed time; each test has a generous ``timeout`` mark (a loaded 2-core machine).
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
from redis_helpers import free_port, redis, redis_url  # noqa: F401  (fixture)

from catzilla_tasks import BackgroundTasks, TaskPriority

TESTS = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(TESTS), "src")
CLI = shutil.which("catzilla-tasks", path=os.path.dirname(sys.executable)) or shutil.which("catzilla-tasks")
HEARTBEAT = 2.0  # seconds (the default): a worker is lost after 3 of them without a beat
POLL = 120.0  # the hard deadline of every wait (generous: a loaded 2-core machine)

otel_trace = pytest.importorskip("opentelemetry.trace")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

# ---------------------------------------------------------------------------------------------
# helpers


def wait_for(fetch, pred, what: str, timeout: float = POLL):
    """Call ``fetch()`` until ``pred(value)`` holds; return that value (or fail with the last)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = fetch()
        if pred(last):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last value: {last!r}")
        time.sleep(0.1)


def eventually(check, what: str, timeout: float = POLL):
    """Run ``check()`` until it stops raising AssertionError (figures of other processes that
    settle, e.g. a worker counted alive from its last beat); the last failure is raised."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"still failing after {timeout} s: {what}") from exc
        time.sleep(0.2)


def stop_process(p: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not ended within ``timeout``."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


_LD_PRELOAD = os.environ.get("LD_PRELOAD")


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    if _LD_PRELOAD:  # the ASan run's libasan first: Python children load the extension (kept if a test drops it)
        env["LD_PRELOAD"] = _LD_PRELOAD
    env.pop("CATZILLA_TASKS_BROKER", None)
    env["PYTHONPATH"] = os.pathsep.join([SRC, TESTS])
    env.update(extra)
    return env


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    assert CLI, "the catzilla-tasks console script is not installed next to this interpreter"
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, env=base_env())


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        return r.read().decode()


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample_value(fams: dict, family: str, sample: str, **labels: str) -> float:
    """The value of the one sample ``sample`` of ``family`` with these labels (0 when absent)."""
    fam = fams.get(family)
    if fam is None:
        return 0.0
    hits = [s.value for s in fam.samples if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
    return float(sum(hits))


def check_naming_conventions(fams: dict) -> None:
    """https://prometheus.io/docs/practices/naming/: snake_case with the library's prefix, base
    units (seconds, bytes) as a suffix, counters ending in ``_total``, no ``_total`` on others."""
    assert fams, "no metric families"
    for name, fam in fams.items():
        if not name.startswith("catzilla_tasks_"):
            continue
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", name), name
        assert not re.search(r"(_ms|_millis|millisecond|_minutes?|_hours?|_kb|_mb|_kilobytes|_megabytes)(_|$)", name), (
            f"{name}: not a base unit"
        )
        samples = {s.name for s in fam.samples}
        if fam.type == "counter":
            assert all(s.endswith(("_total", "_created")) for s in samples), (name, samples)
        else:
            assert not name.endswith("_total"), f"{name} is a {fam.type} named like a counter"
        if fam.type == "histogram":
            assert name.endswith(("_seconds", "_bytes")), f"histogram {name} without a base unit suffix"
            assert {name + "_bucket", name + "_count", name + "_sum"} <= samples, (name, samples)
        if re.search(r"(time|duration|latency|wait)", name) and fam.type in ("histogram", "summary", "gauge"):
            assert name.endswith(("_seconds", "_timestamp_seconds")), f"{name}: a duration not in seconds"


class Cluster:
    """Worker processes of one test module, stopped at its end."""

    def __init__(self, url: str, prefix: str, tmp) -> None:
        self.url, self.prefix, self.tmp = url, prefix, tmp
        self.procs: list[subprocess.Popen] = []

    def worker(
        self,
        queues: str | None,
        *,
        app: str = "issue20_tasks:tasks",
        concurrency: int = 4,
        metrics_port=None,
        otel=False,
        heartbeat: float = HEARTBEAT,
        vt: float | None = None,
    ):
        args = [CLI, "worker", app, "--concurrency", str(concurrency)]
        if queues is not None:
            args += ["--queues", queues]
        args += ["--heartbeat", str(heartbeat)]
        if metrics_port is not None:
            args += ["--metrics-port", str(metrics_port)]
        log = open(self.tmp / f"worker-{len(self.procs)}.log", "wb")
        env = base_env(I20_URL=self.url, I20_PREFIX=self.prefix, I20_OTEL="1" if otel else "0")
        if vt is not None:
            env["I20_VT"] = str(vt)
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.procs.append(p)
        return p

    def log(self, p: subprocess.Popen) -> str:
        i = self.procs.index(p)
        return (self.tmp / f"worker-{i}.log").read_text(errors="replace")

    def cli_json(self, *args: str):
        r = run_cli(*args, "--broker", self.url, "--prefix", self.prefix, "--json")
        assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
        return json.loads(r.stdout)

    def workers(self) -> list[dict]:
        return self.cli_json("workers")

    def mine(self, procs) -> dict[int, dict]:
        """``workers --json`` by pid, for the given processes (those listed)."""
        pids = {p.pid for p in procs}
        return {w["pid"]: w for w in self.workers() if w["pid"] in pids}

    def wait_alive(self, procs) -> dict[int, dict]:
        def fetch():
            for p in procs:
                assert p.poll() is None, f"worker {p.pid} exited {p.returncode}:\n{self.log(p)}"
            return self.mine(procs)

        return wait_for(
            fetch, lambda ws: len(ws) == len(procs) and all(w["state"] == "alive" for w in ws.values()), "workers alive"
        )

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def span_exporter():
    """The SDK's in-memory exporter on the global tracer provider. The API sets its provider once
    per process: the one found (or none) is put back afterwards, as the API's own tests do, so
    that the modules run after this one do not trace."""
    exporter = InMemorySpanExporter()
    saved = (otel_trace._TRACER_PROVIDER_SET_ONCE, otel_trace._TRACER_PROVIDER)
    provider = otel_trace.get_tracer_provider()
    if not isinstance(provider, sdk_trace.TracerProvider):
        provider = sdk_trace.TracerProvider()
        otel_trace.set_tracer_provider(provider)
        assert otel_trace.get_tracer_provider() is provider
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        yield exporter
    finally:
        exporter.shutdown()
        otel_trace._TRACER_PROVIDER_SET_ONCE, otel_trace._TRACER_PROVIDER = saved


@pytest.fixture(scope="module")
def app(redis_url, span_exporter):
    """``issue20_tasks`` imported by this process (the producer) under a prefix of its own."""
    prefix = f"i20{uuid.uuid4().hex[:8]}"
    os.environ.update(I20_URL=redis_url, I20_PREFIX=prefix, I20_OTEL="0")
    sys.modules.pop("issue20_tasks", None)
    mod = importlib.import_module("issue20_tasks")
    try:
        yield mod
    finally:
        mod.tasks.shutdown(wait_for_completion=False, timeout=10)
        mod.quiet.shutdown(wait_for_completion=False, timeout=10)
        sys.modules.pop("issue20_tasks", None)
        r = redis.Redis.from_url(redis_url)
        keys = list(r.scan_iter(f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            r.delete(*keys[i : i + 1000])
        r.close()


@pytest.fixture(scope="module")
def cluster(app, redis_url, tmp_path_factory):
    c = Cluster(redis_url, app.PREFIX, tmp_path_factory.mktemp("i20workers"))
    try:
        yield c
    finally:
        c.stop_all()


QA, QK, QD = "i20work", "i20hold", "i20depth"  # served by 3 workers; held by the victim; no worker
N_OK, N_FAIL = 12, 3
DEPTHS = {"critical": 2, "high": 3, "normal": 4, "low": 1}  # queued on QD
DELAYED = {"normal": 5, "high": 1}  # delayed on QD (10 minutes)


@pytest.fixture(scope="module")
def scenario(app, cluster, redis_url):
    """Three workers on QA (the third on QK too) run N_OK tasks and N_FAIL failing ones; the
    third then holds two tasks of QK and is SIGKILLed; QD gets tasks no worker reads."""
    metrics_port = free_port()
    w1 = cluster.worker(QA, metrics_port=metrics_port)
    w2 = cluster.worker(QA)
    w3 = cluster.worker(f"{QA},{QK}")
    cluster.wait_alive([w1, w2, w3])

    t = app.tasks
    ok = [t.options(queue=QA).add_task(app.ok, i) for i in range(N_OK)]
    bad = [t.options(queue=QA).add_task(app.boom, i) for i in range(N_FAIL)]
    for i, r in enumerate(ok):
        assert r.wait(POLL) == 2 * i
    for i, r in enumerate(bad):
        with pytest.raises(Exception, match=f"boom {i}"):
            r.wait(POLL)

    # the figures are published on the heartbeat: wait until every finished task is counted
    wait_for(
        lambda: cluster.mine([w1, w2, w3]),
        lambda ws: len(ws) == 3 and sum(w["processed"] for w in ws.values()) == N_OK + N_FAIL,
        "every finished task counted",
    )
    before_kill = cluster.mine([w1, w2, w3])

    def dead_letters(q: str) -> int:
        return sum(r["dead_letters"] for r in cluster.cli_json("queues") if r["queue"] == q)

    wait_for(lambda: dead_letters(QA), lambda n: n == N_FAIL, "the failed tasks in the dead letters")

    hold_keys = [f"{app.PREFIX}:test:release:{i}" for i in range(2)]
    held = [t.options(queue=QK).add_task(app.hold, k) for k in hold_keys]
    wait_for(lambda: cluster.mine([w3]), lambda ws: ws and ws[w3.pid]["in_flight"] == 2, "the victim holds 2 tasks")
    wait_for(lambda: [r.progress for r in held], lambda ps: None not in ps, "the held tasks running")

    queued_ids, delayed_ids = [], []
    for prio, n in DEPTHS.items():
        queued_ids += [
            t.options(queue=QD, priority=TaskPriority[prio.upper()]).add_task(app.ok, 1).task_id for _ in range(n)
        ]
    for prio, n in DELAYED.items():
        opts = t.options(queue=QD, priority=TaskPriority[prio.upper()], delay_ms=600_000)
        delayed_ids += [opts.add_task(app.ok, 1).task_id for _ in range(n)]

    victim_id = before_kill[w3.pid]["id"]
    w3.send_signal(signal.SIGKILL)
    w3.wait(30)
    killed_at = time.time()
    wait_for(
        lambda: cluster.mine([w3]), lambda ws: ws and ws[w3.pid]["state"] == "lost", "the killed worker shown lost"
    )
    try:
        yield {
            "alive": [w1, w2],
            "victim": w3,
            "victim_id": victim_id,
            "killed_at": killed_at,
            "before_kill": before_kill,
            "ok": ok,
            "bad": bad,
            "held": held,
            "queued_ids": queued_ids,
            "delayed_ids": delayed_ids,
            "metrics_port": metrics_port,
            "workers_json": cluster.workers,
        }
    finally:
        r = redis.Redis.from_url(redis_url)
        for k in hold_keys:
            r.rpush(k, "go")
        r.close()


# ---------------------------------------------------------------------------------------------
# 5. terminal: workers --json


@pytest.mark.timeout(400)
def test_workers_json_contract_and_a_killed_worker_lost(cluster, scenario):
    procs = [*scenario["alive"], scenario["victim"]]
    ws = wait_for(
        lambda: cluster.mine(procs),
        lambda ws: (
            len(ws) == 3
            and [ws[p.pid]["state"] for p in procs] == ["alive", "alive", "lost"]
            and sum(w["processed"] for w in ws.values()) == N_OK + N_FAIL
        ),
        "two alive and one lost",
    )
    now = time.time()
    host = socket.gethostname()
    for p in procs:
        w = ws[p.pid]
        for field in (
            "id",
            "host",
            "pid",
            "queues",
            "concurrency",
            "in_flight",
            "processed",
            "failed",
            "last_seen",
            "state",
        ):
            assert field in w, (field, w)
        assert isinstance(w["id"], str) and w["id"]
        assert w["host"] == host
        assert type(w["pid"]) is int and w["pid"] == p.pid
        assert isinstance(w["queues"], list) and all(isinstance(q, str) for q in w["queues"])
        assert w["concurrency"] == 4
        for k in ("in_flight", "processed", "failed"):
            assert type(w[k]) is int and w[k] >= 0, (k, w)
        assert type(w["last_seen"]) in (int, float) and math.isfinite(w["last_seen"])
        assert w["state"] in ("alive", "lost")
        # processed counts every finished task, failed ones included
        assert w["processed"] >= w["failed"]
        if "succeeded" in w:
            assert w["processed"] == w["succeeded"] + w["failed"], w  # no retries configured here
    assert sorted(ws[p.pid]["queues"] for p in procs) == [[QA], [QA], sorted([QA, QK])] or [
        ws[p.pid]["queues"] for p in procs
    ] == [[QA], [QA], [QA, QK]]

    assert sum(w["processed"] for w in ws.values()) == N_OK + N_FAIL
    assert sum(w["failed"] for w in ws.values()) == N_FAIL
    if all("succeeded" in w for w in ws.values()):
        assert sum(w["succeeded"] for w in ws.values()) == N_OK

    for p in scenario["alive"]:  # alive: beats within the last few intervals, in epoch seconds
        assert now - 60 < ws[p.pid]["last_seen"] <= now + 5, (ws[p.pid]["last_seen"], now)
        assert ws[p.pid]["in_flight"] == 0
    lost = ws[scenario["victim"].pid]
    assert lost["id"] == scenario["victim_id"]
    assert lost["state"] == "lost"
    assert now - 300 < lost["last_seen"] <= scenario["killed_at"] + 1, (lost["last_seen"], scenario["killed_at"])
    assert lost["pending"] == 2, lost  # the held tasks stay pending for it until reclaimed

    order = [w["state"] for w in cluster.workers()]  # README: alive workers first
    assert order == sorted(order, key=lambda s: s != "alive"), order

    table = run_cli("workers", "--broker", cluster.url, "--prefix", cluster.prefix)
    assert table.returncode == 0, table.stderr
    assert scenario["victim_id"] in table.stdout and "lost" in table.stdout


# 2/5. terminal: queues --json, per queue and priority


@pytest.mark.timeout(400)
def test_queues_json_depths_match_what_was_enqueued(cluster, scenario):
    rows = cluster.cli_json("queues")
    assert isinstance(rows, list) and rows
    for row in rows:
        assert {"queue", "priority", "queued", "delayed", "in_flight", "dead_letters"} <= set(row), row
        assert isinstance(row["queue"], str) and isinstance(row["priority"], str)
        for k in ("queued", "delayed", "in_flight", "dead_letters"):
            assert type(row[k]) is int and row[k] >= 0, row
    by = {(r["queue"], r["priority"]): r for r in rows}
    prios = ["critical", "high", "normal", "low"]
    for q in (QA, QK, QD):
        assert {(q, p) for p in prios} <= set(by), (q, sorted(by))
    for p in prios:
        assert by[(QD, p)]["queued"] == DEPTHS[p], by[(QD, p)]
        assert by[(QD, p)]["delayed"] == DELAYED.get(p, 0), by[(QD, p)]
        assert by[(QD, p)]["in_flight"] == 0 and by[(QD, p)]["dead_letters"] == 0
        assert by[(QA, p)]["queued"] == 0 and by[(QA, p)]["in_flight"] == 0 and by[(QA, p)]["delayed"] == 0
        assert by[(QK, p)]["queued"] == 0
        assert by[(QK, p)]["in_flight"] == (2 if p == "normal" else 0), by[(QK, p)]
        # the failing tasks (NORMAL, no retries) ended in QA's dead letters
        assert by[(QA, p)]["dead_letters"] == (N_FAIL if p == "normal" else 0), by[(QA, p)]

    table = run_cli("queues", "--broker", cluster.url, "--prefix", cluster.prefix)
    assert table.returncode == 0 and QD in table.stdout, table


# 5. terminal: inspect TASK_ID --json


@pytest.mark.timeout(400)
def test_inspect_json_of_succeeded_failed_and_waiting_tasks(cluster, scenario):
    def inspect(task_id: str) -> tuple[int, dict]:
        r = run_cli("inspect", task_id, "--broker", cluster.url, "--prefix", cluster.prefix, "--json")
        assert r.returncode in (0, 1), (r.returncode, r.stdout, r.stderr)
        return r.returncode, json.loads(r.stdout)

    good = scenario["ok"][5]
    rc, d = inspect(good.task_id)
    assert rc == 0
    assert d["task_id"] == good.task_id
    assert d["name"] == "issue20_tasks.ok"
    assert d["status"] == "succeeded"
    assert d["result"] == 10

    bad = scenario["bad"][1]
    rc, d = inspect(bad.task_id)
    assert rc == 0
    assert d["task_id"] == bad.task_id and d["name"] == "issue20_tasks.boom"
    assert d["status"] == "failed", d
    err = d["error"]
    assert err["type"] == "ValueError" and "boom 1" in err["message"], err
    assert "boom 1" in err["traceback"] and "Traceback" in err["traceback"], err
    assert "result" not in d or d["result"] is None

    rc, d = inspect(scenario["queued_ids"][0])
    assert (rc, d["status"], d["task_id"]) == (0, "queued", scenario["queued_ids"][0])
    rc, d = inspect(scenario["delayed_ids"][0])
    assert (rc, d["status"]) == (0, "delayed") and isinstance(d["due"], (int, float)) and d["due"] > time.time() + 60
    rc, d = inspect(scenario["held"][0].task_id)
    assert (rc, d["status"]) == (0, "in_flight") and d["worker"] == scenario["victim_id"], d
    assert d["progress"] == {"fraction": 0.5, "message": "holding"}, d

    rc, d = inspect("nosuchtask123")
    assert rc == 1 and d["status"] == "unknown", d


# 4. Prometheus: the exporter (what no single worker owns)


def check_exporter_text(text: str, scenario) -> None:
    fams = families(text)
    check_naming_conventions(fams)
    assert sample_value(fams, "catzilla_tasks_cluster_up", "catzilla_tasks_cluster_up") == 1
    for p, n in DEPTHS.items():
        assert (
            sample_value(
                fams, "catzilla_tasks_queue_queued_tasks", "catzilla_tasks_queue_queued_tasks", queue=QD, priority=p
            )
            == n
        )
        assert sample_value(
            fams, "catzilla_tasks_queue_delayed_tasks", "catzilla_tasks_queue_delayed_tasks", queue=QD, priority=p
        ) == DELAYED.get(p, 0)
    inflight = "catzilla_tasks_queue_in_flight_tasks"
    assert sample_value(fams, inflight, inflight, queue=QK, priority="normal") == 2
    dl = "catzilla_tasks_dead_letter_tasks"
    assert sample_value(fams, dl, dl, queue=QA, priority="normal") == N_FAIL
    assert sample_value(fams, dl, dl, queue=QA) == N_FAIL
    states = [w["state"] for w in scenario["workers_json"]()]
    assert states.count("lost") >= 1 and states.count("alive") >= 2, states
    for state in ("alive", "lost"):
        got = sample_value(fams, "catzilla_tasks_cluster_workers", "catzilla_tasks_cluster_workers", state=state)
        assert got == states.count(state), (state, got, states)
    for name in ("catzilla_tasks_queue_queued_tasks", "catzilla_tasks_dead_letter_tasks"):
        assert fams[name].type == "gauge"
        assert all({"queue", "priority"} <= set(s.labels) for s in fams[name].samples)


@pytest.mark.timeout(400)
def test_exporter_once_prints_the_queue_and_dead_letter_depths(cluster, scenario):
    def check():
        r = run_cli("exporter", "--broker", cluster.url, "--prefix", cluster.prefix, "--once")
        assert r.returncode == 0, (r.stdout, r.stderr)
        check_exporter_text(r.stdout, scenario)

    eventually(check, "exporter --once output")


@pytest.mark.timeout(400)
def test_exporter_serves_metrics(cluster, scenario, tmp_path):
    port = free_port()
    log = open(tmp_path / "exporter.log", "wb")
    p = subprocess.Popen(
        [
            CLI,
            "exporter",
            "--broker",
            cluster.url,
            "--prefix",
            cluster.prefix,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=base_env(),
    )
    log.close()
    try:

        def get():
            assert p.poll() is None, (tmp_path / "exporter.log").read_text()
            try:
                return scrape(f"http://127.0.0.1:{port}/metrics")
            except OSError:
                return None

        wait_for(get, lambda t: t is not None, "the exporter answering")
        eventually(lambda: check_exporter_text(get() or "", scenario), "the exporter's scrape")
    finally:
        stop_process(p)


@pytest.mark.timeout(120)
def test_exporter_once_without_redis_says_down_and_exits_1():
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    r = run_cli("exporter", "--broker", url, "--once")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    fams = families(r.stdout)
    assert sample_value(fams, "catzilla_tasks_cluster_up", "catzilla_tasks_cluster_up") == 0
    assert "catzilla_tasks_queue_queued_tasks" not in fams


# 4. Prometheus: one worker's figures, with the cluster labels


@pytest.mark.timeout(400)
def test_worker_metrics_have_cluster_labels_and_match_its_figures(cluster, scenario):
    w1 = scenario["alive"][0]
    wid = scenario["before_kill"][w1.pid]["id"]
    url = f"http://127.0.0.1:{scenario['metrics_port']}/metrics"
    fams = families(scrape(url))
    check_naming_conventions(fams)
    tasks_total = "catzilla_tasks_worker_tasks"  # the parser strips a counter's _total
    assert fams[tasks_total].type == "counter", fams[tasks_total].type
    for s in fams[tasks_total].samples:
        if s.name.endswith("_total"):
            assert {"queue", "worker", "task", "outcome"} <= set(s.labels), s
            assert s.labels["worker"] == wid and s.labels["queue"] == QA, s
    for h in ("catzilla_tasks_worker_task_run_seconds", "catzilla_tasks_worker_task_queue_wait_seconds"):
        assert fams[h].type == "histogram", (h, fams[h].type)
        assert all({"queue", "worker", "task"} <= set(s.labels) for s in fams[h].samples), h
    for g in ("catzilla_tasks_worker_in_flight_tasks", "catzilla_tasks_worker_concurrency"):
        assert fams[g].type == "gauge"
        assert sample_value(fams, g, g, queue=QA, worker=wid) == (0 if "in_flight" in g else 4), g
    assert (
        sample_value(
            fams,
            "catzilla_tasks_worker_resident_memory_bytes",
            "catzilla_tasks_worker_resident_memory_bytes",
            worker=wid,
        )
        > 1_000_000
    )
    assert sample_value(fams, "catzilla_tasks_worker_info", "catzilla_tasks_worker_info", worker=wid, queue=QA) == 1

    # the same counts as the worker's registry entry (workers --json), per task name
    mine = cluster.mine([w1])[w1.pid]
    per_task = mine["tasks"]
    for name, outcome_counts in per_task.items():
        for outcome in ("succeeded", "failed"):
            got = sample_value(fams, tasks_total, tasks_total + "_total", worker=wid, task=name, outcome=outcome)
            assert got == outcome_counts[outcome], (name, outcome, got, outcome_counts)
    ok_done = per_task.get("issue20_tasks.ok", {}).get("succeeded", 0)
    run_count = sample_value(
        fams,
        "catzilla_tasks_worker_task_run_seconds",
        "catzilla_tasks_worker_task_run_seconds_count",
        task="issue20_tasks.ok",
    )
    assert run_count == ok_done, (run_count, ok_done)
    done = sum(
        sample_value(fams, tasks_total, tasks_total + "_total", worker=wid, outcome=o) for o in ("succeeded", "failed")
    )
    assert done == mine["processed"], (done, mine)


# 1. shut-down workers deregister


@pytest.mark.timeout(300)
def test_a_worker_stopped_with_sigterm_deregisters(cluster):
    p = cluster.worker("i20stop")
    cluster.wait_alive([p])
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 0, cluster.log(p)
    assert cluster.mine([p]) == {}


# ---------------------------------------------------------------------------------------------
# 6. OpenTelemetry


def finished(exporter, trace_id: int) -> list:
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]


def here() -> tuple[int, int]:
    ctx = otel_trace.get_current_span().get_span_context()
    return ctx.trace_id, ctx.span_id


@pytest.mark.timeout(120)
def test_otel_in_process_one_trace_from_producer_into_consumer(span_exporter):
    with BackgroundTasks(workers=2, name="i20otel") as tasks:
        with otel_trace.get_tracer("i20").start_as_current_span("request") as req:
            r = tasks.add_task(here)
        trace_id, span_id_in_task = r.wait(60)
        tasks.join(60)
    assert trace_id == req.get_span_context().trace_id

    def spans():
        return finished(span_exporter, trace_id)

    got = wait_for(spans, lambda ss: any(s.kind == otel_trace.SpanKind.CONSUMER for s in ss), "the consumer span", 60)
    producer = [s for s in got if s.kind == otel_trace.SpanKind.PRODUCER]
    consumer = [s for s in got if s.kind == otel_trace.SpanKind.CONSUMER]
    assert len(producer) == 1 and len(consumer) == 1, [(s.name, s.kind) for s in got]
    producer, consumer = producer[0], consumer[0]
    assert producer.parent.span_id == req.get_span_context().span_id
    assert consumer.parent.span_id == producer.context.span_id
    assert consumer.context.span_id == span_id_in_task  # the task runs inside its consumer span
    for span, op in ((producer, "send"), (consumer, "process")):
        a = span.attributes
        assert a["messaging.system"] == "catzilla_tasks"
        assert a["messaging.operation.type"] == op
        assert a["messaging.destination.name"] == "i20otel"
        assert a["messaging.message.id"] == r.task_id
        assert span.name.startswith(op + " "), span.name
    assert consumer.attributes["catzilla_tasks.task.name"].endswith("here")


@pytest.mark.timeout(120)
def test_otel_tracing_false_makes_no_spans_in_process(span_exporter):
    with BackgroundTasks(workers=2, name="i20quietlocal", tracing=False) as tasks:
        with otel_trace.get_tracer("i20").start_as_current_span("request") as req:
            r = tasks.add_task(here)
        r.wait(60)
        tasks.join(60)
    trace_id = req.get_span_context().trace_id
    assert [s.name for s in finished(span_exporter, trace_id)] == ["request"]
    assert not [s for s in span_exporter.get_finished_spans() if s.attributes.get("messaging.message.id") == r.task_id]


REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


def read_request_id(new: str) -> str:
    seen = REQUEST_ID.get()
    REQUEST_ID.set(new)  # stays in the task's copy
    return seen


async def read_request_id_async() -> str:
    await asyncio.sleep(0)
    return REQUEST_ID.get()


@pytest.mark.timeout(120)
def test_contextvars_of_the_submitter_are_visible_in_process():
    with BackgroundTasks(workers=2, name="i20ctx") as tasks:
        token = REQUEST_ID.set("req-42")
        try:
            r1 = tasks.add_task(read_request_id, "changed")
            r2 = tasks.add_task(read_request_id_async)
            r3 = tasks.options(priority=TaskPriority.HIGH).add_task(read_request_id, "x")
        finally:
            REQUEST_ID.reset(token)
        r4 = tasks.add_task(read_request_id, "y")  # submitted after the reset
        assert r1.wait(60) == "req-42"
        assert r2.wait(60) == "req-42"
        assert r3.wait(60) == "req-42"
        assert r4.wait(60) == "none"
    assert REQUEST_ID.get() == "none"


def spans_in_worker(app, queue: str, trace_hex: str, pred, what: str) -> list[dict]:
    """The spans a worker process finished in a trace, read back through its ``spans`` task."""

    def fetch():
        return app.tasks.options(queue=queue).add_task(app.spans, trace_hex).wait(POLL)

    return wait_for(fetch, pred, what)


@pytest.mark.timeout(400)
def test_otel_one_trace_from_producer_through_redis_into_a_worker_process(app, cluster, span_exporter):
    q = "i20otel"
    w = cluster.worker(q, otel=True)
    cluster.wait_alive([w])
    with otel_trace.get_tracer("i20").start_as_current_span("request") as req:
        r = app.tasks.options(queue=q).add_task(app.current_trace)
    trace_hex = format(req.get_span_context().trace_id, "032x")
    assert r.wait(POLL) == trace_hex  # the task ran inside the producer's trace, in another process

    producers = [
        s
        for s in finished(span_exporter, req.get_span_context().trace_id)
        if s.kind == otel_trace.SpanKind.PRODUCER and s.attributes.get("messaging.message.id") == r.task_id
    ]
    assert len(producers) == 1, [(s.name, s.kind) for s in span_exporter.get_finished_spans()]
    producer = producers[0]
    assert producer.parent.span_id == req.get_span_context().span_id
    pa = producer.attributes
    assert pa["messaging.system"] == "catzilla_tasks" and pa["messaging.operation.type"] == "send"
    assert q in pa["messaging.destination.name"], pa
    assert producer.name.startswith("send "), producer.name

    got = spans_in_worker(app, q, trace_hex, lambda ss: any(s["kind"] == "CONSUMER" for s in ss), "the consumer span")
    consumers = [s for s in got if s["kind"] == "CONSUMER"]
    assert len(consumers) == 1, got
    c = consumers[0]
    assert c["trace_id"] == trace_hex
    assert c["parent_id"] == format(producer.context.span_id, "016x")
    ca = c["attributes"]
    assert ca["messaging.system"] == "catzilla_tasks"
    assert ca["messaging.operation.type"] == "process"
    assert ca["messaging.message.id"] == r.task_id
    assert q in ca["messaging.destination.name"], ca
    assert ca["catzilla_tasks.task.name"] == "issue20_tasks.current_trace"
    assert c["name"].startswith("process "), c["name"]


@pytest.mark.timeout(400)
def test_otel_tracing_false_producer_and_worker_carry_and_make_nothing(app, cluster, span_exporter):
    traced_q, quiet_q = "i20otel2", "i20quietw"
    w_traced = cluster.worker(traced_q, otel=True)
    w_quiet = cluster.worker(quiet_q, app="issue20_tasks:quiet", otel=True)
    cluster.wait_alive([w_traced, w_quiet])

    # a producer with tracing=False: no producer span, no trace context in the message
    with otel_trace.get_tracer("i20").start_as_current_span("request") as req:
        r = app.quiet.options(queue=traced_q).add_task(app.current_trace)
    trace_hex = format(req.get_span_context().trace_id, "032x")
    assert r.wait(POLL) != trace_hex
    assert [s.name for s in finished(span_exporter, req.get_span_context().trace_id)] == ["request"]

    # a worker whose engine has tracing=False: no consumer span even for a traced message
    with otel_trace.get_tracer("i20").start_as_current_span("request") as req2:
        r2 = app.tasks.options(queue=quiet_q).add_task(app.current_trace)
    trace_hex2 = format(req2.get_span_context().trace_id, "032x")
    assert r2.wait(POLL) is None  # no span current in the task
    # (the producer span was made here; the quiet worker recorded nothing in that trace)
    kinds = sorted(s.kind.name for s in finished(span_exporter, req2.get_span_context().trace_id))
    assert kinds == ["INTERNAL", "PRODUCER"], kinds
    assert app.quiet.options(queue=quiet_q).add_task(app.spans, trace_hex2).wait(POLL) == []


@pytest.mark.timeout(120)
def test_inspect_a_task_queued_before_any_worker_ever_read_its_queue(app, cluster):
    """No worker has read the queue yet, so its streams have no consumer group: the task is
    ``queued`` all the same (it was: a NOGROUP error, exit 1, nothing on stdout)."""
    r = app.tasks.options(queue="i20noworker", priority=TaskPriority.LOW).add_task(app.ok, 3)
    p = run_cli("inspect", r.task_id, "--broker", cluster.url, "--prefix", cluster.prefix, "--json")
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    d = json.loads(p.stdout)
    assert (d["task_id"], d["name"], d["status"], d["priority"]) == (r.task_id, "issue20_tasks.ok", "queued", "low")


# 2. per task name across the cluster: counts, percentiles, latest errors


@pytest.mark.timeout(400)
def test_tasks_json_per_task_name_across_the_workers(cluster, scenario):
    rows = cluster.cli_json("tasks")
    by = {r["name"]: r for r in rows}
    ok, boom = by["issue20_tasks.ok"], by["issue20_tasks.boom"]
    assert (ok["processed"], ok["succeeded"], ok["failed"]) == (N_OK, N_OK, 0), ok
    assert (boom["processed"], boom["succeeded"], boom["failed"]) == (N_FAIL, 0, N_FAIL), boom
    for r in (ok, boom):
        assert type(r["rate"]) in (int, float) and r["rate"] >= 0
        for h in ("run", "wait"):
            stats = r[h]
            assert {"samples", "mean", "p50", "p90", "p95", "p99"} <= set(stats), stats
            assert stats["samples"] == r["processed"], (h, stats, r["processed"])
            assert 0 <= stats["p50"] <= stats["p90"] <= stats["p95"] <= stats["p99"] < 60, stats
    errors = boom["errors"]
    assert 1 <= len(errors) <= N_FAIL, errors
    for e in errors:  # README: each with the task id, the worker, `error` ("Type: message"), `traceback`
        assert e["task_id"] in {r.task_id for r in scenario["bad"]}, e
        assert re.fullmatch(r"ValueError: boom \d", e["error"]), e
        assert "Traceback" in e["traceback"] and "boom" in e["traceback"], e


# 3. the dashboard: token + CSRF protected actions


def http(method: str, url: str, body=None, headers=None) -> tuple[int, str]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.timeout(400)
def test_dashboard_redrive_and_cancel_need_token_csrf_json_and_same_origin(app, cluster, tmp_path):
    q, qc = "i20redrive", "i20cancel"
    w = cluster.worker(q)
    cluster.wait_alive([w])
    bad = [app.tasks.options(queue=q).add_task(app.boom_other, 100 + i) for i in range(2)]
    for r in bad:
        with pytest.raises(Exception, match="boom"):
            r.wait(POLL)
    w.send_signal(signal.SIGTERM)  # no worker reads q from now on: re-driven tasks stay queued
    assert w.wait(60) == 0, cluster.log(w)

    def depth(queue: str, field: str) -> int:
        return sum(r[field] for r in cluster.cli_json("queues") if r["queue"] == queue)

    wait_for(lambda: depth(q, "dead_letters"), lambda n: n == 2, "two dead letters")

    token, port = "t0k3n-" + uuid.uuid4().hex, free_port()
    log = open(tmp_path / "dashboard.log", "wb")
    p = subprocess.Popen(
        [CLI, "dashboard", "--broker", cluster.url, "--prefix", cluster.prefix, "--port", str(port), "--token", token],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=base_env(),
    )
    log.close()
    base = f"http://127.0.0.1:{port}/"
    auth = {"Authorization": f"Bearer {token}"}
    try:

        def page():
            assert p.poll() is None, (tmp_path / "dashboard.log").read_text()
            try:
                return http("GET", base + f"?token={token}")
            except OSError:
                return None

        status, html = wait_for(page, lambda r: r is not None, "the dashboard answering")
        assert status == 200
        m = re.search(r'<meta name="csrf-token" content="([^"]+)"', html)
        assert m, html[:500]
        csrf = m.group(1)
        assert not re.search(r"<(script|link)[^>]+(src|href)=[\"']https?://", html), "a script or style from a CDN"
        with urllib.request.urlopen(base + f"?token={token}", timeout=30) as resp:
            csp = resp.headers.get("Content-Security-Policy", "")
        assert "default-src 'none'" in csp or "default-src 'self'" in csp, csp
        assert "unsafe-inline" not in csp.split("script-src", 1)[-1].split(";")[0], csp
        assert http("GET", base)[0] == 401  # the page needs its token too
        assert http("GET", base + "api/cluster.json")[0] == 401
        status, body = http("GET", base + "api/cluster.json", headers=auth)
        data = json.loads(body)
        assert status == 200 and {"workers", "queues", "tasks", "failures"} <= set(data)
        ours = [f for f in data["failures"] if f["task_id"] in {r.task_id for r in bad}]
        assert len(ours) == 2 and all(
            "ValueError" in f["traceback"] and f["task"] == "issue20_tasks.boom_other" for f in ours
        )
        status, body = http("GET", base + f"api/dead-letters.json?queue={q}", headers=auth)
        letters = json.loads(body)
        assert status == 200 and len(letters) == 2, body

        good = {**auth, "X-CSRF-Token": csrf, "Content-Type": "application/json"}
        action = base + "api/redrive"
        refused = [
            ({"X-CSRF-Token": csrf, "Content-Type": "application/json"}, (401,)),  # no token
            ({**good, "Authorization": "Bearer wrong"}, (401, 403)),
            ({k: v for k, v in good.items() if k != "X-CSRF-Token"}, (403,)),  # no CSRF token
            ({**good, "X-CSRF-Token": csrf[:-2] + ("AA" if not csrf.endswith("AA") else "BB")}, (403,)),
            ({**good, "Content-Type": "text/plain"}, (415,)),
            ({**good, "Origin": "http://evil.example"}, (403,)),
            ({**good, "Sec-Fetch-Site": "cross-site"}, (403,)),
        ]
        for headers, codes in refused:
            status, body = http("POST", action, {"queue": q}, headers)
            assert status in codes, (headers, status, body)
        status, _ = http(
            "POST", action + f"?token={token}", {"queue": q}, {k: v for k, v in good.items() if k != "Authorization"}
        )
        assert status == 401, "an action must take the token from the header only"
        assert depth(q, "dead_letters") == 2 and depth(q, "queued") == 0, "a refused action moved something"

        status, body = http(
            "POST",
            action,
            {"queue": q},
            {**good, "Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"},
        )
        assert status == 200, body
        assert json.loads(body) == {"queue": q, "moved": 2}
        assert depth(q, "dead_letters") == 0 and depth(q, "queued") == 2

        target = app.tasks.options(queue=qc).add_task(app.ok, 7)
        status, body = http("POST", base + "api/cancel", {"task_id": target.task_id}, {**good, "X-CSRF-Token": "x"})
        assert status == 403, body
        status, body = http("POST", base + "api/cancel", {"task_id": target.task_id}, good)
        assert status == 200 and json.loads(body) == {"task_id": target.task_id, "cancelled": True}, body
        assert target.status.name == "CANCELLED"
        status, body = http("GET", base + f"api/task.json?id={target.task_id}", headers=auth)
        assert status == 200 and json.loads(body)["status"] == "cancelled", body
        status, body = http("POST", base + "api/cancel", {"task_id": target.task_id}, good)
        assert status == 200 and json.loads(body)["cancelled"] is False, body
    finally:
        stop_process(p)


@pytest.mark.timeout(200)
def test_cluster_app_mounted_in_starlette_serves_the_same_api(app, cluster):
    starlette = pytest.importorskip("starlette.testclient")
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from catzilla_tasks.dashboard import cluster_app

    web = Starlette(routes=[Mount("/ops/cluster", cluster_app(cluster.url, token="s3cret", prefix=cluster.prefix))])
    target = app.tasks.options(queue="i20cancel2").add_task(app.ok, 8)
    with starlette.TestClient(web) as client:
        html = client.get("/ops/cluster/?token=s3cret")
        assert html.status_code == 200
        assert "content-security-policy" in html.headers
        csrf = re.search(r'<meta name="csrf-token" content="([^"]+)"', html.text).group(1)
        auth = {"Authorization": "Bearer s3cret"}
        data = client.get("/ops/cluster/api/cluster.json", headers=auth).json()
        assert {"workers", "queues", "tasks", "failures", "totals"} <= set(data)
        assert client.post("/ops/cluster/api/cancel", json={"task_id": target.task_id}, headers=auth).status_code == 403
        r = client.post(
            "/ops/cluster/api/cancel", json={"task_id": target.task_id}, headers={**auth, "X-CSRF-Token": csrf}
        )
        assert r.status_code == 200 and r.json() == {"task_id": target.task_id, "cancelled": True}, r.text


# the extra and the environment variable the README names


def test_the_otel_extra_needs_only_the_opentelemetry_api():
    import tomllib

    with open(os.path.join(os.path.dirname(TESTS), "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    reqs = extras["otel"]
    assert [re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0] for r in reqs] == ["opentelemetry-api"], reqs


@pytest.mark.timeout(200)
def test_cluster_commands_read_the_broker_from_the_environment(cluster, scenario):
    env = {**base_env(), "CATZILLA_TASKS_BROKER": cluster.url}
    r = subprocess.run(
        [CLI, "workers", "--prefix", cluster.prefix, "--json"], capture_output=True, text=True, timeout=120, env=env
    )
    assert r.returncode == 0, r.stderr
    assert scenario["victim_id"] in {w["id"] for w in json.loads(r.stdout)}


# 5. processed counts every finished task once: retries are attempts, not tasks


@pytest.mark.timeout(300)
def test_retried_tasks_count_once_in_processed(app, cluster):
    q = "i20retry"
    w = cluster.worker(q)
    cluster.wait_alive([w])
    fail = [app.tasks.options(queue=q).add_task(app.always_fails, i) for i in range(2)]
    once = [app.tasks.options(queue=q).add_task(app.fails_once, f"{app.PREFIX}:test:once:{i}") for i in range(3)]
    for r in fail:
        with pytest.raises(Exception, match="always"):
            r.wait(POLL)
    assert [r.wait(POLL) for r in once] == ["second"] * 3
    ws = wait_for(lambda: cluster.mine([w]), lambda ws: ws and ws[w.pid]["processed"] >= 5, "5 tasks processed")
    me = ws[w.pid]
    assert (me["processed"], me["succeeded"], me["failed"], me["retried"]) == (5, 3, 2, 2 * 2 + 3), me
    rows = {r["name"]: r for r in cluster.cli_json("tasks")}
    a, o = rows["issue20_tasks.always_fails"], rows["issue20_tasks.fails_once"]
    assert (a["processed"], a["failed"], a["retried"]) == (2, 2, 4), a
    assert (o["processed"], o["succeeded"], o["retried"]) == (3, 3, 3), o


@pytest.mark.timeout(400)
def test_otel_async_and_keyed_publishes_carry_the_trace_into_the_worker(app, cluster, span_exporter):
    q = "i20otel3"
    w = cluster.worker(q, otel=True)
    cluster.wait_alive([w])
    tracer = otel_trace.get_tracer("i20")

    async def publish_async():
        with tracer.start_as_current_span("request") as req:
            r = await app.tasks.options(queue=q).add_task_async(app.current_trace)
        return req, r

    cases = [asyncio.run(publish_async())]
    with tracer.start_as_current_span("request") as req:
        r = app.tasks.options(queue=q, idempotency_key=f"k-{uuid.uuid4().hex}").add_task(app.current_trace)
    cases.append((req, r))
    for req, r in cases:
        trace_hex = format(req.get_span_context().trace_id, "032x")
        assert r.wait(POLL) == trace_hex, r.task_id
        producer = [s for s in finished(span_exporter, req.get_span_context().trace_id) if s.kind.name == "PRODUCER"]
        assert len(producer) == 1 and producer[0].attributes["messaging.message.id"] == r.task_id


# 1. a lost worker's in-flight tasks are the ones reclaim moves


@pytest.mark.timeout(400)
def test_a_lost_workers_pending_tasks_are_reclaimed_by_a_live_one(app, cluster, redis_url):
    q = "i20reclaim"
    victim = cluster.worker(q)
    cluster.wait_alive([victim])
    key = f"{app.PREFIX}:test:reclaim"
    r = app.tasks.options(queue=q).add_task(app.hold, key)
    wait_for(lambda: r.progress, lambda p: p is not None, "the task running on the victim")
    victim.send_signal(signal.SIGKILL)
    victim.wait(30)
    lost = wait_for(lambda: cluster.mine([victim]), lambda ws: ws and ws[victim.pid]["state"] == "lost", "lost")
    assert lost[victim.pid]["pending"] == 1, lost
    client = redis.Redis.from_url(redis_url)
    client.rpush(key, "go")  # the rescuer's run of it returns at once
    client.close()
    rescuer = cluster.worker(q, vt=2)  # its broker takes over tasks idle for 2 s
    assert r.wait(POLL) == "released"
    ws = wait_for(
        lambda: cluster.mine([victim, rescuer]),
        lambda ws: rescuer.pid in ws and ws[rescuer.pid]["processed"] == 1,
        "the rescuer's figures",
    )
    assert ws[rescuer.pid]["reclaimed"] == 1, ws[rescuer.pid]
    assert victim.pid not in ws or ws[victim.pid]["pending"] == 0, ws[victim.pid]


@pytest.mark.timeout(300)
def test_a_worker_with_heartbeat_0_is_not_registered(app, cluster):
    q = "i20nobeat"
    w = cluster.worker(q, heartbeat=0)
    assert app.tasks.options(queue=q).add_task(app.ok_other, 21).wait(POLL) == 42  # it runs tasks
    assert w.poll() is None
    assert cluster.mine([w]) == {}


# 2/4. durations in seconds: a task that sleeps 0.3 s, queued behind others on one slot


@pytest.mark.timeout(400)
def test_run_and_queue_wait_figures_are_in_seconds(app, cluster):
    q, port = "i20units", free_port()
    w = cluster.worker(q, concurrency=1, metrics_port=port)
    cluster.wait_alive([w])
    naps = [app.tasks.options(queue=q).add_task(app.nap, 0.3) for _ in range(4)]
    assert [r.wait(POLL) for r in naps] == [0.3] * 4
    rows = wait_for(
        lambda: {r["name"]: r for r in cluster.cli_json("tasks")},
        lambda by: by.get("issue20_tasks.nap", {}).get("processed") == 4,
        "4 naps counted",
    )
    nap = rows["issue20_tasks.nap"]
    assert 0.2 <= nap["run"]["p50"] <= 3.0, nap["run"]  # ~0.3 s (within 25 %), not 300
    assert 0.2 <= nap["run"]["mean"] <= 3.0, nap["run"]
    assert 0.4 <= nap["wait"]["p99"] <= 30.0, nap["wait"]  # the last one waited for 3 naps (~0.9 s)
    me = cluster.mine([w])[w.pid]
    assert isinstance(me["rss_bytes"], int) and me["rss_bytes"] > 1_000_000, me
    assert time.time() - 600 < me["started"] <= me["last_seen"], me

    fams = families(scrape(f"http://127.0.0.1:{port}/metrics"))
    run = "catzilla_tasks_worker_task_run_seconds"
    count = sample_value(fams, run, run + "_count", task="issue20_tasks.nap")
    total = sample_value(fams, run, run + "_sum", task="issue20_tasks.nap")
    assert count == 4 and 0.8 <= total <= 12.0, (count, total)
    wait = "catzilla_tasks_worker_task_queue_wait_seconds"
    assert 0.4 <= sample_value(fams, wait, wait + "_sum", task="issue20_tasks.nap") <= 60.0


# the default queue: a worker started without --queues


@pytest.mark.timeout(300)
def test_a_worker_without_queues_serves_the_default_queue(app, cluster):
    w = cluster.worker(None)
    ws = cluster.wait_alive([w])
    assert ws[w.pid]["queues"] == ["default"], ws[w.pid]
    r = app.tasks.add_task(app.ok_other, 4)
    assert r.wait(POLL) == 8
    rc = run_cli("inspect", r.task_id, "--broker", cluster.url, "--prefix", cluster.prefix, "--json")
    assert rc.returncode == 0 and json.loads(rc.stdout)["result"] == 8, rc
    rows = [row for row in cluster.cli_json("queues") if row["queue"] == "default"]
    assert [row["priority"] for row in rows] == ["critical", "high", "normal", "low"], rows


# 6. a failed attempt's span records the exception, status ERROR; each retry a span of its own


@pytest.mark.timeout(400)
def test_otel_failed_attempts_are_error_spans_one_per_attempt(app, cluster, span_exporter):
    q = "i20otel4"
    w = cluster.worker(q, otel=True)
    cluster.wait_alive([w])
    with otel_trace.get_tracer("i20").start_as_current_span("request") as req:
        r = app.tasks.options(queue=q).add_task(app.always_fails, 9)
    with pytest.raises(Exception, match="always 9"):
        r.wait(POLL)
    trace_hex = format(req.get_span_context().trace_id, "032x")
    got = spans_in_worker(
        app, q, trace_hex, lambda ss: len([s for s in ss if s["kind"] == "CONSUMER"]) >= 3, "3 consumer spans"
    )
    consumers = [s for s in got if s["kind"] == "CONSUMER"]
    assert len(consumers) == 3, consumers  # the first attempt and 2 retries
    for c in consumers:
        assert c["status"] == "ERROR" and "exception" in c["events"], c
        assert c["attributes"]["messaging.message.id"] == r.task_id


# 3. the cluster page in headless Chromium: re-drive and cancel from the page


CHROMIUM = os.environ.get("CATZILLA_TASKS_CHROMIUM", "/usr/bin/chromium")


@pytest.mark.timeout(400)
def test_browser_redrives_dead_letters_and_cancels_a_task(app, cluster, tmp_path, monkeypatch):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}")
    q, qc = "i20browser", "i20browsercancel"
    w = cluster.worker(q)
    cluster.wait_alive([w])
    bad = [app.tasks.options(queue=q).add_task(app.boom_other, 200 + i) for i in range(3)]
    for r in bad:
        with pytest.raises(Exception, match="boom"):
            r.wait(POLL)
    w.send_signal(signal.SIGTERM)
    assert w.wait(60) == 0, cluster.log(w)

    def depth(field: str, queue: str = q) -> int:
        return sum(r[field] for r in cluster.cli_json("queues") if r["queue"] == queue)

    wait_for(lambda: depth("dead_letters"), lambda n: n == 3, "three dead letters")
    target = app.tasks.options(queue=qc).add_task(app.ok, 5)

    token, port = uuid.uuid4().hex, free_port()
    log = open(tmp_path / "dashboard.log", "wb")
    p = subprocess.Popen(
        [CLI, "dashboard", "--broker", cluster.url, "--prefix", cluster.prefix, "--port", str(port), "--token", token],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=base_env(),
    )
    log.close()
    try:

        def probe():
            assert p.poll() is None, (tmp_path / "dashboard.log").read_text()
            try:
                return http("GET", f"http://127.0.0.1:{port}/api/cluster.json?token={token}")[0]
            except OSError:
                return None

        wait_for(probe, lambda s: s == 200, "the dashboard answering")
        monkeypatch.delenv("LD_PRELOAD", raising=False)  # the ASan run's libasan: not for node and Chromium
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
            try:
                page = browser.new_page()
                page.set_default_timeout(60_000)
                page.on("dialog", lambda d: d.accept())
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.goto(f"http://127.0.0.1:{port}/?token={token}")
                page.get_by_role("combobox", name="queue").select_option(q)
                row = page.get_by_role("row").filter(has_text=f"boom {200}")
                row.get_by_role("button", name="Re-drive").click()
                wait_for(lambda: (depth("dead_letters"), depth("queued")), lambda d: d == (2, 1), "one re-driven")
                page.get_by_role("button", name="Re-drive all").click()
                wait_for(lambda: (depth("dead_letters"), depth("queued")), lambda d: d == (0, 3), "all re-driven")

                page.get_by_role("textbox", name="task id").fill(target.task_id)
                page.get_by_role("button", name="Look up").click()
                page.get_by_role("button", name="Cancel").click()
                wait_for(lambda: target.status.name, lambda s: s == "CANCELLED", "the task cancelled from the page")
                assert not errors, errors
            finally:
                browser.close()
    finally:
        stop_process(p)


@pytest.mark.timeout(400)
def test_otel_baggage_crosses_the_wire_with_the_default_propagators(app, cluster):
    from opentelemetry import baggage, context

    q = "i20baggage"
    w = cluster.worker(q, otel=True)
    cluster.wait_alive([w])
    token = context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        with otel_trace.get_tracer("i20").start_as_current_span("request"):
            r = app.tasks.options(queue=q).add_task(app.current_baggage, "tenant")
            ra = app.tasks.options(queue=q).add_task(app.current_baggage_async, "tenant")
    finally:
        context.detach(token)
    assert r.wait(POLL) == "acme"  # (was None: the task ran outside the message's context)
    assert ra.wait(POLL) == "acme"
    assert app.tasks.options(queue=q).add_task(app.current_baggage, "tenant").wait(POLL) is None  # not leaked


# 1. a frozen worker is lost while frozen, alive again once it runs (no other took its id)


@pytest.mark.timeout(300)
def test_a_frozen_worker_is_lost_then_alive_again(app, cluster):
    w = cluster.worker("i20frozen")
    cluster.wait_alive([w])
    os.kill(w.pid, signal.SIGSTOP)
    try:
        lost = wait_for(lambda: cluster.mine([w]), lambda ws: ws and ws[w.pid]["state"] == "lost", "lost while frozen")
        assert lost[w.pid]["last_seen"] < time.time() - 2 * HEARTBEAT, lost
    finally:
        os.kill(w.pid, signal.SIGCONT)
    cluster.wait_alive([w])
    assert app.tasks.options(queue="i20frozen").add_task(app.ok_other, 1).wait(POLL) == 2


# 4/5. a worker of several queues: one registry entry, its figures labelled per queue


@pytest.mark.timeout(300)
def test_a_multi_queue_worker_is_one_entry_with_per_queue_metrics(app, cluster):
    qa, qb, port = "i20mq1", "i20mq2", free_port()
    w = cluster.worker(f"{qa}:1,{qb}:3", concurrency=8, metrics_port=port)
    me = cluster.wait_alive([w])[w.pid]
    assert sorted(me["queues"]) == [qa, qb] and me["concurrency"] == 8, me
    assert me["weights"] == {qa: 1, qb: 3}, me
    ra = [app.tasks.options(queue=qa).add_task(app.ok_other, i) for i in range(2)]
    rb = [app.tasks.options(queue=qb).add_task(app.ok_other, i) for i in range(5)]
    assert [r.wait(POLL) for r in ra + rb] == [0, 2, 0, 2, 4, 6, 8]
    wait_for(lambda: cluster.mine([w]), lambda ws: ws and ws[w.pid]["processed"] == 7, "7 processed")

    # README: one series per worker, its queues' names joined by "," (its figures are the
    # worker's, not split per queue)
    fams = families(scrape(f"http://127.0.0.1:{port}/metrics"))
    joined = f"{qa},{qb}"
    total = "catzilla_tasks_worker_tasks"
    got = sample_value(fams, total, total + "_total", queue=joined, task="issue20_tasks.ok_other", outcome="succeeded")
    assert got == 7, got
    assert (
        sample_value(fams, "catzilla_tasks_worker_concurrency", "catzilla_tasks_worker_concurrency", queue=joined) == 8
    )
