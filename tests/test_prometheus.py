"""Prometheus exposition: names, types, labels and values against the stats they come from."""

import copy
import importlib
import math
import sys

import pytest

try:
    import prometheus_client  # noqa: F401
except ImportError:  # a failure, not a skip: CI installs it
    raise ImportError("these tests need prometheus-client: pip install 'prometheus-client>=0.17'") from None

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from catzilla_tasks import BackgroundTasks, TaskPriority  # noqa: E402
from catzilla_tasks import prometheus as cprom  # noqa: E402

NATIVE_BOUNDS_NS = [1024 + 256 * i for i in range(4)]  # log-linear, 4 per power of two, as the engine's
while len(NATIVE_BOUNDS_NS) < 128:
    NATIVE_BOUNDS_NS.append(NATIVE_BOUNDS_NS[-4] * 2)


def _cumulative(counts_by_bucket_index: dict[int, int], sum_s: float) -> dict:
    """A histogram as the monitor gives it: cumulative, listed to one past the last non-empty bucket."""
    last = max(counts_by_bucket_index)
    buckets, total = [], 0
    for i in range(last + 2):
        total += counts_by_bucket_index.get(i, 0)
        buckets.append((NATIVE_BOUNDS_NS[i] / 1e9, total))
    return {"buckets": buckets, "sum": sum_s, "count": total}


def fake_stats(name="fake-engine", **over):
    stats = {
        "queue_metrics": {"critical_queue_size": 1, "high_queue_size": 2, "normal_queue_size": 3,
                          "low_queue_size": 4, "total_queued": 10, "queue_pressure": 0.001},
        "worker_metrics": {"active_workers": 3, "idle_workers": 5, "total_workers": 8,
                           "avg_worker_utilization": 0.375},
        "performance_metrics": {"tasks_per_second": 12.5, "avg_execution_time_ms": 1.5,
                                "p95_execution_time_ms": 3.0, "p99_execution_time_ms": 4.0,
                                "avg_queue_wait_ms": None, "p95_queue_wait_ms": None, "p99_queue_wait_ms": None,
                                "memory_usage_mb": 0.75, "memory_efficiency": 0.5},
        "error_metrics": {"failed_tasks": 7, "retry_count": 11, "timeout_count": 2, "error_rate": 0.07},
        "totals": {"submitted": 123, "succeeded": 100, "failed": 7, "cancelled": 4, "retried": 11,
                   "timed_out": 2, "rejected": 9},
        "histograms": {
            # 2 observations in bucket 0 (<= 1.024 µs), 3 in bucket 5 (<= 2.56 µs), 1 in bucket 41
            "execution_time_seconds": _cumulative({0: 2, 5: 3, 41: 1}, 0.25),
            "queue_wait_seconds": {"buckets": [(NATIVE_BOUNDS_NS[0] / 1e9, 0)], "sum": 0.0, "count": 0},
        },
        "recent_failures": [],
        "engine": {"name": name, "uptime_s": 5.0, "paused": False, "accepting": True},
    }
    for path, value in over.items():
        group, key = path.split("__")
        stats[group][key] = value
    return stats


def samples(text):
    """{(sample name, frozenset(labels)): value} and {family name: type} of an exposition."""
    values, types = {}, {}
    for fam in text_string_to_metric_families(text.decode() if isinstance(text, bytes) else text):
        types[fam.name] = fam.type
        for s in fam.samples:
            values[(s.name, frozenset(s.labels.items()))] = s.value
    return values, types


def L(**labels):
    return frozenset(labels.items())


def test_names_types_labels_and_values_match_the_stats():
    st = fake_stats()
    values, types = samples(cprom.metrics_text(lambda: st))
    e = "fake-engine"
    for key in ("submitted", "succeeded", "failed", "retried", "timed_out", "cancelled", "rejected"):
        fam = f"catzilla_tasks_tasks_{key}"
        assert types[fam] == "counter"
        assert values[(fam + "_total", L(engine=e))] == st["totals"][key]
    assert types["catzilla_tasks_queue_size"] == "gauge"
    for prio, n in (("critical", 1), ("high", 2), ("normal", 3), ("low", 4)):
        assert values[("catzilla_tasks_queue_size", L(engine=e, priority=prio))] == n
    assert types["catzilla_tasks_workers"] == "gauge"
    assert values[("catzilla_tasks_workers", L(engine=e, state="active"))] == 3
    assert values[("catzilla_tasks_workers", L(engine=e, state="idle"))] == 5
    assert values[("catzilla_tasks_worker_utilization", L(engine=e))] == 0.375
    assert values[("catzilla_tasks_memory_bytes", L(engine=e))] == 0.75 * 2**20
    assert types["catzilla_tasks_execution_time_seconds"] == "histogram"
    assert types["catzilla_tasks_queue_wait_seconds"] == "histogram"
    # every series carries the engine label, and nothing else is exposed
    assert all(dict(labels).get("engine") == e for _, labels in values)
    assert {t for t in types} == {
        *(f"catzilla_tasks_tasks_{k}" for k in ("submitted", "succeeded", "failed", "retried", "timed_out",
                                                "cancelled", "rejected")),
        "catzilla_tasks_queue_size", "catzilla_tasks_workers", "catzilla_tasks_worker_utilization",
        "catzilla_tasks_execution_time_seconds", "catzilla_tasks_queue_wait_seconds", "catzilla_tasks_memory_bytes",
    }


