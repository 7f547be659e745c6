"""A consumer loop written against the broker interface only (:class:`.base.FetchingBroker`).

``Consumer(tasks, broker).start()`` fetches up to its free capacity, runs each task on the
engine's local workers (retries and timeouts as the task's config says, as in-process), and
commits each outcome: the result record, or the dead letter of a task that failed for good, a
message that cannot be decoded or names no registered task. It runs the in-memory broker's
tasks; the Redis broker has its own, richer worker (:class:`.worker.Worker`: idempotency
claims, workflow steps, heartbeats), which drives Redis directly.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from .. import _engine
from ..config import TaskConfig, TaskStatus
from .base import Delivery, FetchingBroker
from .protocol import (
    CONFIG_ATTR,
    DEFAULT_CONFIG,
    MSG_ARGS,
    MSG_ID,
    MSG_KWARGS,
    MSG_NAME,
    MSG_OPTIONS,
    OPT_FILLS,
    OPT_IDEMPOTENCY_KEY,
    OPT_SCHEDULE,
    OPT_WORKFLOW,
    STATUS_CODES,
    encode_error,
)

log = logging.getLogger("catzilla_tasks.consumer")

__all__ = ["Consumer"]


class Consumer:
    """Runs the tasks of ``broker`` on ``tasks`` (a BackgroundTasks with the tasks registered
    by ``@tasks.task``), at most ``concurrency`` at a time."""

    def __init__(self, tasks: Any, broker: FetchingBroker, *, concurrency: int = 8) -> None:
        if not isinstance(broker, FetchingBroker):
            raise TypeError(
                f"Consumer: expected a FetchingBroker (MemoryBroker...), got {type(broker).__name__}; "
                "a RedisBroker's tasks are run by catzilla_tasks.brokers.Worker"
            )
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency: must be an integer >= 1, got {concurrency!r}")
        self.tasks = tasks
        self.broker = broker
        self.concurrency = concurrency
        self.counts = {"succeeded": 0, "failed": 0, "dead_lettered": 0}
        self._cv = threading.Condition()
        self._inflight = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Consumer:
        self._thread = threading.Thread(target=self.run, name="catzilla-consumer", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop fetching and wait for the tasks held to be committed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cv:
            self._cv.wait_for(lambda: self._inflight == 0, timeout)

    def run(self) -> None:
        while not self._stop.is_set():
            with self._cv:
                self._cv.wait_for(lambda: self._inflight < self.concurrency or self._stop.is_set(), 0.5)
                free = self.concurrency - self._inflight
            if free <= 0:
                continue
            try:
                got = self.broker.fetch(free, 0.2)
            except (ConnectionError, TimeoutError) as exc:  # the broker unreachable: its messages stay
                log.warning("consumer: fetch failed (%s); retrying", exc)
                self._stop.wait(0.5)
                continue
            for d in got:
                self._start(d)

    def _start(self, d: Delivery) -> None:
        ser = self.broker.serializer
        try:
            msg = ser.loads(d.payload)
            task_id, name, args, kwargs = msg[MSG_ID], msg[MSG_NAME], msg[MSG_ARGS], msg[MSG_KWARGS]
            opts = msg[MSG_OPTIONS] if len(msg) > MSG_OPTIONS and msg[MSG_OPTIONS] else {}
            if not (
                isinstance(task_id, str)
                and isinstance(name, str)
                and isinstance(args, list)
                and isinstance(kwargs, dict)
                and isinstance(opts, dict)
            ):
                raise TypeError("not a task message")
        except Exception as exc:  # whatever a message holds, it is one dead letter
            self._fail(d, None, f"DecodeError: {type(exc).__name__}: {exc}")
            return
        if OPT_WORKFLOW in opts or OPT_FILLS in opts:
            self._fail(d, task_id, "NotImplementedError: workflow steps need the RedisBroker's Worker")
            return
        func = self.tasks.registered_tasks.get(name)
        if func is None:
            self._fail(
                d,
                task_id,
                f"LookupError: unknown task name {name!r}: this engine has no task registered "
                "under it (@tasks.task in a module the consumer imports)",
            )
            return
        try:
            base = getattr(func, CONFIG_ATTR, None)
            cfg = base if isinstance(base, TaskConfig) else DEFAULT_CONFIG
            fields = {
                k: v for k, v in opts.items() if k not in (OPT_IDEMPOTENCY_KEY, OPT_WORKFLOW, OPT_FILLS, OPT_SCHEDULE)
            }
            if fields:
                cfg = cfg.replace(**fields)
            if cfg.delay_ms:  # the broker applied the delay already
                cfg = cfg.replace(delay_ms=0)
            if cfg.queue is not None:  # one queue in memory: a named one is not routed again here
                cfg = cfg.replace(queue=None)  # (rate and concurrency limits apply, per consumer engine)
            handle = _engine.Engine._submit(self.tasks, func, tuple(args), kwargs, cfg, -1)
        except Exception as exc:  # bad options or arguments, engine shut down: the task fails
            self._fail(d, task_id, f"{type(exc).__name__}: could not start the task: {exc}")
            return
        with self._cv:
            self._inflight += 1
        handle._on_done(lambda h: self._finished(d, task_id, h))

    def _finished(self, d: Delivery, task_id: str, h: Any) -> None:
        ser = self.broker.serializer
        status = h.status
        try:
            if status is TaskStatus.SUCCEEDED:
                try:
                    record = ser.dumps([STATUS_CODES[status], h.wait(0)])
                except TypeError as exc:  # a value the serializer cannot encode: the task fails
                    self._fail(d, task_id, f"TypeError: the task's value cannot be encoded: {exc}")
                    return
                self.broker.commit(d, record)
                self.counts["succeeded"] += 1
                return
            try:
                h.wait(0)
                err = ["RuntimeError", f"task ended {status.name}", ""]
            except BaseException as exc:  # the task's own exception, rebuilt by the waiter
                err = encode_error(exc)
            record = ser.dumps([STATUS_CODES.get(status, 1), err])
            self.counts["failed"] += 1
            self.counts["dead_lettered"] += 1
            self.broker.commit(d, record, dead_error=f"{err[0]}: {err[1]}\n{err[2]}".rstrip())
        except Exception:  # the commit failed: the message stays held and comes back (at least once)
            log.exception("consumer: committing task %s failed", task_id)
        finally:
            with self._cv:
                self._inflight -= 1
                self._cv.notify_all()

    def _fail(self, d: Delivery, task_id: str | None, error: str) -> None:
        name, _, text = error.partition(": ")
        record = self.broker.serializer.dumps([STATUS_CODES[TaskStatus.FAILED], [name, text, ""]]) if task_id else None
        self.counts["dead_lettered"] += 1
        try:
            self.broker.commit(d, record, dead_error=error)
        except Exception:
            log.exception("consumer: dead-lettering a message failed")
