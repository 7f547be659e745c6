"""TaskMonitor: the engine's live figures in the seed's four groups, and AutoScaler.

Every figure comes from the C engine: queue sizes and counters are atomics, execution time and
queue wait come from per-worker log-linear histograms, throughput from per-worker per-second
counters, worker time from per-worker busy / GIL-wait clocks and the threads' CPU clocks.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import TYPE_CHECKING, Any

from . import _engine

if TYPE_CHECKING:
    from .engine import BackgroundTasks

__all__ = ["TaskMonitor", "AutoScaler"]

log = logging.getLogger("catzilla_tasks.scaling")

RATE_WINDOW_S = 5  # tasks_per_second: the last 5 seconds (the current one pro rata)
HANDLE_BYTES = sys.getsizeof(_engine.detached())  # a TaskResult handle next to each node (GC header included)


def _percentile(hist: dict[str, Any], bounds_ns: list[int], q: float) -> float | None:
    """q-quantile in ms, interpolated inside its histogram bucket."""
    n = hist["n"]
    if not n:
        return None
    rank = q * n
    seen = 0
    lower = 0
    for count, upper in zip(hist["counts"], bounds_ns, strict=False):  # the loop may stop early
        if count and seen + count >= rank:
            frac = (rank - seen) / count
            return (lower + frac * (upper - lower)) / 1e6
        seen += count
        lower = upper
    return bounds_ns[-1] / 1e6


def _cumulative(hist: dict[str, Any], bounds_ns: list[int]) -> dict[str, Any]:
    buckets = []
    total = 0
    last = max((i for i, c in enumerate(hist["counts"]) if c), default=-1)
    for i, (count, upper) in enumerate(zip(hist["counts"], bounds_ns, strict=False)):
        if i > last + 1:
            break
        total += count
        buckets.append((upper / 1e9, total))
    return {"buckets": buckets, "sum": hist["sum_ns"] / 1e9, "count": hist["n"]}


class TaskMonitor:
    """Live figures of one engine: ``TaskMonitor(tasks).get_stats()`` (also ``tasks.monitor``)."""

    def __init__(self, engine: BackgroundTasks) -> None:
        self._engine = engine
        self._last: tuple[float, dict[int, float]] | None = None

    def _utilization(self, raw: dict[str, Any]) -> tuple[float, dict[int, float]]:
        now = time.monotonic()
        busy = {
            w["worker_id"]: w["busy_s"] + (w["current_task_ms"] / 1000 if w["busy"] else 0.0)
            for w in raw["workers"]
            if w["live"]
        }
        per: dict[int, float] = {}
        if self._last is not None and now - self._last[0] > 0.05:
            t0, prev = self._last
            for wid, b in busy.items():
                per[wid] = min(1.0, max(0.0, (b - prev.get(wid, b)) / (now - t0)))
        else:
            up = max(raw["uptime_s"], 1e-9)
            for wid, b in busy.items():
                per[wid] = min(1.0, b / up)
        self._last = (now, busy)
        avg = sum(per.values()) / len(per) if per else 0.0
        return avg, per

    def get_stats(self) -> dict[str, Any]:
        eng = self._engine
        st = eng._stats()
        raw = eng._monitor_raw()
        mem = _engine.memory_stats()
        bounds = raw["bounds_ns"]
        q = st["queued"]
        total_queued = st["queued_total"]
        live = raw["live_workers"]
        idle = min(raw["sleeping"], live)
        util, _ = self._utilization(raw)
        rate = raw["rate"]
        window = (RATE_WINDOW_S - 1) + raw["second_fraction"]
        window = min(window, max(raw["uptime_s"], 1e-3))
        tps = sum(rate[:RATE_WINDOW_S]) / window if window > 0 else 0.0
        ex, wt = raw["exec"], raw["wait"]
        finished = st["succeeded"] + st["failed"] + st["timed_out"]
        in_use = mem["nodes_in_use"] * (mem["node_size"] + HANDLE_BYTES)
        return {
            "queue_metrics": {
                "critical_queue_size": q[0],
                "high_queue_size": q[1],
                "normal_queue_size": q[2],
                "low_queue_size": q[3],
                "total_queued": total_queued,  # in_worker_batches included
                "in_worker_batches": st["batched"],  # taken by a worker, not started yet
                # memory_pool_mb: bytes the queued tasks' arguments hold (measured only with a cap)
                "queued_argument_bytes": st["queued_arg_bytes"],
                "memory_pool_bytes": st["memory_cap_bytes"] or None,
                "scheduled": st["scheduled"],
                "queue_pressure": total_queued / st["queue_size"],
            },
            "worker_metrics": {
                "active_workers": live - idle,
                "idle_workers": idle,
                "total_workers": live,
                "avg_worker_utilization": util,
            },
            "performance_metrics": {
                "tasks_per_second": tps,
                "avg_execution_time_ms": ex["sum_ns"] / ex["n"] / 1e6 if ex["n"] else None,
                "p95_execution_time_ms": _percentile(ex, bounds, 0.95),
                "p99_execution_time_ms": _percentile(ex, bounds, 0.99),
                "avg_queue_wait_ms": wt["sum_ns"] / wt["n"] / 1e6 if wt["n"] else None,
                "p95_queue_wait_ms": _percentile(wt, bounds, 0.95),
                "p99_queue_wait_ms": _percentile(wt, bounds, 0.99),
                "memory_usage_mb": mem["slab_bytes"] / 2**20,
                "memory_in_use_mb": in_use / 2**20,
                # free nodes held in threads' caches (the rest of memory_usage_mb is free for anyone)
                "memory_cached_mb": mem["nodes_cached"] * mem["node_size"] / 2**20,
                "memory_efficiency": (mem["nodes_in_use"] * mem["node_size"] / mem["slab_bytes"])
                if mem["slab_bytes"]
                else 1.0,
            },
            "error_metrics": {
                "failed_tasks": st["failed"],
                "retry_count": st["retried"],
                "timeout_count": st["timed_out"],
                "error_rate": (st["failed"] + st["timed_out"]) / finished if finished else 0.0,
            },
            "totals": {
                k: st[k] for k in ("submitted", "succeeded", "failed", "cancelled", "retried", "timed_out", "rejected")
            },
            "histograms": {
                "execution_time_seconds": _cumulative(ex, bounds),
                "queue_wait_seconds": _cumulative(wt, bounds),
            },
            "recent_failures": list(reversed(eng._failures)),
            "engine": {
                "name": eng.name,
                "uptime_s": raw["uptime_s"],
                "paused": st["paused"],
                "accepting": st["accepting"],
            },
        }

    def get_worker_details(self) -> list[dict[str, Any]]:
        raw = self._engine._monitor_raw()
        _, per = self._utilization(raw)
        out = []
        for w in raw["workers"]:
            if not w["live"]:
                continue
            busy = w["busy_s"]
            out.append(
                {
                    "worker_id": w["worker_id"],
                    "busy": w["busy"],
                    "current_task_ms": w["current_task_ms"],
                    "tasks_processed": w["processed"],
                    "tasks_stolen": w["stolen"],
                    "utilization": per.get(w["worker_id"], 0.0),
                    "busy_s": busy,
                    "gil_wait_s": w["gil_wait_s"],
                    "cpu_s": w["cpu_s"],
                }
            )
        return out

    def optimize_workers(self) -> dict[str, Any]:
        """Run one auto-scaling decision now (whether or not auto-scaling is on); returns it."""
        return self._engine.autoscaler.evaluate(apply=True)


def _runqueue_wait_s(tid: int) -> float:
    """Time the kernel kept this thread runnable but not running (preempted), in seconds."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