def test_histogram_buckets_are_fixed_cumulative_and_exact():
    st = fake_stats()
    values, _ = samples(cprom.metrics_text(lambda: st))
    e = "fake-engine"
    name = "catzilla_tasks_execution_time_seconds"
    buckets = sorted(
        ((float(dict(lbl)["le"]), v) for (n, lbl), v in values.items() if n == name + "_bucket"),
        key=lambda b: b[0],
    )
    bounds = [b for b, _ in buckets]
    assert bounds[:-1] == list(cprom.HISTOGRAM_BOUNDS_S) and math.isinf(bounds[-1])
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), "cumulative counts never decrease"
    by_bound = dict(buckets)
    # the engine's buckets: 2 at <= 1.024 µs, 3 more at <= 2.56 µs, 1 more in bucket 41
    assert by_bound[1.024e-6] == 2
    assert by_bound[2.048e-6] == 2          # 2.56 µs observations are above 2.048 µs
    assert by_bound[4.096e-6] == 5
    b41 = NATIVE_BOUNDS_NS[41] / 1e9        # bucket 41's upper bound, between two powers of two
    below = max(b for b in cprom.HISTOGRAM_BOUNDS_S if b < b41)
    above = min(b for b in cprom.HISTOGRAM_BOUNDS_S if b >= b41)
    assert by_bound[below] == 5 and by_bound[above] == 6
    assert by_bound[float("inf")] == 6
    assert values[(name + "_count", L(engine=e))] == 6
    assert values[(name + "_sum", L(engine=e))] == 0.25
    # an empty histogram: all zero, +Inf included
    wait = [v for (n, lbl), v in values.items() if n == "catzilla_tasks_queue_wait_seconds_bucket"]
    assert len(wait) == len(cprom.HISTOGRAM_BOUNDS_S) + 1 and set(wait) == {0}


def test_histogram_with_foreign_bounds_never_overstates():
    st = fake_stats()
    # bounds that are not the engine's: 1.5 µs (2 obs), 3 µs (+4), 5 ms (+1)
    st["histograms"]["execution_time_seconds"] = {
        "buckets": [(1.5e-6, 2), (3e-6, 6), (5e-3, 7), (6e-3, 7)], "sum": 0.01, "count": 7}
    values, _ = samples(cprom.metrics_text(lambda: st))
    got = {float(dict(lbl)["le"]): v for (n, lbl), v in values.items()
           if n == "catzilla_tasks_execution_time_seconds_bucket"}
    assert got[1.024e-6] == 0        # nothing known to be <= 1.024 µs
    assert got[2.048e-6] == 2        # 1.5 µs bucket is below
    assert got[4.096e-6] == 6
    assert got[4.194304e-3] == 6     # the 5 ms bucket is above 4.19 ms: not counted yet
    assert got[8.388608e-3] == 7     # above the last listed bound: everything
    assert got[float("inf")] == 7


def test_a_real_engine_exposes_its_own_figures():
    eng = BackgroundTasks(workers=2, enable_auto_scaling=False, queue_size=1000, name="prom-real")
    try:
        def fails(i):
            raise ValueError(i)

        results = [eng.add_task(int, "7") for _ in range(20)] + [eng.add_task(fails, i) for i in range(3)]
        eng.join(30)
        assert [r.status.name for r in results].count("FAILED") == 3
        eng.pause()
        for prio, n in ((TaskPriority.CRITICAL, 1), (TaskPriority.HIGH, 2), (TaskPriority.LOW, 4)):
            for _ in range(n):
                eng.options(priority=prio).add_task(int)
        values, _ = samples(cprom.metrics_text(eng))
        st = eng.monitor.get_stats()  # paused: the figures below cannot move
        e = "prom-real"
        for key in ("submitted", "succeeded", "failed", "retried", "timed_out", "cancelled", "rejected"):
            assert values[(f"catzilla_tasks_tasks_{key}_total", L(engine=e))] == st["totals"][key]
        assert values[("catzilla_tasks_tasks_submitted_total", L(engine=e))] == 30
        assert values[("catzilla_tasks_tasks_succeeded_total", L(engine=e))] == 20
        assert values[("catzilla_tasks_tasks_failed_total", L(engine=e))] == 3
        for prio, n in (("critical", 1), ("high", 2), ("normal", 0), ("low", 4)):
            assert values[("catzilla_tasks_queue_size", L(engine=e, priority=prio))] == n
        w = st["worker_metrics"]
        assert (values[("catzilla_tasks_workers", L(engine=e, state="active"))]
                + values[("catzilla_tasks_workers", L(engine=e, state="idle"))]) == w["total_workers"] == 2
        assert values[("catzilla_tasks_execution_time_seconds_count", L(engine=e))] == 23
        assert values[("catzilla_tasks_queue_wait_seconds_count", L(engine=e))] == 23
        assert values[("catzilla_tasks_execution_time_seconds_sum", L(engine=e))] == pytest.approx(
            st["histograms"]["execution_time_seconds"]["sum"])
        memory_mb = st["performance_metrics"]["memory_usage_mb"]
        assert values[("catzilla_tasks_memory_bytes", L(engine=e))] == memory_mb * 2**20
        assert 0 <= values[("catzilla_tasks_worker_utilization", L(engine=e))] <= 1
        eng.resume()
        eng.join(30)
        after, _ = samples(cprom.metrics_text(eng))
        assert after[("catzilla_tasks_tasks_succeeded_total", L(engine=e))] == 27  # counters only grow
    finally:
        eng.shutdown(wait_for_completion=False, timeout=10)


