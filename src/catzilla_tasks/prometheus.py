"""Prometheus exposition of an engine's figures (the optional ``[prometheus]`` extra).

``register(tasks)`` adds a collector to prometheus-client's default registry (or the one you
pass); every scrape reads ``tasks.monitor.get_stats()`` at that moment, so nothing is sampled
in the background. ``metrics_text(tasks)`` gives the exposition text for a framework route::

    from catzilla_tasks import prometheus
    prometheus.register(tasks)                       # served by prometheus_client's own server
    body = prometheus.metrics_text(tasks)            # or: return it from a route,
    content_type = prometheus.CONTENT_TYPE_LATEST    # with this content type

Metric names follow Prometheus conventions (``catzilla_tasks_`` prefix, ``_total`` counters,
base units: seconds and bytes); every series carries an ``engine`` label with the engine's name.

Histograms: the engine keeps log-linear histograms (4 buckets per power of two). Prometheus
wants the same ``le`` bounds at every scrape, so the exposition uses a fixed subset of the
engine's own bounds, one per power of two from 1.024 µs to about 37 minutes (32 buckets and
``+Inf``); each bound is exact, since it is one of the engine's bounds.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

try:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from prometheus_client.core import (
        REGISTRY,
        CollectorRegistry,
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.utils import floatToGoString
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "catzilla_tasks.prometheus needs the prometheus-client package: pip install 'catzilla-tasks[prometheus]'"
    ) from exc

from ._redact import redact_text
from .dashboard import StatsSource, stats_function

__all__ = [
    "CONTENT_TYPE_LATEST",
    "HISTOGRAM_BOUNDS_S",
    "TasksCollector",
    "metrics_text",
    "register",
    "unregister",
]

log = logging.getLogger("catzilla_tasks.prometheus")

PREFIX = "catzilla_tasks"

#: The ``le`` bounds of the exposed histograms, in seconds: 1024 ns · 2**k, k = 0..31.
HISTOGRAM_BOUNDS_S: tuple[float, ...] = tuple((1024 << k) / 1e9 for k in range(32))

_COUNTERS = (  # (key in stats["totals"], metric name without _total, help)
    ("submitted", "tasks_submitted", "Tasks accepted by add_task (and C submits)."),
    ("succeeded", "tasks_succeeded", "Tasks that ended successfully."),
    ("failed", "tasks_failed", "Tasks that ended with an exception (after their last attempt)."),
    ("retried", "tasks_retried", "Attempts that failed and were scheduled again."),
    ("timed_out", "tasks_timed_out", "Attempts stopped by their timeout."),
    ("cancelled", "tasks_cancelled", "Tasks cancelled before they ended."),
    ("rejected", "tasks_rejected", "Submits refused because the engine was full (QueueFull)."),
)
_PRIORITIES = ("critical", "high", "normal", "low")


def _num(value: Any) -> float:
    """A figure as a float; a figure the engine cannot give yet (None) is NaN, as Prometheus says."""
    if value is None:
        return math.nan
    return float(value)


def _fixed_buckets(hist: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The engine's cumulative buckets re-expressed on HISTOGRAM_BOUNDS_S, plus ``+Inf``.

    The engine lists its buckets up to one past the last non-empty one; every observation lies
    at or below the last listed bound, so a fixed bound above it holds the whole count. A fixed
    bound that is not one of the engine's bounds gets the count at the largest engine bound
    below it (never more than the truth).
    """
    native = [(float(b), int(c)) for b, c in hist.get("buckets", ())]
    count = int(hist.get("count", 0))
    last_native = native[-1][0] if native else 0.0
    out: list[tuple[str, float]] = []
    i = 0
    below = 0  # cumulative count at the largest native bound <= the current fixed bound
    for bound in HISTOGRAM_BOUNDS_S:
        while i < len(native) and native[i][0] <= bound * (1 + 1e-9):
            below = native[i][1]
            i += 1
        cumulative = count if bound >= last_native * (1 - 1e-9) else below
        out.append((floatToGoString(bound), float(min(cumulative, count))))
    out.append(("+Inf", float(count)))
    return out