class AutoScaler:
    """Grows the pool when work waits because tasks block (I/O, sleep), shrinks it when idle.

    Decisions come from measurements over each tick: utilization (busy time / wall time of the
    live workers), the share of busy time tasks spent *blocked* (busy minus CPU time, minus time
    waiting for the GIL at batch start, minus time the kernel kept them runnable but preempted:
    what is left is sleeping or waiting on I/O), the CPU the workers use together (when they
    already keep about one core busy, the GIL is saturated and more threads cannot run more
    Python), and the ready backlog. So CPU-bound work never makes the pool grow. The ticks
    run on the engine's timer only while there is something to watch: a saturated worker arms
    the first one; an idle engine at ``min_workers`` has none.
    """

    def __init__(self, engine: BackgroundTasks, monitor: TaskMonitor | None = None) -> None:
        self._engine = engine
        self._monitor = monitor or TaskMonitor(engine)
        self.scale_up_threshold = 0.8
        self.scale_down_threshold = 0.2
        self.scale_factor = 1.5
        self.cooldown_seconds = 30.0
        self.interval_s = 0.1
        self.blocked_threshold = 0.5
        self.cpu_saturation = 0.75  # workers' CPU in cores at which the GIL is deemed saturated
        self.enabled = False
        self.decisions: list[dict[str, Any]] = []
        self._prev: tuple[float, dict[int, tuple[float, float, float, float]]] | None = None
        self._last_active = time.monotonic()

    def enable_auto_scaling(
        self,
        scale_up_threshold: float = 0.8,
        scale_down_threshold: float = 0.2,
        scale_factor: float = 1.5,
        cooldown_seconds: float = 30,
        *,
        interval_s: float = 0.1,
    ) -> None:
        for name, v in (("scale_up_threshold", scale_up_threshold), ("scale_down_threshold", scale_down_threshold)):
            if not 0 <= v <= 1:
                raise ValueError(f"{name}: must be between 0 and 1, got {v!r}")
        if scale_down_threshold >= scale_up_threshold:
            raise ValueError("scale_down_threshold must be below scale_up_threshold")
        if scale_factor <= 1:
            raise ValueError(f"scale_factor: must be > 1, got {scale_factor!r}")
        if cooldown_seconds < 0 or interval_s <= 0:
            raise ValueError("cooldown_seconds must be >= 0 and interval_s > 0")
        self.scale_up_threshold = scale_up_threshold
        self.scale_down_threshold = scale_down_threshold
        self.scale_factor = scale_factor
        self.cooldown_seconds = float(cooldown_seconds)
        self.interval_s = interval_s
        self.enabled = True
        self._engine._scaler(True, interval_s, self._tick)

    def disable(self) -> None:
        self.enabled = False
        self._engine._scaler(False, self.interval_s, None)

    def _tick(self) -> None:
        keep = False
        try:
            keep = self.evaluate(apply=True)["keep_watching"]
        finally:
            self._engine._scaler_rearm(keep and self.enabled)

    @staticmethod
    def _measure(
        prev: tuple[float, dict[int, tuple[float, float, float, float]]],
        now: float,
        cur: dict[int, tuple[float, float, float, float]],
        live: int,
    ) -> tuple[float, float, float]:
        """Utilization, blocked share and CPU cores of the workers since the baseline prev."""
        t0, base = prev
        dt = now - t0
        d_busy = d_gil = d_cpu = d_rq = 0.0
        for wid, (b, g, c, r) in cur.items():
            pb, pg, pc, pr = base.get(wid, (b, g, c, r))
            d_busy += max(0.0, b - pb)
            d_gil += max(0.0, g - pg)
            d_cpu += max(0.0, c - pc)
            d_rq += max(0.0, r - pr)
        util = min(1.0, d_busy / (dt * max(live, 1)))
        blocked = max(0.0, d_busy - d_gil - d_cpu - d_rq) / d_busy if d_busy > 0 else 0.0
        return util, blocked, d_cpu / dt

    def evaluate(self, apply: bool = True) -> dict[str, Any]:
        eng = self._engine
        raw = eng._monitor_raw()
        st = eng._stats()
        now = time.monotonic()
        cur = {}
        for w in raw["workers"]:
            if w["live"]:
                busy = w["busy_s"] + (w["current_task_ms"] / 1000 if w["busy"] else 0.0)
                cur[w["worker_id"]] = (busy, w["gil_wait_s"], max(w["cpu_s"], 0.0), _runqueue_wait_s(w["tid"]))
        live = raw["live_workers"]
        backlog = max(0, st["queued_total"] - st["scheduled"])
        util = blocked = cores = 0.0
        if self._prev is not None and now - self._prev[0] < self.interval_s / 2:
            # Too short a window to measure (the tick that wakes the scaler comes at once after
            # it stood down): no decision, and the older baseline stays for the next tick.
            pass
        else:
            if self._prev is not None:
                util, blocked, cores = self._measure(self._prev, now, cur, live)
            self._prev = (now, cur)
        if backlog > 0 or util > self.scale_down_threshold:
            self._last_active = now
        lo, hi = eng.min_workers, eng.max_workers
        decision: dict[str, Any] = {
            "at": time.time(),
            "workers": live,
            "utilization": round(util, 3),
            "blocked": round(blocked, 3),
            "cpu_cores": round(cores, 3),
            "backlog": backlog,
            "action": "none",
        }
        if (
            backlog > 0
            and util >= self.scale_up_threshold
            and blocked >= self.blocked_threshold
            and cores < self.cpu_saturation
            and live < hi
        ):
            target = min(hi, max(live + 1, math.ceil(live * self.scale_factor)))
            decision.update(
                action="up",
                target=target,
                reason=f"{backlog} tasks wait, workers {util:.0%} busy and {blocked:.0%} of that blocked "
                f"(using {cores:.2f} cores)",
            )
        elif backlog == 0 and live > lo and now - self._last_active >= self.cooldown_seconds:
            target = max(lo, math.floor(live / self.scale_factor))
            decision.update(
                action="down",
                target=target,
                reason=f"idle for {now - self._last_active:.1f} s (utilization {util:.0%})",
            )
        if apply and decision["action"] != "none":
            if decision["action"] == "up":
                for _ in range(decision["target"] - live):
                    if not eng._add_worker():
                        break
            else:
                for _ in range(live - decision["target"]):
                    if not eng._retire_worker():
                        break
            log.debug(
                "auto-scaling %s: %d -> %d workers: %s",
                decision["action"],
                live,
                decision["target"],
                decision["reason"],
            )
            self.decisions.append(decision)
            del self.decisions[:-100]
        decision["keep_watching"] = backlog > 0 or eng._stats()["workers"] > lo
        return decision
