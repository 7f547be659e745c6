"""Named queues across workers: ``catzilla-tasks worker mod:tasks --queues emails,default``.

A task goes to the queue of its config (``@tasks.task(queue="emails")`` or
``options(queue=...)``; none: the broker's own, ``"default"``), whose keys are
``P:<queue>:q0..q3`` and ``P:<queue>:delayed`` (see redis.py). A worker consuming several queues
runs one fetch loop (a :class:`~.worker.Worker`) per queue on the one local engine, and gives each
queue its share of the worker's concurrency, by weight (``--queues emails:1,default:3``; equal
weights by default, at least one slot each). Inside a queue, priorities are served in order as
ever; across queues nothing is shared, so a queue full of slow tasks never starves another: each
queue is a bulkhead, as a named queue is in-process (``BackgroundTasks(queues=...)``).

The fetch loops share one consumer name (each reads its own queue's streams, so the name is
unambiguous per stream) and one entry in the cluster registry (registry.py): the worker's id,
its queues with their weights and its whole concurrency, beaten by one heartbeat thread, with
the figures of every queue's tasks together. Each fetch loop renews its own held entries and
concurrency-limit leases (ratelimit.py), as a single-queue worker does.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from typing import Any

from .redis import RedisBroker
from .registry import Heartbeat, TaskFigures, check_interval
from .worker import Worker

log = logging.getLogger("catzilla_tasks.worker")

__all__ = ["MultiQueueWorker", "broker_for_queue", "parse_queues", "split_concurrency"]


def parse_queues(spec: str) -> dict[str, int]:
    """``"emails,default"`` or ``"emails:1,default:3"`` as {queue: weight}."""
    from ..config import QUEUE_NAME, RESERVED_QUEUE_NAMES, reserved_queue_error

    out: dict[str, int] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight = part.partition(":")
        if not QUEUE_NAME.fullmatch(name):
            raise ValueError(f"--queues: {name!r} is not a queue name (letters, digits, '_', '-', '.')")
        if name in RESERVED_QUEUE_NAMES:
            raise reserved_queue_error("--queues", name)
        try:
            w = int(weight) if weight else 1
        except ValueError:
            w = 0
        if w < 1:
            raise ValueError(f"--queues: the weight of {name!r} must be an integer >= 1, got {weight!r}")
        if name in out:
            raise ValueError(f"--queues: {name!r} is given twice")
        out[name] = w
    if not out:
        raise ValueError("--queues: give at least one queue name")
    return out


def split_concurrency(concurrency: int, weights: dict[str, int]) -> dict[str, int]:
    """Each queue's share of ``concurrency`` by weight (largest remainders; at least 1 each)."""
    if concurrency < len(weights):
        raise ValueError(f"concurrency ({concurrency}) must be at least the number of queues ({len(weights)})")
    total = sum(weights.values())
    exact = {q: concurrency * w / total for q, w in weights.items()}
    shares = {q: max(1, int(x)) for q, x in exact.items()}
    rest = concurrency - sum(shares.values())
    for q in sorted(exact, key=lambda q: exact[q] - int(exact[q]), reverse=True):
        if rest <= 0:
            break
        shares[q] += 1
        rest -= 1
    while rest < 0:  # (the minimum of 1 took more than the share)
        q = max(shares, key=lambda q: shares[q])
        shares[q] -= 1
        rest += 1
    return shares


def broker_for_queue(broker: RedisBroker, queue: str) -> RedisBroker:
    """A RedisBroker like ``broker`` (server, prefix, serializer, TTLs) for another queue."""
    if queue == broker.queue:
        return broker
    return RedisBroker(
        broker.url,
        queue=queue,
        prefix=broker.prefix,
        serializer=broker.serializer.name,
        allow_pickle=broker.serializer.allow_pickle,
        result_ttl=broker.result_ttl,
        visibility_timeout=broker.visibility_timeout,
        idempotency_ttl=broker.idempotency_ttl,
        max_deliveries=broker.max_deliveries,
        max_result_bytes=broker.max_result_bytes,
        dead_letter_maxlen=broker.dead_letter_maxlen,
        workflow_ttl=broker.workflow_ttl,
        **broker._client_options,
    )


