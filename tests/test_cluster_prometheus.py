"""Prometheus in distributed mode against a real redis-server: a worker process serves its figures
with the cluster labels (queue, worker, task); ``catzilla-tasks exporter`` serves the queue and
dead-letter depths no single worker owns."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request

import pytest
import redis_tasks as rt
from redis_helpers import prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from catzilla_tasks import BackgroundTasks, TaskPriority  # noqa: E402
from catzilla_tasks import prometheus as prom  # noqa: E402
from catzilla_tasks.brokers import RedisBroker  # noqa: E402
from catzilla_tasks.brokers.cluster import ClusterView  # noqa: E402
from catzilla_tasks.cli import main  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        assert NAME.match(fam.name) and fam.name.startswith("catzilla_tasks_")
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - a local test server
        return resp.read().decode()


@pytest.mark.timeout(90)
def test_worker_process_serves_its_figures_with_cluster_labels(redis_url, prefix):
    env = dict(os.environ, CT_TEST_REDIS_URL=redis_url, CT_TEST_PREFIX=prefix, CT_TEST_VT="60",
               PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    w = subprocess.Popen([sys.executable, "-m", "catzilla_tasks.cli", "worker", "redis_tasks:tasks", "--concurrency",
                          "4", "--heartbeat", "0.1", "--metrics-port", "0"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    p = BackgroundTasks(workers=2, broker=RedisBroker(redis_url, prefix=prefix))
    try:
        url = None
        for line in w.stdout:
            m = re.search(r"metrics on (http://\S+/metrics)", line)
            if m:
                url = m.group(1)
                break
        assert url, "the worker did not print its metrics URL"
        rs = [p.add_task(rt.add, i, 1) for i in range(7)]
        bad = [p.add_task(rt.always_fails, i) for i in range(2)]
        for r in rs:
            r.wait(20)
        for r in bad:
            with pytest.raises(Exception, match="bad value"):
                r.wait(20)
        view = ClusterView(redis_url, prefix=prefix)
        wait_until(lambda: [x["processed"] for x in view.workers()] == [9], 20, "the worker's figures")
        (info,) = view.workers()
        view.close()
        got = samples(scrape(url))
        lab = (("queue", "default"), ("task", "redis_tasks.add"), ("worker", info["id"]))
        assert got[("catzilla_tasks_worker_tasks_total", tuple(sorted((*lab, ("outcome", "succeeded")))))] == 7
        flab = (("queue", "default"), ("task", "redis_tasks.always_fails"), ("worker", info["id"]))
        assert got[("catzilla_tasks_worker_tasks_total", tuple(sorted((*flab, ("outcome", "failed")))))] == 2
        assert got[("catzilla_tasks_worker_tasks_total", tuple(sorted((*flab, ("outcome", "retried")))))] == 4
        assert got[("catzilla_tasks_worker_task_run_seconds_count", lab)] == 7
        assert got[("catzilla_tasks_worker_task_run_seconds_bucket", tuple(sorted((*lab, ("le", "+Inf")))))] == 7
        assert got[("catzilla_tasks_worker_task_queue_wait_seconds_count", lab)] == 7
        wl = (("queue", "default"), ("worker", info["id"]))
        assert got[("catzilla_tasks_worker_concurrency", wl)] == 4
        assert got[("catzilla_tasks_worker_in_flight_tasks", wl)] == 0
        assert got[("catzilla_tasks_worker_resident_memory_bytes", wl)] > 2**20
        assert any(k[0] == "catzilla_tasks_tasks_succeeded_total" for k in got)  # the engine's own figures
    finally:
        w.terminate()
        w.communicate(timeout=30)
        p.shutdown(wait_for_completion=False)


def test_sparse_buckets_are_exact_on_the_fixed_bounds():
    from catzilla_tasks.brokers.registry import bucket

    hist = {bucket(1500): 2, bucket(1_000_000): 3, bucket(5 * 10**9): 1}
    b = dict(prom._sparse_buckets(hist))
    assert b["1.024e-06"] == 0 and b["2.048e-06"] == 2
    assert b["0.000524288"] == 2 and b["0.001048576"] == 5  # 1 ms lies in (0.52 ms, 1.05 ms]
    assert b["+Inf"] == 6


@pytest.mark.timeout(60)
def test_exporter_serves_queue_and_dead_letter_depths(redis_url, prefix, capsys):
    a = BackgroundTasks(workers=1, broker=RedisBroker(redis_url, prefix=prefix))
    e = BackgroundTasks(workers=1, broker=RedisBroker(redis_url, prefix=prefix, queue="emails"))
    try:
        for _ in range(2):
            a.add_task(rt.add, 1, 1)
        e.options(priority=TaskPriority.CRITICAL).add_task(rt.add, 1, 1)
        e.options(delay_ms=60_000).add_task(rt.add, 1, 1)
        e.broker.redis.xadd(e.broker.dead_key, {"m": b"x", "e": "E: x", "n": "t", "i": "1", "p": 3})
        assert main(["exporter", "--broker", redis_url, "--prefix", prefix, "--once"]) == 0
        got = samples(capsys.readouterr().out)
        assert got[("catzilla_tasks_queue_queued_tasks", (("priority", "normal"), ("queue", "default")))] == 2
        assert got[("catzilla_tasks_queue_queued_tasks", (("priority", "critical"), ("queue", "emails")))] == 1
        assert got[("catzilla_tasks_queue_delayed_tasks", (("priority", "normal"), ("queue", "emails")))] == 1
        assert got[("catzilla_tasks_dead_letter_tasks", (("priority", "low"), ("queue", "emails")))] == 1
        assert got[("catzilla_tasks_queue_in_flight_tasks", (("priority", "normal"), ("queue", "default")))] == 0
        assert got[("catzilla_tasks_cluster_workers", (("state", "alive"),))] == 0
        # served over HTTP, read at each scrape
        view = ClusterView(redis_url, prefix=prefix)
        server, _ = prom.serve(prom.ClusterCollector(view), port=0)
        try:
            e.add_task(rt.add, 1, 1)
            got = samples(scrape(f"http://127.0.0.1:{server.server_port}/metrics"))
            assert got[("catzilla_tasks_queue_queued_tasks", (("priority", "normal"), ("queue", "emails")))] == 1
        finally:
            server.shutdown()
            view.close()
    finally:
        a.shutdown(wait_for_completion=False)
        e.shutdown(wait_for_completion=False)


def _double(x):
    return 2 * x


@pytest.mark.timeout(60)
def test_worker_and_engine_collectors_coexist_in_one_registry():
    """A worker process exports both its engine's figures (``prometheus.register(tasks)``, as the
    README shows for an engine) and its worker figures (``WorkerCollector``): one registry, no
    ``Duplicated timeseries`` error and no series exposed twice; the engine's series keep their
    ``engine`` label and ``catzilla_tasks_worker_info`` ties that engine to the worker's labels."""
    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

    from catzilla_tasks.brokers import Consumer, MemoryBroker

    reg, reg2 = CollectorRegistry(), CollectorRegistry()
    with BackgroundTasks(workers=2, name="w-engine", broker=MemoryBroker()) as tasks:
        tasks.task(_double)
        c = Consumer(tasks, tasks.broker, concurrency=2, consumer="w-1", heartbeat_interval=0.1)
        c2 = Consumer(tasks, tasks.broker, concurrency=1, consumer="w-2", heartbeat_interval=0.1)
        try:
            prom.register(tasks, reg)  # the app's module exposes its engine
            wc = prom.WorkerCollector(c)
            reg.register(wc)  # and the worker script its worker: no duplicate error
            wc.add(c2)  # (a second worker of the process: one collector, one family each)
            prom.register(tasks, reg2)  # or through the helper, which registers the engine too: harmless
            prom.register_worker(c, reg2)
            prom.register_worker(c2, reg2)  # a second worker in the same process and registry
            c.start()
            assert tasks.add_task(_double, 21).wait(20) == 42
            wait_until(lambda: sum(f["succeeded"] for f in c.figures.totals().values()) == 1, 20, "figures")
            texts = [generate_latest(r).decode() for r in (reg, reg2)]
        finally:
            c.stop(10)
            c2.stop(10)
            prom.unregister(tasks, reg)
            assert prom.unregister_worker(c, reg2)
            assert "catzilla_tasks_tasks_succeeded_total" in generate_latest(reg2).decode()  # c2 runs on it
            assert prom.unregister_worker(c2, reg2) and not prom.unregister_worker(c2, reg2)
            assert not list(reg2.collect())
    for text in texts:
        lines = [x for x in text.splitlines() if x and not x.startswith("#")]
        assert len(lines) == len(set(lines)), "a series exposed twice"
        got = samples(text)
        assert sum(k[0] == "catzilla_tasks_tasks_succeeded_total" for k in got) == 1
        assert got[("catzilla_tasks_tasks_succeeded_total", (("engine", "w-engine"),))] == 1
        task = f"{__name__}._double"
        lab = (("queue", "default"), ("task", task), ("worker", "w-1"))
        assert got[("catzilla_tasks_worker_tasks_total", tuple(sorted((*lab, ("outcome", "succeeded")))))] == 1
        for wid in ("w-1", "w-2"):
            info = (("engine", "w-engine"), ("queue", "default"), ("worker", wid))
            assert got[("catzilla_tasks_worker_info", info)] == 1
    # the default registry as well (auto-described at registration)
    with BackgroundTasks(workers=1, name="w-default", broker=MemoryBroker()) as tasks:
        w = Consumer(tasks, tasks.broker, concurrency=1, heartbeat_interval=0.1)
        prom.register(tasks)
        try:
            collector = prom.WorkerCollector(w)
            REGISTRY.register(collector)
            REGISTRY.unregister(collector)
        finally:
            prom.unregister(tasks)
            w.stop(5)
