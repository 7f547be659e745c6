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

The consumer side is :class:`FetchingBroker`'s ``consumer(name)``: a :class:`ConsumerSession`
(fetch with capacity, heartbeat and reclaim of held messages, idempotency claims, the inputs of
workflow steps, and the commit of a batch of outcomes, :class:`Outcome`) that
:class:`~.worker.Worker` runs on. The worker decides every outcome (retry and its back-off,
dead letter, result record, workflow step release); a session only stores it.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
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
        False if the run had already ended. A broker may refuse the id of a single task (cancel
        that with the broker's ``cancel(task_id)`` where it has one)."""

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


class Outcome:
    """The operations of a task's outcome, as a worker hands them to
    :meth:`ConsumerSession.commit` (``job.ops``: a tuple of tuples, the first item of each one
    of these names). A session applies all of one batch's operations and acknowledgements
    atomically as far as its storage allows, in order within a job:

    * ``(RESULT, task_id, record)``: store an outcome record (:mod:`.protocol` layout) for
      ``result_ttl`` and wake its waiters;
    * ``(DELAY, ms, payload)``: queue ``payload`` again at the job's priority after ``ms``
      milliseconds (a retry, or a copy waiting for its idempotency key);
    * ``(DEAD, error, name, task_id)``: move the job's message to the dead letters;
    * ``(COPY_RESULT, first_id, task_id, gone_record)``: give ``task_id`` the record of
      ``first_id`` (a copy of a keyed task that already succeeded), ``gone_record`` if it expired;
    * ``(KEY_DONE, idempotency_key, task_id)``: the key is done by ``task_id`` (the job held its
      claim, ``job.claim``); a job holding a claim without this operation gives the claim back;
    * ``(STEP_DONE, run_id, index, value)``: a workflow step succeeded with the encoded value:
      store it and release the dependents whose dependencies are all done;
    * ``(RUN_FAILED, run_id, record)``: the workflow run fails with that record (first failure
      only); steps not yet released never run.

    Besides, ``job.settle`` (``(idempotency_key, schedule)``, either None; None: nothing) marks
    a task that ended for good: what refers to it is let go of in the same commit (its key's
    submit-time deduplication record keeps no longer than its result; its schedule's
    run-in-progress marker goes). It does not make the job's outcome a write of its own. And
    ``job.lease`` (a concurrency lease from ``acquire_leases``, or None) is given back in the
    same commit, whatever the outcome, waking tasks parked for it.
    """

    RESULT = "result"
    DELAY = "delay"
    DEAD = "dead"
    COPY_RESULT = "copy"
    KEY_DONE = "key_done"
    STEP_DONE = "step_done"
    RUN_FAILED = "run_failed"


class CommitJob(Protocol):
    """What :meth:`ConsumerSession.commit` reads of a worker's job."""

    prio: int
    eid: Any  # the session's token for the fetched message
    payload: bytes
    ops: tuple[tuple[Any, ...], ...]
    kinds: tuple[str, ...]
    claim: Any  # the idempotency claim the job holds (from ``claim_keys``), or None
    lease: Any  # the concurrency lease the job holds (from ``acquire_leases``), or None: released in the commit
    settle: tuple | None  # (idempotency key, schedule) of a task that ended for good, or None

    def task_id(self) -> str: ...

    def task_name(self) -> str: ...


# fetched messages, flat: [priority, token, payload, priority, token, payload, ...]; a payload
# is the message's bytes, or a string saying why the storage holds no message there
Entries = list[Any]


class ConsumerSession(abc.ABC):
    """One worker's consumer on a broker (``broker.consumer(name)``), what
    :class:`~.worker.Worker` runs against. Attributes: ``name``; ``unavailable`` (the
    exception types of an unreachable storage: the worker retries); ``refused`` (those of a
    storage that answers but refuses for now: a fetch waits and tries again); ``errors``
    (every error type of the storage); ``max_record`` (the largest outcome record it stores,
    bytes).

    Messages are held by the session from their fetch until their commit; a held message must
    be renewed (``heartbeat``) within the broker's ``visibility_timeout`` or another consumer
    may take it (``reclaim``)."""

    name: str
    unavailable: tuple[type[BaseException], ...]
    refused: tuple[type[BaseException], ...]
    errors: tuple[type[BaseException], ...]
    max_record: int
    # a blocking fetch may return up to this many ms after its wait (Redis: its `hz` tick); the
    # worker waits out a delayed task due sooner itself instead of blocking in fetch
    fetch_granularity_ms = 0

    def check_block(self, block_ms: int) -> None:  # noqa: B027 - optional: most storages accept any wait
        """Raise ValueError if a blocking fetch of ``block_ms`` cannot work on this storage."""

    @abc.abstractmethod
    def setup(self) -> float:
        """Create what the consumer needs (idempotent; retried while ``unavailable``). Returns
        the seconds to wait before reclaiming other consumers' messages (a storage that just
        restarted reports idle times that include its downtime)."""

    def limit_note(self, limit: int) -> str:
        """What to add to the error of a record over ``max_record`` (where that limit comes from)."""
        return ""

    def lost_state(self, exc: BaseException) -> bool:
        """True if ``exc`` (raised by a fetch) means the storage lost its state and ``setup``
        must run again."""
        return False

    @abc.abstractmethod
    def fetch(self, capacity: int, block_ms: int) -> Entries:
        """Up to ``capacity`` messages, highest priority first; when there is none, waits up to
        ``block_ms`` for one."""

    @abc.abstractmethod
    def promote(self) -> float:
        """Make due delayed messages fetchable; returns the monotonic time of the next due one
        (0: more are due now, -1: unknown, look again after a fetch's wait)."""

    @abc.abstractmethod
    def recover(self, capacity: int, held: set[Any]) -> tuple[Entries, bool]:
        """After a connection error: messages handed to this consumer whose reply was lost (not
        in ``held``), at most ``capacity``; and whether there may be more."""

    @abc.abstractmethod
    def reclaim(self, capacity: int) -> tuple[Entries, dict[Any, int]]:
        """Messages of consumers silent for ``visibility_timeout``, now held here (at most
        ``capacity``), and how many times each has been delivered (by token, where known)."""

    @abc.abstractmethod
    def heartbeat(self, held: list[tuple[Any, int]], claims: list[tuple[Any, Any]] | None) -> None:
        """Renew the messages held (``(token, priority)``), the idempotency claims of those
        that hold one (``(token, claim)``) and the concurrency leases held: nobody takes them
        while this consumer lives. Called also when nothing is held: leases that lapsed (a dead
        consumer's) are dropped then and the tasks parked for them queued again."""

    @abc.abstractmethod
    def claim_keys(self, items: list[tuple[Any, str]]) -> list[tuple[str, Any]]:
        """Claim the idempotency keys of fetched copies (``(token, key)``), atomically; for
        each: ``("claimed", claim)`` (run it), ``("done", first_task_id)`` (a copy succeeded:
        do not run), ``("held", ms)`` (another copy holds it: look again in ``ms``) or
        ``("error", text)``."""

    @abc.abstractmethod
    def step_inputs(self, items: list[tuple[str, list[int]]]) -> list[Any]:
        """For workflow steps (``(run_id, indexes of the steps whose values it takes)``): per
        item ``(running, [encoded value or None, ...])``, or an exception saying why the run
        cannot be read."""

    # -- limits and progress (rate_limit, concurrency_limit, set_progress) -------------------
    @abc.abstractmethod
    def clock_offset_ms(self) -> float:
        """The storage's clock minus this process's wall clock (``time.time()``), in ms: the
        slots of ``reserve_slots`` are on the storage's clock."""

    @abc.abstractmethod
    def reserve_slots(self, items: list[tuple[str, int]]) -> tuple[list[int], int]:
        """Rate limits, shared by every consumer of the broker: for each ``(limit id, emission
        interval in us)``, in order, reserve the next free start slot of that limit (GCRA with
        reservation: a slot is taken even when it is later than now). Returns the slots and the
        storage's time now (both epoch ms on the storage's clock)."""

    @abc.abstractmethod
    def acquire_leases(self, items: list[tuple[str, int, str, int, bytes]]) -> list[Any]:
        """Concurrency limits, shared by every consumer: for each ``(limit id, limit, lease id,
        priority, payload)`` (the lease id is ``"<task id>:<token>"``, the token of the fetched
        message as text) a lease (held until the commit of the job that holds it, as
        ``job.lease``, and renewed by ``heartbeat``; it lapses after ``visibility_timeout``
        without one), or None when ``limit`` leases are held: the session then keeps the message
        itself (*parked*) and queues it again at that priority once a lease is given back or
        lapses; the worker acknowledges its copy with no outcome. A lease that lapsed while its
        message is still held here (a heartbeat that came too late: an outage, a stall) is taken
        back by the next heartbeat, so no more tasks run than the limit."""

    @abc.abstractmethod
    def write_progress(self, task_id: str, record: bytes) -> None:
        """Store a running task's last progress report (``[fraction, message]`` encoded) where
        its result handle reads it (``result.progress``), kept ``result_ttl``."""

    @abc.abstractmethod
    def begin_batch(self, token: bytes) -> None:
        """A new batch of outcomes (``token`` unique per batch): its commit may be retried."""

    @abc.abstractmethod
    def commit(self, jobs: Sequence[CommitJob], rescue: Any) -> tuple[Any, list[bool]]:
        """Apply the operations of ``jobs`` (``job.ops``, see :class:`Outcome`) and end the
        messages: acknowledged with their outcome, atomically. If queuing a job's operations
        raises, ``rescue(job, exc)`` replaces them (it sets ``job.ops`` and returns its kinds).
        Returns acknowledgements left to send (``ack``; None: none) and, per job, whether its
        outcome was stored (False: it stays held and comes back). A connection error raises;
        a retry of the same batch applies it at most once."""

    @abc.abstractmethod
    def ack(self, pending: Any) -> None:
        """Send the acknowledgements ``commit`` left."""

    @abc.abstractmethod
    def leave(self, committer_done: bool) -> None:
        """The worker stops: drop what the storage keeps of this consumer (best effort)."""

    def interrupt(self) -> None:  # noqa: B027 - optional
        """Break blocked calls (the stop deadline passed)."""

    def cluster_heartbeat(self, worker: Any, interval: float) -> Any:
        """The thread that publishes ``worker`` in the broker's cluster registry every
        ``interval`` seconds (who it is, ``worker.stats()``, ``worker.figures``): an object with
        ``start()`` and ``stop(deregister)``; None when the broker keeps no registry (the worker
        still keeps its figures, for a metrics exporter). Default: none."""
        return None

    def cancel_watch(self) -> Any:
        """The cancelled task ids this consumer learns of (``Broker.cancel_run`` of a single
        task): an object with ``ids`` (a container of task ids: a fetched task in it is
        acknowledged unrun), ``start()`` / ``stop()`` (with the worker), ``track(task_id,
        handle)`` / ``untrack(task_id)`` (a running task, asked to stop if it is cancelled).
        Default: a broker that cancels no single task learns of none."""
        return NoCancels()


class NoCancels:
    """The cancel watch of a broker that cancels no single task (see ConsumerSession.cancel_watch)."""

    ids: frozenset[str] = frozenset()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def track(self, task_id: str, handle: Any) -> None:
        pass

    def untrack(self, task_id: str) -> None:
        pass


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
    """A broker with its consumer side: what :class:`~.worker.Worker` runs (RedisBroker,
    MemoryBroker; the next broker implements this and nothing in the engine or the worker
    changes)."""

    @abc.abstractmethod
    def consumer(self, name: str) -> ConsumerSession:
        """A new consumer session named ``name`` (unique per worker process) on this broker's
        queues, for one :class:`~.worker.Worker`."""


def destination_name(broker: Any, queue: str | None, prio: int) -> str:
    """What tracing names the place a task of priority ``prio`` is published to in ``queue``
    (None: the broker's own): the priority's stream when the broker names its streams
    (``queue_keys``, RedisBroker), else ``<queue>:q<prio>``. Producer and worker spans use it,
    so both ends of a message name one destination."""
    queue_keys = getattr(broker, "queue_keys", None)
    if queue_keys is not None:
        streams = queue_keys(queue)[0]
        if len(streams) > prio:
            return str(streams[prio])
    name = queue if queue is not None else getattr(broker, "queue", None)
    return f"{name}:q{prio}" if name else f"q{prio}"