def test_register_several_engines_in_one_registry_and_unregister():
    reg = CollectorRegistry()
    a, b = fake_stats("engine-a"), fake_stats("engine-b")
    a_fn, b_fn = (lambda: a), (lambda: b)
    col = cprom.register(a_fn, reg)
    assert cprom.register(b_fn, reg) is col
    assert cprom.register(a_fn, reg) is col  # registering twice does not duplicate series
    values, _ = samples(generate_latest(reg))
    assert values[("catzilla_tasks_tasks_submitted_total", L(engine="engine-a"))] == 123
    assert values[("catzilla_tasks_tasks_submitted_total", L(engine="engine-b"))] == 123
    assert sum(1 for n, _ in values if n == "catzilla_tasks_tasks_submitted_total") == 2
    # read at scrape time: a change shows at the next scrape
    a["totals"]["submitted"] = 124
    values, _ = samples(generate_latest(reg))
    assert values[("catzilla_tasks_tasks_submitted_total", L(engine="engine-a"))] == 124
    assert cprom.unregister(a_fn, reg) is True
    assert cprom.unregister(a_fn, reg) is False
    values, _ = samples(generate_latest(reg))
    assert {dict(lbl)["engine"] for _, lbl in values} == {"engine-b"}
    assert cprom.unregister(b_fn, reg) is True
    assert generate_latest(reg) == b""
    # a registry left empty accepts a new registration
    cprom.register(b_fn, reg)
    assert samples(generate_latest(reg))[0]


def test_register_uses_the_default_registry():
    from prometheus_client import REGISTRY

    st = fake_stats("default-registry-engine")
    fn = lambda: st  # noqa: E731
    cprom.register(fn)
    try:
        values, _ = samples(generate_latest(REGISTRY))
        assert values[("catzilla_tasks_tasks_rejected_total", L(engine="default-registry-engine"))] == 9
    finally:
        assert cprom.unregister(fn) is True
    values, _ = samples(generate_latest(REGISTRY))
    assert not any(dict(lbl).get("engine") == "default-registry-engine" for _, lbl in values)


def test_a_broken_engine_does_not_break_the_scrape(caplog):
    good = fake_stats("good")

    def broken():
        raise RuntimeError("engine gone")

    reg = CollectorRegistry()
    cprom.register(broken, reg)
    cprom.register(lambda: good, reg)
    values, _ = samples(generate_latest(reg))
    assert {dict(lbl)["engine"] for _, lbl in values} == {"good"}
    assert "engine gone" in caplog.text


def test_accepts_an_engine_a_monitor_or_a_function_and_nothing_else():
    eng = BackgroundTasks(workers=2, enable_auto_scaling=False, name="sources")
    try:
        for source in (eng, eng.monitor, eng.monitor.get_stats):
            assert b'catzilla_tasks_tasks_submitted_total{engine="sources"} 0.0' in cprom.metrics_text(source)
    finally:
        eng.shutdown()
    with pytest.raises(TypeError, match="BackgroundTasks"):
        cprom.metrics_text(42)


def test_label_values_are_escaped():
    st = fake_stats('we"ird\\name\n')
    values, _ = samples(cprom.metrics_text(lambda: copy.deepcopy(st)))
    assert values[("catzilla_tasks_tasks_submitted_total", L(engine='we"ird\\name\n'))] == 123


def test_missing_prometheus_client_is_a_clear_import_error(monkeypatch):
    import catzilla_tasks

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # makes `import prometheus_client` fail
    for mod in [m for m in sys.modules if m.startswith("prometheus_client.")]:
        monkeypatch.setitem(sys.modules, mod, None)
    monkeypatch.delitem(sys.modules, "catzilla_tasks.prometheus")
    monkeypatch.delattr(catzilla_tasks, "prometheus", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'catzilla-tasks\[prometheus\]'"):
        importlib.import_module("catzilla_tasks.prometheus")