class TasksCollector:
    """A prometheus-client collector for one or more engines, read at scrape time."""

    def __init__(self, *sources: Any) -> None:
        self._lock = threading.Lock()
        self._sources: list[tuple[Any, StatsSource]] = []
        for s in sources:
            self.add(s)

    def add(self, source: Any) -> None:
        fn = stats_function(source)
        with self._lock:
            if all(s is not source for s, _ in self._sources):
                self._sources.append((source, fn))

    def remove(self, source: Any) -> bool:
        with self._lock:
            before = len(self._sources)
            self._sources = [(s, f) for s, f in self._sources if s is not source]
            return len(self._sources) != before

    def __len__(self) -> int:
        return len(self._sources)

    def describe(self) -> list[Metric]:
        # Names only (no scrape at registration time): the families collect() always yields.
        return list(self._families())

    def _families(self) -> Iterator[Metric]:
        for _, name, doc in _COUNTERS:
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["engine"])
        yield GaugeMetricFamily(f"{PREFIX}_queue_size", "Tasks queued, per priority.", labels=["engine", "priority"])
        yield GaugeMetricFamily(f"{PREFIX}_workers", "Worker threads, by state.", labels=["engine", "state"])
        yield GaugeMetricFamily(
            f"{PREFIX}_worker_utilization", "Share of time the workers were busy (0..1).", labels=["engine"]
        )
        yield HistogramMetricFamily(
            f"{PREFIX}_execution_time_seconds", "Execution time of task attempts.", labels=["engine"]
        )
        yield HistogramMetricFamily(
            f"{PREFIX}_queue_wait_seconds", "Time tasks waited in a queue before they started.", labels=["engine"]
        )
        yield GaugeMetricFamily(f"{PREFIX}_memory_bytes", "Memory held by the engine's task slab.", labels=["engine"])

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            sources = list(self._sources)
        snapshots: list[Mapping[str, Any]] = []
        for source, fn in sources:
            try:
                snapshots.append(fn())
            except Exception as exc:  # one broken engine must not break the whole scrape
                # the message only, credentials masked: it may quote a connection string
                log.error(
                    "catzilla_tasks: could not read the stats of %r: %s",
                    source,
                    redact_text(f"{type(exc).__name__}: {exc}"),
                )
        fams = {m.name: m for m in self._families()}

        def fam(name: str) -> Any:
            return fams[f"{PREFIX}_{name}"]

        for st in snapshots:
            engine = str(st["engine"]["name"])
            totals = st["totals"]
            for key, name, _ in _COUNTERS:
                fam(name).add_metric([engine], _num(totals[key]))
            q = st["queue_metrics"]
            for prio in _PRIORITIES:
                fam("queue_size").add_metric([engine, prio], _num(q[f"{prio}_queue_size"]))
            w = st["worker_metrics"]
            fam("workers").add_metric([engine, "active"], _num(w["active_workers"]))
            fam("workers").add_metric([engine, "idle"], _num(w["idle_workers"]))
            fam("worker_utilization").add_metric([engine], _num(w["avg_worker_utilization"]))
            hists = st["histograms"]
            for name in ("execution_time_seconds", "queue_wait_seconds"):
                h = hists[name]
                fam(name).add_metric([engine], buckets=_fixed_buckets(h), sum_value=_num(h["sum"]))
            fam("memory_bytes").add_metric([engine], _num(st["performance_metrics"]["memory_usage_mb"]) * 2**20)
        # Counters, queue sizes and workers keep their order; a scrape of no engine is empty.
        if snapshots:
            yield from fams.values()


# One collector per registry, so several engines can share a registry without name clashes.
_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, TasksCollector] = weakref.WeakKeyDictionary()
_by_registry_lock = threading.Lock()


def register(tasks: Any, registry: CollectorRegistry | None = None) -> TasksCollector:
    """Expose ``tasks`` through ``registry`` (prometheus-client's default one if None).

    Several engines may be registered in one registry: they share one collector and their
    series differ by the ``engine`` label, so give them distinct names. Returns the collector.
    """
    reg = REGISTRY if registry is None else registry
    with _by_registry_lock:
        collector = _by_registry.get(reg)
        if collector is None:
            collector = TasksCollector(tasks)
            reg.register(collector)
            _by_registry[reg] = collector
        else:
            collector.add(tasks)
    return collector


def unregister(tasks: Any, registry: CollectorRegistry | None = None) -> bool:
    """Stop exposing ``tasks`` through ``registry``; True if it was registered there."""
    reg = REGISTRY if registry is None else registry
    with _by_registry_lock:
        collector = _by_registry.get(reg)
        if collector is None or not collector.remove(tasks):
            return False
        if not len(collector):
            reg.unregister(collector)
            del _by_registry[reg]
        return True


