"""The read side of the cluster: what every worker published, and what the queues hold.

``ClusterView(url_or_broker)`` reads Redis (only ``redrive`` changes a queue); the CLI commands
(``workers``, ``queues``, ``inspect``), the Prometheus exporter and the dashboard use it:

* :meth:`ClusterView.workers`: every registered worker with its figures and ``state``
  (``"alive"``, or ``"lost"`` when its last beat is older than ``LOST_AFTER_BEATS`` of its
  intervals) and ``pending``: the tasks Redis holds for it (a lost worker's are those the live
  workers' reclaim moves once they are idle past the visibility timeout);
* :meth:`ClusterView.queues`: per queue and priority: queued (not yet read), delayed (waiting
  for their time or a retry), in flight (read, not acknowledged) and dead letters;
* :meth:`ClusterView.task_names`: per task name across the workers: outcome counts, the rate
  (tasks finished per second, over the alive workers' last beat), run-time and queue-wait
  percentiles from the merged histograms, the latest failures;
* :meth:`ClusterView.inspect`: one task by id (its result, or where it waits);
* :meth:`ClusterView.dead_letters`: a queue's dead letters, newest first, and
  :meth:`ClusterView.redrive` to put them back in their queue, and :meth:`ClusterView.cancel`
  (the two methods that write).

Queues are found in the registry (every queue a registered worker serves) and by a SCAN of the keys that
look like a queue's (``P:<queue>:q0`` ... ``P:<queue>:dead``), so a queue that only producers
have used shows too. The depths per priority of the delayed set and of the dead letters are
counted by a read-only script in slices (``SCAN_SLICE`` members per call), so a big set never
blocks Redis for long.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any, cast

from .._redact import redact_text, redact_url
from ..config import RESERVED_QUEUE_NAMES, TaskPriority
from . import scripts
from .registry import LOST_AFTER_BEATS, cluster_key, merge, percentile

__all__ = ["ClusterView"]

SCAN_SLICE = 2000  # members or entries one script call reads
_PRIORITIES = [p.name.lower() for p in TaskPriority]  # by index: critical, high, normal, low
_QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99))
# the second part of keys under the prefix that are not a queue's (redis._KEY_KINDS)
_NOT_QUEUES = RESERVED_QUEUE_NAMES
# kinds of key under a queue's name that are not its streams or delayed set, though they may end
# like one: P:<queue>:cp:<limit> is a sorted set of tasks parked by a concurrency limit
# (ratelimit.py), its limit key perhaps "delayed"
_NOT_QUEUE_PARTS = ("cp",)
_STREAM_SUFFIXES = ("q0", "q1", "q2", "q3", "dead")


def _s(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _num(v: Any, kind: type = int) -> Any:
    """A number read from Redis (bytes, str or a JSON number), None unless it is a finite one
    (what strict JSON carries: the ``--json`` output and the dashboard's)."""
    try:
        x = kind(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else kind(_s(v))
    except (TypeError, ValueError, OverflowError):
        return None
    return x if kind is not float or math.isfinite(x) else None


# The registry is read back as found: an entry written by another version of the worker, by
# another program under the same prefix or by hand may hold anything, and one such entry must
# not take the whole view (every worker, the dashboard, the exporter) down with it. The shapes
# below are what Heartbeat.fields writes; what does not fit is left out.
def _hist(v: Any) -> dict[int, int]:
    out: dict[int, int] = {}
    if isinstance(v, dict):
        for k, c in v.items():
            i, n = _num(k), _num(c)
            if i is not None and n is not None and 0 <= i < 1 << 16 and n > 0:
                out[i] = n
    return out


def _task_figures(v: Any) -> dict[str, Any] | None:
    if not isinstance(v, dict):
        return None
    return {
        "succeeded": _num(v.get("succeeded")) or 0,
        "failed": _num(v.get("failed")) or 0,
        "retried": _num(v.get("retried")) or 0,
        "rate": _num(v.get("rate"), float) or 0.0,
        "run": _hist(v.get("run")),
        "run_sum_ns": _num(v.get("run_sum_ns")) or 0,
        "wait": _hist(v.get("wait")),
        "wait_sum_ns": _num(v.get("wait_sum_ns")) or 0,
    }


def _json_field(f: dict[str, str], key: str) -> Any:
    try:
        return json.loads(f.get(key) or "null")
    except ValueError:
        return None


def _read_tasks(v: Any) -> dict[str, Any]:
    out = {}
    if isinstance(v, dict):
        for name, t in v.items():
            figures = _task_figures(t)
            if figures is not None:
                out[str(name)] = figures
    return out


def _read_engine(v: Any) -> dict[str, Any]:
    out = {}
    if isinstance(v, dict):
        for key in ("exec", "wait"):
            h = v.get(key)
            if isinstance(h, dict):
                out[key] = {"counts": _hist(h.get("counts")), "sum_ns": _num(h.get("sum_ns")) or 0}
    return out


def _read_error(v: Any) -> dict[str, Any] | None:
    """One failure record (Heartbeat.beat's JSON), None if it is not one."""
    if not isinstance(v, dict):
        return None
    out = dict(v)
    out["at"] = _num(v.get("at"), float)
    for k in ("error", "traceback", "task", "task_id"):
        if k in out and not isinstance(out[k], str):
            out[k] = "" if out[k] is None else str(out[k])
    return out


def _glob_escape(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


def _latency(hist: dict[int, int], sum_ns: int) -> dict[str, Any]:
    n = sum(hist.values())
    out: dict[str, Any] = {"samples": n, "mean": sum_ns / n / 1e9 if n else None}
    for label, q in _QUANTILES:
        out[label] = percentile(hist, q)
    return out


def _empty_name() -> dict[str, Any]:
    return {"succeeded": 0, "failed": 0, "retried": 0, "rate": 0.0, "run": [], "wait": [], "rs": 0, "ws": 0, "n": 0}


class ClusterView:
    """Read the cluster registry and the queues of a Redis broker.

    ``source``: a ``redis://`` URL (then ``prefix`` and ``serializer``/``allow_pickle`` say how
    to read it; ``client_options`` go to redis-py) or a :class:`RedisBroker`, whose client,
    prefix and serializer are used.
    """

    def __init__(
        self,
        source: Any,
        *,
        prefix: str = "catzilla",
        serializer: str = "msgpack",
        allow_pickle: bool = False,
        **client_options: Any,
    ) -> None:
        from .redis import RedisBroker

        if isinstance(source, RedisBroker):
            self.broker = source
            self._own = False
        elif isinstance(source, str):
            self.broker = RedisBroker(
                source, prefix=prefix, serializer=serializer, allow_pickle=allow_pickle, **client_options
            )
            self._own = True
        else:
            raise TypeError(f"ClusterView: expected a redis:// URL or a RedisBroker, got {type(source).__name__}")
        self.prefix: str = self.broker.prefix
        self.r = self.broker.redis
        self._scan_stream = self.r.register_script(scripts.SCAN_STREAM)
        self._scan_delayed = self.r.register_script(scripts.SCAN_DELAYED)

    def close(self) -> None:
        if self._own:
            self.broker.close()

    def __enter__(self) -> ClusterView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ClusterView {redact_url(self.broker.url)} prefix={self.prefix!r}>"

    # -- keys ------------------------------------------------------------------------------
    def _keys(self, queue: str) -> tuple[list[str], str, str]:
        """A queue's priority streams, delayed set and dead-letter stream (redis.py's layout)."""
        base = f"{self.prefix}:{queue}"
        return [f"{base}:q{p}" for p in range(4)], f"{base}:delayed", f"{base}:dead"

    # -- workers ---------------------------------------------------------------------------
    def _raw_workers(self) -> list[dict[str, Any]]:
        zkey = cluster_key(self.prefix, "workers")
        pipe = self.r.pipeline(transaction=False)
        pipe.zrange(zkey, 0, -1, withscores=True)
        pipe.time()  # (the beats are in Redis's clock: a host whose clock is off is judged rightly)
        members, (sec, usec) = cast("tuple[list[tuple[bytes, float]], tuple[int, int]]", pipe.execute())
        if not members:
            return []
        now = int(sec) + int(usec) / 1e6
        pipe = self.r.pipeline(transaction=False)
        for m, _ in members:
            pipe.hgetall(cluster_key(self.prefix, "worker", _s(m)))
        out = []
        gone = []
        for (m, score), h in zip(members, pipe.execute(raise_on_error=False), strict=True):
            if isinstance(h, Exception):  # not a hash (not a worker's entry): not one to show
                continue
            if not h:  # expired (lost long ago) or deregistered meanwhile
                gone.append(m)
                continue
            f = {_s(k): _s(v) for k, v in h.items()}
            interval = _num(f.get("interval"), float)
            interval = interval if interval is not None and interval > 0 else 2.0
            last = _num(f.get("last_seen"), float)
            last = last if last is not None else (score / 1000 if math.isfinite(score) else 0.0)
            tasks = _read_tasks(_json_field(f, "tasks"))
            engine = _read_engine(_json_field(f, "engine"))
            queues = _json_field(f, "queues")
            queues = [q for q in queues if isinstance(q, str)] if isinstance(queues, list) else []
            weights = _json_field(f, "weights")
            weights = (
                {str(q): n for q, n in ((q, _num(n)) for q, n in weights.items()) if n is not None}
                if isinstance(weights, dict)
                else {}
            )
            out.append(
                {
                    "id": f.get("id") or _s(m),
                    "host": f.get("host", ""),
                    "pid": _num(f.get("pid")),
                    "queues": queues,
                    "weights": weights,
                    "concurrency": _num(f.get("concurrency")),
                    "in_flight": _num(f.get("in_flight")),
                    "processed": _num(f.get("processed")) or 0,
                    "succeeded": _num(f.get("succeeded")) or 0,
                    "failed": _num(f.get("failed")) or 0,
                    "retried": _num(f.get("retried")) or 0,
                    "reclaimed": _num(f.get("reclaimed")) or 0,
                    "rss_bytes": _num(f.get("rss_bytes")),
                    "started": _num(f.get("started"), float),
                    "last_seen": last,
                    "interval": interval,
                    "state": "alive" if now - last <= LOST_AFTER_BEATS * interval else "lost",
                    "version": f.get("version", ""),
                    "_tasks": tasks,
                    "_engine": engine,
                }
            )
        if gone:
            self.r.zrem(zkey, *gone)
        return out

    def _pending_by_consumer(self, queues: list[str]) -> dict[str, int]:
        import redis

        pipe = self.r.pipeline(transaction=False)
        n = 0
        for q in queues:
            for s in self._keys(q)[0]:
                pipe.xinfo_consumers(s, "workers")
                n += 1
        out: dict[str, int] = {}
        for reply in pipe.execute(raise_on_error=False) if n else []:
            if isinstance(reply, redis.ResponseError):  # no such stream or group yet
                continue
            for c in reply:
                name = _s(c.get("name", b""))
                out[name] = out.get(name, 0) + int(c.get("pending", 0))
        return out

    def workers(self) -> list[dict[str, Any]]:
        """Every registered worker, alive ones first, each a dict: id, host, pid, queues (those
        it consumes), weights (``{queue: weight}`` of a worker of several queues, else empty),
        concurrency, in_flight, processed (every finished task, failed ones included),
        succeeded, failed, retried, reclaimed, rss_bytes, started and last_seen (epoch
        seconds), interval, state (alive/lost), pending, version, and tasks (per task name:
        succeeded, failed, retried, rate)."""
        ws = self._raw_workers()
        queues = sorted({q for w in ws for q in w["queues"]})
        pending = self._pending_by_consumer(queues) if ws else {}
        for w in ws:
            w["pending"] = pending.get(w["id"], 0)
            w["tasks"] = {
                name: {k: t.get(k, 0) for k in ("succeeded", "failed", "retried", "rate")}
                for name, t in w.pop("_tasks").items()
            }
            del w["_engine"]
        ws.sort(key=lambda w: (w["state"] != "alive", w["host"], w["id"]))
        return ws

    # -- queues ----------------------------------------------------------------------------
    def queue_names(self, scan: bool = True) -> list[str]:
        """Queues the registered workers serve, and (``scan``) those whose keys exist."""
        names = {q for w in self._raw_workers() for q in w["queues"]}
        if scan:
            pat = _glob_escape(self.prefix) + ":*"
            start = len(self.prefix) + 1
            for kind, suffixes in (("stream", _STREAM_SUFFIXES), ("zset", ("delayed",))):
                for key in self.r.scan_iter(match=pat, count=1000, _type=kind):
                    queue, _, suffix = _s(key)[start:].rpartition(":")
                    parts = queue.split(":")
                    if (
                        queue
                        and suffix in suffixes
                        and parts[0] not in _NOT_QUEUES
                        and not any(p in _NOT_QUEUE_PARTS for p in parts[1:])
                    ):
                        names.add(queue)
        return sorted(names)

    def _count_delayed(self, key: str) -> list[int]:
        n = [0, 0, 0, 0]
        start = 0
        while True:
            got = self._scan_delayed(keys=[key], args=[start, SCAN_SLICE, "count"])
            for i in range(4):
                n[i] += int(got[i + 1])
            if int(got[0]) < SCAN_SLICE:
                return n
            start += SCAN_SLICE

    def _count_dead(self, key: str) -> list[int]:
        n = [0, 0, 0, 0]
        start = "-"
        while True:
            got = self._scan_stream(keys=[key], args=[start, SCAN_SLICE, "count"])
            for i in range(4):
                n[i] += int(got[i + 1])
            if not got[0] or sum(int(x) for x in got[1:]) < SCAN_SLICE:
                return n
            start = "(" + _s(got[0])

    def queues(self, names: list[str] | None = None) -> list[dict[str, Any]]:
        """One row per queue and priority (critical, high, normal, low): queued (in the
        stream, not yet read by a worker), delayed (in the delayed set: a ``delay_ms`` or a
        retry's back-off), in_flight (read by a worker, not acknowledged) and dead_letters."""
        import redis

        names = self.queue_names() if names is None else names
        pipe = self.r.pipeline(transaction=False)
        for q in names:
            streams, _, _ = self._keys(q)
            for s in streams:
                pipe.xlen(s)
                pipe.xpending(s, "workers")
        replies = pipe.execute(raise_on_error=False)
        rows = []
        for qi, q in enumerate(names):
            _, delayed_key, dead_key = self._keys(q)
            delayed = self._count_delayed(delayed_key)
            dead = self._count_dead(dead_key)
            for p in range(4):
                length, pend = replies[qi * 8 + 2 * p], replies[qi * 8 + 2 * p + 1]
                length = 0 if isinstance(length, Exception) else int(length)
                in_flight = 0 if isinstance(pend, redis.ResponseError) else int(pend.get("pending", 0))
                rows.append(
                    {
                        "queue": q,
                        "priority": _PRIORITIES[p],
                        # (an entry stays in the stream until its outcome is committed: XACK + XDEL)
                        "queued": max(0, length - in_flight),
                        "delayed": delayed[p],
                        "in_flight": in_flight,
                        "dead_letters": dead[p],
                    }
                )
        return rows

    # -- task names ------------------------------------------------------------------------
    def task_names(self, errors: int = 5) -> list[dict[str, Any]]:
        """Per task name across the registered workers: succeeded, failed, retried, processed
        (succeeded + failed), rate (tasks finished per second, alive workers, last beat), run
        and wait (``samples``, ``mean``, ``p50``, ``p90``, ``p95``, ``p99`` in seconds, from the
        merged histograms), run_histogram and wait_histogram (``{bucket: count}``, the engine's
        layout: registry.bucket_upper_ns), workers (how many ran it) and the latest ``errors``
        failures (newest first)."""
        ws = self._raw_workers()
        acc: dict[str, dict[str, Any]] = {}
        for w in ws:
            alive = w["state"] == "alive"
            for name, t in w["_tasks"].items():
                a = acc.setdefault(name, _empty_name())
                for k in ("succeeded", "failed", "retried"):
                    a[k] += int(t.get(k, 0))
                if alive:
                    a["rate"] += float(t.get("rate", 0.0))
                a["run"].append(t.get("run", {}))
                a["wait"].append(t.get("wait", {}))
                a["rs"] += int(t.get("run_sum_ns", 0))
                a["ws"] += int(t.get("wait_sum_ns", 0))
                a["n"] += 1
        failed_names = [_s(n) for n in cast("list[bytes]", self.r.zrange(cluster_key(self.prefix, "errors"), 0, -1))]
        names = sorted(set(acc) | set(failed_names))
        pipe = self.r.pipeline(transaction=False)
        for name in names:
            pipe.lrange(cluster_key(self.prefix, "errors", name), 0, max(0, errors - 1))
        latest = pipe.execute(raise_on_error=False) if names and errors > 0 else [[] for _ in names]
        out = []
        for name, errs in zip(names, latest, strict=True):
            a = acc.get(name) or _empty_name()
            run, wait = merge(a["run"]), merge(a["wait"])
            items = []
            for e in errs if isinstance(errs, list) else ():  # (not a list: not the registry's key)
                try:
                    item = _read_error(json.loads(e))
                except ValueError:
                    continue
                if item is not None:
                    items.append(item)
            out.append(
                {
                    "name": name,
                    "succeeded": a["succeeded"],
                    "failed": a["failed"],
                    "retried": a["retried"],
                    "processed": a["succeeded"] + a["failed"],
                    "rate": round(a["rate"], 3),
                    "workers": a["n"],
                    "run": _latency(run, a["rs"]),
                    "wait": _latency(wait, a["ws"]),
                    "run_histogram": run,
                    "wait_histogram": wait,
                    "errors": items,
                }
            )
        return out

    def totals(self) -> dict[str, Any]:
        """Across the registered workers: alive and lost, processed, failed, rate, and the run
        time and engine queue wait of every task from the workers' own C histograms (exact, all
        task names together; the wait there is the local engine's, after the fetch)."""
        ws = self._raw_workers()
        run = merge(w["_engine"].get("exec", {}).get("counts", {}) for w in ws)
        wait = merge(w["_engine"].get("wait", {}).get("counts", {}) for w in ws)
        alive = [w for w in ws if w["state"] == "alive"]
        return {
            "workers_alive": len(alive),
            "workers_lost": len(ws) - len(alive),
            "processed": sum(w["processed"] for w in ws),
            "failed": sum(w["failed"] for w in ws),
            "rate": round(sum(float(t.get("rate", 0)) for w in alive for t in w["_tasks"].values()), 3),
            "run": _latency(run, sum(int(w["_engine"].get("exec", {}).get("sum_ns", 0)) for w in ws)),
            "engine_wait": _latency(wait, sum(int(w["_engine"].get("wait", {}).get("sum_ns", 0)) for w in ws)),
        }

    # -- dead letters ----------------------------------------------------------------------
    def dead_letters(self, queue: str | None = None, count: int = 100) -> list[dict[str, Any]]:
        """The newest ``count`` dead letters of ``queue`` (default: the broker's), newest first:
        id, task_id, name, error (redacted), priority, at (epoch seconds), worker."""
        import redis

        _, _, dead_key = self._keys(queue or self.broker.queue)
        try:
            entries = cast("list[tuple[bytes, dict[bytes, bytes]]]", self.r.xrevrange(dead_key, count=count))
        except redis.ResponseError as exc:  # a key of another type: none of ours (queues() counts none)
            if not str(exc).startswith("WRONGTYPE"):
                raise
            entries = []
        out = []
        for eid, fields in entries:
            f = {_s(k): v for k, v in fields.items()}
            p = _num(f.get("p"))
            out.append(
                {
                    "id": _s(eid),
                    "task_id": _s(f.get("i", b"")),
                    "name": _s(f.get("n", b"")),
                    "error": redact_text(_s(f.get("e", b""))),
                    "priority": _PRIORITIES[p] if p in (0, 1, 2, 3) else "normal",
                    "at": (_num(f.get("t")) or 0) / 1000,
                    "worker": _s(f.get("w", b"")),
                }
            )
        return out

    def redrive(self, queue: str, ids: list[str] | None = None) -> int:
        """Put dead letters of ``queue`` back in its streams (all when ``ids`` is None; see
        ``RedisBroker.redrive``); returns how many were moved. (The one method here that
        changes a queue: for the dashboard's re-drive.) A key of another type under the
        dead-letter stream's name holds none: 0."""
        if _s(self.r.type(self._keys(queue)[2])) not in ("stream", "none"):
            return 0
        b = self.broker
        if queue == b.queue:
            return b.redrive(ids)
        other = self._queue_broker(queue)
        try:
            return other.redrive(ids)
        finally:
            other.close()

    def cancel(self, task_id: str, queue: str | None = None) -> bool:
        """Cancel a task by id (see ``RedisBroker.cancel``) in ``queue``; by default the queue
        :meth:`inspect` finds it waiting in, else the broker's. True if this call cancelled
        it, False if it had already ended. (Writes, as ``redrive``: for the dashboard.)"""
        if not isinstance(task_id, str) or not task_id:
            raise ValueError(f"task_id: expected a non-empty string, got {task_id!r}")
        if queue is None:
            found = self.inspect(task_id)
            queue = found.get("queue") if isinstance(found.get("queue"), str) else None
        b = self.broker
        if queue is None or queue == b.queue:
            return b.cancel(task_id)
        other = self._queue_broker(queue)
        try:
            return other.cancel(task_id)
        finally:
            other.close()

    def _queue_broker(self, queue: str) -> Any:
        """A broker like this view's, on ``queue`` (to be closed by the caller)."""
        from .redis import RedisBroker

        b = self.broker
        return RedisBroker(
            b.url,
            queue=queue,
            prefix=b.prefix,
            serializer=b.serializer.name,
            allow_pickle=b.serializer.allow_pickle,
            result_ttl=b.result_ttl,
        )

    # -- one task --------------------------------------------------------------------------
    def inspect(self, task_id: str, scan_limit: int = 1_000_000) -> dict[str, Any]:
        """What is known of one task: ``task_id``, ``name``, ``status`` and, once it ended,
        ``result`` or ``error`` (type, message, traceback; redacted). A task without a stored
        outcome is looked for in the queues (at most ``scan_limit`` entries per key): status
        ``queued``, ``in_flight`` (with the ``worker`` holding it), ``delayed`` (with ``due``)
        or ``dead`` (its dead letter's error); ``unknown`` when it is nowhere (never
        published, or its result expired). ``progress`` (``{"fraction", "message"}``): the task's
        last ``set_progress()`` report, when it made one."""
        if not isinstance(task_id, str) or not task_id:
            raise ValueError(f"task_id: expected a non-empty string, got {task_id!r}")
        from .protocol import CODE_STATUS, MSG_NAME

        b = self.broker
        info: dict[str, Any] = {"task_id": task_id, "name": None, "status": "unknown"}
        progress = b.result(task_id).progress  # (RemoteResult: P:p:<task id>, see progress.py)
        if progress is not None:
            info["progress"] = {"fraction": progress.fraction, "message": progress.message}
        raw = cast("bytes | None", self.r.lindex(b.result_key(task_id), 0))
        if raw is not None:
            try:
                rec = b.serializer.loads(raw)
                code, value = rec[0], rec[1]
            except Exception as exc:
                info.update(status="unreadable", error={"type": type(exc).__name__, "message": redact_text(str(exc))})
                return info
            if len(rec) > 2 and isinstance(rec[2], str):  # (workers write the name there)
                info["name"] = rec[2]
            status = CODE_STATUS.get(code)
            info["status"] = status.name.lower() if status is not None else "failed"
            if code == 0:
                info["result"] = value
            else:
                enc = value if isinstance(value, list) else ["Error", str(value), ""]
                info["error"] = {
                    "type": _s(enc[0]) if enc else "Error",
                    "message": redact_text(str(enc[1]) if len(enc) > 1 else ""),
                    "traceback": redact_text(str(enc[2] or "") if len(enc) > 2 else ""),
                }
            return info
        for q in self.queue_names():
            streams, delayed_key, dead_key = self._keys(q)
            found = self._find(task_id, streams, delayed_key, dead_key, scan_limit, MSG_NAME)
            if found is not None:
                where, extra = found
                info.update(extra, status=where, queue=q)
                break
        return info

    def _decode_id(self, payload: bytes, task_id: str, name_at: int) -> str | None:
        """The task name of ``payload`` if it is the message of ``task_id``."""
        try:
            msg = self.broker.serializer.loads(payload)
        except Exception:
            return None
        if isinstance(msg, list) and len(msg) > name_at and msg[0] == task_id:
            return str(msg[name_at])
        return None

    def _slices(self, key: str, task_id: str, limit: int) -> Iterator[bytes]:
        start = "-"
        read = 0
        while read < limit:
            got = self._scan_stream(keys=[key], args=[start, SCAN_SLICE, "find", task_id])
            yield from got[1:]
            if not got[0]:
                return
            read += SCAN_SLICE
            start = "(" + _s(got[0])

    def _find(
        self, task_id: str, streams: list[str], delayed_key: str, dead_key: str, limit: int, name_at: int
    ) -> tuple[str, dict[str, Any]] | None:
        import redis

        for p, s in enumerate(streams):
            for eid in self._slices(s, task_id, limit):
                entries = cast("list[tuple[bytes, dict[bytes, bytes]]]", self.r.xrange(s, min=eid, max=eid))
                if not entries:
                    continue
                name = self._decode_id(entries[0][1].get(b"m", b""), task_id, name_at)
                if name is None:
                    continue
                try:
                    rows = self.r.xpending_range(s, "workers", min=eid, max=eid, count=1)
                except redis.ResponseError as exc:  # no worker has read this queue yet: no group
                    if not str(exc).startswith("NOGROUP"):
                        raise
                    rows = []
                extra: dict[str, Any] = {"name": name, "priority": _PRIORITIES[p], "entry_id": _s(eid)}
                if rows:
                    extra["worker"] = _s(rows[0]["consumer"])
                    extra["deliveries"] = int(rows[0]["times_delivered"])
                    return "in_flight", extra
                return "queued", extra
        start = 0
        while start < limit:
            got = self._scan_delayed(keys=[delayed_key], args=[start, SCAN_SLICE, "find", task_id])
            for i in range(1, len(got), 2):
                member, score = got[i], got[i + 1]
                name = self._decode_id(member[1:], task_id, name_at)
                if name is not None:
                    p = member[0] - 48
                    return "delayed", {
                        "name": name,
                        "priority": _PRIORITIES[p] if 0 <= p <= 3 else "normal",
                        "due": int(score) / 1000,
                    }
            if int(got[0]) < SCAN_SLICE:
                break
            start += SCAN_SLICE
        for eid in self._slices(dead_key, task_id, limit):
            entries = cast("list[tuple[bytes, dict[bytes, bytes]]]", self.r.xrange(dead_key, min=eid, max=eid))
            if not entries:
                continue
            f = entries[0][1]
            if _s(f.get(b"i", b"")) != task_id and self._decode_id(f.get(b"m", b""), task_id, name_at) is None:
                continue
            text = redact_text(_s(f.get(b"e", b"")))
            kind, _, rest = text.partition(": ")
            message, _, tb = rest.partition("\n")
            return "dead", {
                "name": _s(f.get(b"n", b"")) or None,
                "dead_letter_id": _s(eid),
                "error": {"type": kind, "message": message, "traceback": tb},
            }
        return None
