"""The broker contract: what a distributed-mode backend implements (Redis today; PostgreSQL next).

A broker owns everything that crosses process boundaries: the queued messages (one queue per
priority, plus delayed ones), the outcome of each task, the dead letters and the state of
workflow runs. The engine never sees a broker's storage: the producer
(:class:`~catzilla_tasks.brokers.producer.DistributedTasks`, what ``BackgroundTasks(broker=...)``
builds) only calls the methods below, and the wire format (message layout, option encoding,
status codes, error encoding) is :mod:`.protocol`'s, the same for every broker.

Delivery guarantees every implementation keeps:

* **At least once.** A published task runs at least once: a message is removed from its queue
  only when its outcome is committed (``commit``); a consumer that dies holding messages has
  them handed to another consumer after the broker's visibility timeout. A task may therefore
  run twice (a worker dying after running it, before committing); tasks that must not repeat
  their effect carry an ``idempotency_key``.
* **Idempotency keys.** Of the copies of a task with one key, at most one *succeeds* within the
  broker's idempotency TTL: the commit of a success records the key atomically with the
  acknowledgement, and a copy fetched after that is acknowledged without running.
* **Atomic publishing.** ``submit`` returns only once the broker holds the task (durably as far
  as its storage goes); a ``batch()`` block publishes all of its tasks or raises.
* **Connection errors.** A method that cannot reach the storage raises (``ConnectionError`` /
  ``TimeoutError`` or the client's subclass of them) and changes nothing it has not confirmed:
  a publish that raised may or may not have been stored (the caller may publish again: at
  least once), never half of a batch within one atomic unit. Result waiters are the exception:
  ``wait()`` reconnects and goes on waiting until its own timeout. A consumer's ``fetch`` and
  ``commit`` raise too; the worker retries a commit (its messages stay pending meanwhile, so
  a lost commit means a re-run, never a lost task).

The consumer side (fetch with capacity, commit of an outcome, a retry or a dead letter) is
:class:`FetchingBroker`'s, run by :class:`~.consumer.Consumer` (the in-memory broker's). The
Redis broker's consumer side is still :class:`~.worker.Worker`'s own: its Lua scripts fetch,
promote delayed tasks, reclaim from dead consumers, claim idempotency keys, release workflow
steps and commit, directly on the Redis streams.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any, Protocol

from ..config import TaskConfig, TaskStatus
from .serialization import Serializer


class Result(Protocol):
    """The handle of a published task (``RemoteResult`` for Redis): usable from any process."""

    task_id: str

    @property
    def status(self) -> TaskStatus: ...

    def is_ready(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> Any: ...

    def add_callback(self, cb: Any) -> None: ...

    def cancel(self) -> bool: ...


class Broker(abc.ABC):
    """The interface of a distributed-mode backend (see the module docstring for the
    guarantees). Attributes every broker has: ``queue`` (the name of its set of queues),
    ``serializer`` (a :class:`~.serialization.Serializer`), ``result_ttl`` (seconds an outcome
    is kept; 0: none is), ``visibility_timeout`` (seconds after which the messages of a silent
    consumer go to another) and ``max_deliveries`` (reclaims before a message is
    dead-lettered; None: no limit)."""

    queue: str
    serializer: Serializer
    result_ttl: float
    visibility_timeout: float
    max_deliveries: int | None

    # -- publishing (producer) ---------------------------------------------------------------
    @abc.abstractmethod
    def submit(
        self,
        func: Any,
        args: tuple,
        kwargs: dict[str, Any] | None,
        cfg: TaskConfig | None,
        idempotency_key: str | None = None,
    ) -> Result:
        """Publish one task: ``func`` (a task function or its registered name) with its
        arguments; ``cfg`` the per-call config (None: the function's own). A ``cfg.delay_ms``
        > 0 schedules it (it becomes fetchable once due); ``cfg.priority`` picks its queue;
        the fields of ``cfg`` that differ from the function's decorator travel with the message
        (:func:`.protocol.overrides`). Returns the task's result handle at once. Inside a
        ``batch()`` block of this thread the task is held until the block ends. Bad input
        (an unnamed function, options that cannot travel) raises here, before anything is
        sent."""

    @abc.abstractmethod
    def batch(self) -> AbstractContextManager[None]:
        """A block whose ``submit`` calls (in this thread) are published at its end, all of
        them or none (if the block raises, nothing is published; if publishing fails, the
        error is raised at the end of the block). Nested blocks publish with the outer one."""

    @abc.abstractmethod
    def publish_raw(self, prio: int, payload: bytes) -> None:
        """Queue an encoded message (:mod:`.protocol` layout) at priority ``prio`` as it is."""

    # -- results -----------------------------------------------------------------------------
    @abc.abstractmethod
    def result(self, task_id: str) -> Result:
        """The result handle of a task id, from any process (it need not have been published
        here). Its ``wait()`` blocks until the outcome is committed (woken by the commit, not
        by polling), survives reconnections, and raises the task's error rebuilt by
        :func:`.protocol.decode_error`; ``add_callback`` calls back from one broker thread."""

    # -- dead letters --------------------------------------------------------------------
    @abc.abstractmethod
    def dead_letters(self, count: int = 100, start: str = "-") -> list[dict[str, Any]]:
        """Dead-lettered tasks, oldest first, from ``start`` (an id of this list; ``"-"``:
        the first): dicts of ``id``, ``task_id``, ``name``, ``error``, ``priority``, ``at``
        (epoch seconds) and ``payload``."""

    @abc.abstractmethod
    def dead_letter_count(self) -> int:
        """How many dead letters are kept."""

    @abc.abstractmethod
    def redrive(self, ids: Iterable[str] | None = None) -> int:
        """Queue dead letters again (all of those dead now when ``ids`` is None) with a fresh
        count of attempts and no recorded outcome; returns how many this call moved. Each dead
        letter is moved at most once however many re-drives run at the same time."""

    # -- workflow runs -------------------------------------------------------------------
    @abc.abstractmethod
    def run_workflow(self, plan: Any) -> Result:
        """Start a validated workflow plan (``workflows._Plan``) on the workers: store the run
        (every step's message, dependency counters, dependents) and queue the steps without
        dependencies, atomically. From then on the consumers release dependents when a step
        succeeds (in the step's commit), so the producer may exit. The handle's value is every
        step's value by step id; a failed step makes it raise WorkflowError."""

    @abc.abstractmethod
    def cancel_run(self, run_id: str) -> bool:
        """Cancel a workflow run: no step is released any more, queued steps are skipped by the
        consumers, the run ends CANCELLED for every waiter. True if this call cancelled it,
        False if the run had already ended; NotImplementedError for the id of a single task."""

    # -- housekeeping --------------------------------------------------------------------
    @abc.abstractmethod
    def queued(self) -> dict[str, int]:
        """Tasks waiting per priority name (not yet fetched), plus ``delayed`` and ``dead``."""

    @abc.abstractmethod
    def purge(self) -> None:
        """Drop this queue's waiting, delayed and dead-lettered tasks (not the outcomes). The
        idempotency keys (and, on Redis, the schedules' run markers) of the tasks dropped let go
        of them: a keyed add_task queues a new task, an overlap=False schedule fires again."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections and threads; the broker is not used afterwards."""


class Delivery:
    """One fetched message, held by its consumer until ``commit``: ``token`` (the broker's
    handle for it), ``priority`` (0 CRITICAL .. 3 LOW), ``payload`` (the encoded message,
    :mod:`.protocol` layout) and ``deliveries`` (how many times it was handed out)."""

    __slots__ = ("deliveries", "payload", "priority", "token")

    def __init__(self, token: Any, priority: int, payload: bytes, deliveries: int = 1) -> None:
        self.token = token
        self.priority = priority
        self.payload = payload
        self.deliveries = deliveries


class FetchingBroker(Broker):
    """A broker whose consumer side is behind the interface too (the in-memory broker today;
    the Redis broker's is :class:`~.worker.Worker`'s own), run by
    :class:`~.consumer.Consumer`."""

    @abc.abstractmethod
    def fetch(self, capacity: int, timeout: float) -> list[Delivery]:
        """Up to ``capacity`` messages, highest priority first (a consumer never takes more than
        its free capacity), waiting up to ``timeout`` seconds for the first one; due delayed
        messages are fetchable. A fetched message stays held (invisible to other consumers)
        until committed; a holder that goes silent for ``visibility_timeout`` loses it to the
        next fetch (at least once). A connection error raises and hands out nothing."""

    @abc.abstractmethod
    def commit(
        self, delivery: Delivery, record: bytes | None, *, retry_ms: float | None = None, dead_error: str | None = None
    ) -> None:
        """End a held message, atomically: store its outcome ``record`` (:func:`.protocol`
        outcome record, kept ``result_ttl``; None: none), and remove it from the queue — or,
        with ``retry_ms``, queue it again after that many milliseconds (its payload as it is),
        or with ``dead_error``, move it to the dead letters with that error. A connection error
        raises and changes nothing: the message stays held and comes back (at least once)."""