def metrics_text(tasks: Any) -> bytes:
    """The Prometheus text exposition (``CONTENT_TYPE_LATEST``) of one engine, read now.

    ``tasks``: a BackgroundTasks, a TaskMonitor or a function returning the stats dict.
    """
    reg = CollectorRegistry(auto_describe=False)
    reg.register(TasksCollector(tasks))
    return generate_latest(reg)


# ----------------------------------------------------------------------------- distributed mode
# A worker's figures with the cluster's labels (queue, task, worker), and the exporter's: the
# depths of the queues and dead letters, which no single worker owns.


def _sparse_buckets(hist: Mapping[Any, int]) -> list[tuple[str, float]]:
    """A registry histogram ``{engine bucket: count}`` as cumulative counts on
    HISTOGRAM_BOUNDS_S (exact: bound k is the upper bound of engine bucket 4k), plus ``+Inf``."""
    counts = sorted((int(i), int(c)) for i, c in hist.items())
    out: list[tuple[str, float]] = []
    total = 0
    j = 0
    for k, bound in enumerate(HISTOGRAM_BOUNDS_S):
        while j < len(counts) and counts[j][0] <= 4 * k:
            total += counts[j][1]
            j += 1
        out.append((floatToGoString(bound), float(total)))
    out.append(("+Inf", float(sum(c for _, c in counts))))
    return out


class WorkerCollector:
    """The figures of one distributed-mode worker (``brokers.Worker``), read at scrape time:
    tasks by outcome, run time and queue wait per task name, tasks in flight, concurrency,
    resident memory. Labels: ``queue`` (a worker of several queues: their names joined by ","),
    ``worker`` (its id, as ``catzilla-tasks workers`` shows it) and ``task``. The worker's
    engine is exposed too (TasksCollector's families)."""

    def __init__(self, worker: Any) -> None:
        if getattr(worker, "figures", None) is None:
            raise ValueError("WorkerCollector: this worker keeps no figures (created with heartbeat_interval=None)")
        self._worker = worker
        self._engine = TasksCollector(worker.tasks)

    def describe(self) -> list[Metric]:
        return [*self._families().values(), *self._engine.describe()]

    @staticmethod
    def _families() -> dict[str, Any]:
        t = ["queue", "worker", "task"]
        w = ["queue", "worker"]
        fams = [
            CounterMetricFamily(
                f"{PREFIX}_worker_tasks",
                "Tasks this worker finished, by outcome (succeeded; failed: dead-lettered; retried: an attempt "
                "that failed and was scheduled again).",
                labels=[*t, "outcome"],
            ),
            HistogramMetricFamily(
                f"{PREFIX}_worker_task_run_seconds",
                "Run time of tasks (a uniform sample of at most 200 tasks per heartbeat above that rate).",
                labels=t,
            ),
            HistogramMetricFamily(
                f"{PREFIX}_worker_task_queue_wait_seconds",
                "Time from a task being due in Redis to its start (sampled as the run time).",
                labels=t,
            ),
            GaugeMetricFamily(f"{PREFIX}_worker_in_flight_tasks", "Tasks the worker holds now.", labels=w),
            GaugeMetricFamily(f"{PREFIX}_worker_concurrency", "Most tasks the worker holds at once.", labels=w),
            GaugeMetricFamily(f"{PREFIX}_worker_resident_memory_bytes", "Resident memory of the worker.", labels=w),
        ]
        return {m.name: m for m in fams}

    def collect(self) -> Iterator[Metric]:
        from .brokers.registry import rss_bytes

        wk = self._worker
        # (a worker of several queues, brokers.routing.MultiQueueWorker: its queues joined by ",")
        queue, wid = ",".join(getattr(wk, "weights", None) or [str(wk.broker.queue)]), str(wk.consumer)
        fams = self._families()
        for name, f in sorted(wk.figures.totals().items()):
            labels = [queue, wid, name]
            for outcome in ("succeeded", "failed", "retried"):
                fams[f"{PREFIX}_worker_tasks"].add_metric([*labels, outcome], float(f[outcome]))
            fams[f"{PREFIX}_worker_task_run_seconds"].add_metric(
                labels, buckets=_sparse_buckets(f["run"]), sum_value=f["run_sum_ns"] / 1e9
            )
            fams[f"{PREFIX}_worker_task_queue_wait_seconds"].add_metric(
                labels, buckets=_sparse_buckets(f["wait"]), sum_value=f["wait_sum_ns"] / 1e9
            )
        fams[f"{PREFIX}_worker_in_flight_tasks"].add_metric([queue, wid], float(wk.stats()["in_flight"]))
        fams[f"{PREFIX}_worker_concurrency"].add_metric([queue, wid], float(wk.concurrency))
        fams[f"{PREFIX}_worker_resident_memory_bytes"].add_metric([queue, wid], _num(rss_bytes()))
        yield from fams.values()
        yield from self._engine.collect()