class MultiQueueWorker:
    """Runs one :class:`Worker` per queue of ``queues`` ({name: weight}) on the engine ``tasks``,
    splitting ``concurrency`` between them by weight (see the module docstring). ``broker``: the
    RedisBroker whose named queues these are (default: ``tasks.broker``).

    ``heartbeat_interval``: seconds between the beats of its one entry in the cluster registry
    (None: not registered, no figures kept); ``consumer``: its name (default: host-pid-random).
    """

    def __init__(
        self,
        tasks: Any,
        queues: dict[str, int],
        *,
        broker: RedisBroker | None = None,
        concurrency: int = 16,
        heartbeat_interval: float | None = 2.0,
        consumer: str | None = None,
        **worker_kw: Any,
    ) -> None:
        broker = broker if broker is not None else getattr(tasks, "broker", None)
        if not isinstance(broker, RedisBroker):
            raise TypeError("MultiQueueWorker: the engine has no Redis broker (pass broker=RedisBroker(...))")
        shares = split_concurrency(concurrency, queues)
        interval = check_interval(heartbeat_interval)
        self.tasks = tasks
        self.broker = broker
        self.concurrency = concurrency
        self.weights: dict[str, int] = dict(queues)
        self.consumer: str = consumer or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self.workers: dict[str, Worker] = {
            q: Worker(
                tasks,
                broker_for_queue(broker, q),
                concurrency=shares[q],
                consumer=self.consumer,
                heartbeat_interval=None,  # (one entry for all the queues: this object's heartbeat)
                **worker_kw,
            )
            for q in queues
        }
        # the figures of every queue's tasks, recorded by each queue's committer (registry.py)
        self.figures: TaskFigures | None = None
        self._heartbeat: Heartbeat | None = None
        if interval is not None:
            self.figures = TaskFigures()
            for w in self.workers.values():
                w.figures = self.figures
            self._heartbeat = Heartbeat(self, interval)
        self._deadline: float | None = None
        self.ready = threading.Event()

    def run(self, install_signals: bool = False) -> None:
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        if self._heartbeat is not None:  # (registered first: an id a live worker holds is refused, WorkerIdInUse)
            first = next(iter(self.workers.values()))
            try:
                first._retrying(self._heartbeat.claim)  # (retried while Redis is away, until a stop)
            except first._unavailable as exc:
                log.warning("stopped before the broker could be reached (%s)", exc)
                return
        # one queue's worker failing (at its setup: a key of another type, a command its ACL
        # refuses; or later) stops the others, and run() raises its error once they are done
        errors: list[BaseException] = []
        ended = threading.Event()  # a queue's worker returned or failed

        def run_queue(w: Worker) -> None:
            try:
                w.run()
            except BaseException as exc:
                errors.append(exc)
                for other in self.workers.values():
                    other.stop()
            finally:
                ended.set()

        threads = [
            threading.Thread(target=run_queue, args=(w,), name=f"catzilla-queue-{q}", daemon=True)
            for q, w in self.workers.items()
        ]
        try:
            for t in threads:
                t.start()
            for w in self.workers.values():
                # (not for ever: a queue's worker that ends before it is ready never will be)
                while not w.ready.wait(0.05) and not ended.is_set():
                    pass
            if all(w.ready.is_set() for w in self.workers.values()):
                if self._heartbeat is not None:
                    self._heartbeat.start()
                self.ready.set()
            else:  # (one failed or was stopped during its setup: the whole worker stops)
                for w in self.workers.values():
                    w.stop()
            for t in threads:
                while t.is_alive():
                    t.join(0.5)  # (in slices: the main thread stays responsive to signals)
        finally:
            if self._heartbeat is not None:  # (past a stop deadline: left to be seen as lost)
                self._heartbeat.stop(deregister=self._deadline is None or time.monotonic() < self._deadline)
        if errors:
            raise errors[0]

    def stop(self, timeout: float | None = None) -> None:
        if timeout is not None:
            self._deadline = time.monotonic() + timeout
        for w in self.workers.values():
            w.stop(timeout)

    def stats(self) -> dict[str, Any]:
        total: dict[str, Any] = {}
        for w in self.workers.values():
            for k, v in w.stats().items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    total[k] = total.get(k, 0) + v
        total["queues"] = {q: w.stats() for q, w in self.workers.items()}
        return total