class ClusterCollector:
    """What no single worker owns, read from Redis at scrape time (``brokers.cluster.ClusterView``):
    per queue and priority the tasks queued, delayed, in flight and dead-lettered, and the
    registered workers by state. Queues are re-discovered by a key SCAN at most every
    ``rescan_s`` seconds (the registry's queues are read at every scrape)."""

    def __init__(self, view: Any, rescan_s: float = 60.0) -> None:
        self._view = view
        self._rescan_s = rescan_s
        self._scanned: tuple[float, list[str]] = (-math.inf, [])
        self._lock = threading.Lock()
        self.last_error: str | None = None  # why the last scrape could not read Redis (None: it could)

    def describe(self) -> list[Metric]:
        return list(self._families().values())

    @staticmethod
    def _families() -> dict[str, Any]:
        qp = ["queue", "priority"]
        fams = [
            GaugeMetricFamily(f"{PREFIX}_queue_queued_tasks", "Tasks in a queue not yet read by a worker.", labels=qp),
            GaugeMetricFamily(
                f"{PREFIX}_queue_delayed_tasks", "Tasks waiting for their time (delay_ms, retry back-off).", labels=qp
            ),
            GaugeMetricFamily(
                f"{PREFIX}_queue_in_flight_tasks", "Tasks read by a worker and not acknowledged yet.", labels=qp
            ),
            GaugeMetricFamily(f"{PREFIX}_dead_letter_tasks", "Tasks in a queue's dead letters.", labels=qp),
            GaugeMetricFamily(
                f"{PREFIX}_cluster_workers", "Registered workers, by state (alive, lost).", labels=["state"]
            ),
            GaugeMetricFamily(
                f"{PREFIX}_cluster_up",
                "1 if this scrape read the cluster from Redis, 0 if Redis could not be read (then the "
                "other series are left out).",
            ),
        ]
        return {m.name: m for m in fams}

    def _queue_names(self) -> list[str]:
        import time

        with self._lock:
            at, names = self._scanned
            now = time.monotonic()
            if now - at >= self._rescan_s:
                names = self._view.queue_names(scan=True)
                self._scanned = (now, names)
        return sorted(set(names) | set(self._view.queue_names(scan=False)))

    def collect(self) -> Iterator[Metric]:
        fams = self._families()
        up = fams[f"{PREFIX}_cluster_up"]
        try:
            rows = self._view.queues(self._queue_names())
            workers = self._view.workers()
        except Exception as exc:
            # Redis away: said by cluster_up 0 (an empty scrape would be a success to Prometheus,
            # its series gone: an alert on a queue's depth would resolve during the outage)
            self.last_error = redact_text(f"{type(exc).__name__}: {exc}")
            log.error("catzilla_tasks: could not read the cluster: %s", self.last_error)
            up.add_metric([], 0.0)
            yield up
            return
        self.last_error = None
        up.add_metric([], 1.0)
        for row in rows:
            labels = [row["queue"], row["priority"]]
            fams[f"{PREFIX}_queue_queued_tasks"].add_metric(labels, float(row["queued"]))
            fams[f"{PREFIX}_queue_delayed_tasks"].add_metric(labels, float(row["delayed"]))
            fams[f"{PREFIX}_queue_in_flight_tasks"].add_metric(labels, float(row["in_flight"]))
            fams[f"{PREFIX}_dead_letter_tasks"].add_metric(labels, float(row["dead_letters"]))
        for state in ("alive", "lost"):
            fams[f"{PREFIX}_cluster_workers"].add_metric([state], float(sum(w["state"] == state for w in workers)))
        yield from fams.values()


def serve(collector: Any, host: str = "127.0.0.1", port: int = 9808) -> tuple[Any, Any]:
    """Serve ``collector`` (a WorkerCollector or ClusterCollector) on ``http://host:port/metrics``
    with prometheus-client's server, in a thread; returns (server, thread): ``server.shutdown()``
    stops it."""
    from prometheus_client import start_http_server

    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return start_http_server(port, addr=host, registry=reg)


def collector_text(collector: Any) -> bytes:
    """The text exposition of one collector, read now."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return generate_latest(reg)
