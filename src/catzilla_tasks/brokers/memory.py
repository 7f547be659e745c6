"""An in-memory broker for tests: the broker contract (:mod:`.base`) within one process.

``BackgroundTasks(broker=MemoryBroker())`` publishes as with Redis (same messages, same
:mod:`.protocol` encoding), and a :class:`~.worker.Worker` (or a :class:`~.consumer.Consumer`,
one on its own thread) on an engine of the same process runs them through
:class:`MemoryConsumer`, as it runs a Redis broker's. Nothing leaves the process and nothing
survives it: for tests of code written for a broker, not for production. Rate and concurrency
limits are kept here too, shared by every consumer of the broker (as Redis shares them across
machines), and progress reports are stored for ``MemoryResult.progress``. A task's named queue
(``queue=``) is not a queue of its own here: every task goes to the broker's one set of queues.
There is no cluster registry (``catzilla-tasks workers`` is Redis's): a worker on it keeps its
figures (``worker.figures``, for a metrics exporter) and publishes nothing. Not supported
here: workflow runs across workers (``run_workflow`` raises NotImplementedError:
they need the RedisBroker).

Submit-time deduplication as on Redis (brokers/dedup.py): a keyed ``add_task`` while a task with
the key is queued, delayed, running, or finished within ``idempotency_ttl`` of being due (once
it ended, no longer than its result is kept) returns a handle to that task and queues nothing;
inside ``batch()`` at the block's publication.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ..config import MAX_MS, TaskConfig, TaskPriority, TaskStatus
from .base import CommitJob, ConsumerSession, Delivery, Entries, FetchingBroker, Outcome
from .protocol import (
    CONFIG_ATTR,
    DEFAULT_CONFIG,
    MSG_ATTEMPTS,
    MSG_ID,
    MSG_NAME,
    MSG_OPTIONS,
    OPT_IDEMPOTENCY_KEY,
    Overrides,
    decode_error,
    message,
    parse_result,
    task_name,
)
from .serialization import DecodeError, Serializer

__all__ = ["MemoryBroker", "MemoryConsumer", "MemoryResult"]

log = logging.getLogger("catzilla_tasks.results")


class MemoryBroker(FetchingBroker):
    """Queues, delayed tasks, held messages, outcomes and dead letters in this process's memory
    (see the module docstring). ``serializer``, ``result_ttl``, ``visibility_timeout``,
    ``max_deliveries`` and ``idempotency_ttl`` mean what they mean for RedisBroker."""

    def __init__(
        self,
        *,
        queue: str = "default",
        serializer: str = "msgpack",
        result_ttl: float = 3600,
        visibility_timeout: float = 60.0,
        max_deliveries: int | None = 10,
        idempotency_ttl: float = 86400,
    ) -> None:
        if not isinstance(result_ttl, (int, float)) or isinstance(result_ttl, bool) or not result_ttl >= 0:
            raise ValueError(f"result_ttl: must be a number of seconds >= 0, got {result_ttl!r}")
        if (
            isinstance(visibility_timeout, bool)
            or not isinstance(visibility_timeout, (int, float))
            or not visibility_timeout > 0
        ):
            raise ValueError(f"visibility_timeout: must be a number of seconds > 0, got {visibility_timeout!r}")
        if max_deliveries is not None and (
            isinstance(max_deliveries, bool) or not isinstance(max_deliveries, int) or max_deliveries < 1
        ):
            raise ValueError(f"max_deliveries: must be an integer >= 1 or None (no limit), got {max_deliveries!r}")
        if (
            isinstance(idempotency_ttl, bool)
            or not isinstance(idempotency_ttl, (int, float))
            or not 0 < idempotency_ttl <= MAX_MS / 1000
        ):
            raise ValueError(f"idempotency_ttl: must be a number of seconds > 0, got {idempotency_ttl!r}")
        self.queue = queue
        self.idempotency_ttl = float(idempotency_ttl)
        self._keys: dict[str, tuple[str, float]] = {}  # idempotency key -> (first task's id, expiry)
        self._keys_sweep_at = 1024
        self.serializer = Serializer(serializer)
        self.result_ttl = float(result_ttl)
        self.visibility_timeout = float(visibility_timeout)
        self.max_deliveries = max_deliveries
        self._cv = threading.Condition()
        self._queues: list[deque[tuple[bytes, int]]] = [deque() for _ in range(4)]  # (payload, deliveries)
        self._delayed: list[tuple[float, int, int, bytes]] = []  # heap of (due, seq, priority, payload)
        self._held: dict[int, tuple[float, Delivery]] = {}  # token -> (deadline, delivery)
        self._results: dict[str, tuple[float, bytes]] = {}  # task id -> (expiry, record)
        self._done: dict[str, str] = {}  # idempotency key -> id of the task that succeeded with it
        self._dead: dict[str, dict[str, Any]] = {}  # dead letters by id, oldest first
        self._callbacks: dict[str, list[Callable[[], Any]]] = {}
        self._seq = itertools.count(1)
        self._woken: list[str] = []  # task ids given a record by _apply, whose callbacks are due
        self._local = threading.local()
        self._overrides = Overrides()
        self._ids = itertools.count()
        self._claims: dict[str, tuple[str, float]] = {}  # idempotency key -> (holder's token, lease end)
        # limits (see ratelimit.py for their meaning): a rate limit's theoretical arrival time
        # (epoch ms), a concurrency limit's leases (lease id -> expiry, monotonic) and the
        # (priority, payload) parked until one is free, with the limit they wait for
        self._tat: dict[str, float] = {}
        self._leases: dict[str, dict[str, float]] = {}
        self._parked: dict[str, tuple[int, deque[tuple[int, bytes]]]] = {}
        self._progress: dict[str, tuple[float, bytes]] = {}  # task id -> (expiry, [fraction, message])
        self._closed = False

    def consumer(self, name: str) -> MemoryConsumer:
        """A worker's consumer of this broker (see :class:`MemoryConsumer`)."""
        return MemoryConsumer(self, name)

    # -- publishing ------------------------------------------------------------------------
    def submit(
        self,
        func: Any,
        args: tuple,
        kwargs: dict[str, Any] | None,
        cfg: TaskConfig | None,
        idempotency_key: str | None = None,
    ) -> MemoryResult:
        name = task_name(func)
        if cfg is None:
            cfg = getattr(func, CONFIG_ATTR, None) if not isinstance(func, str) else None
            if not isinstance(cfg, TaskConfig):
                cfg = DEFAULT_CONFIG
        opts = None if isinstance(func, str) else self._overrides(func, cfg)
        if idempotency_key is not None:
            if not isinstance(idempotency_key, str) or not idempotency_key:
                raise ValueError(f"idempotency_key: expected a non-empty string, got {idempotency_key!r}")
            opts = {**(opts or {}), OPT_IDEMPOTENCY_KEY: idempotency_key}
        tid = f"m{next(self._ids):x}"
        payload = self.serializer.dumps(message(tid, name, args, kwargs, opts))
        handle = MemoryResult(tid, self)
        item = (int(cfg.priority), cfg.delay_ms, payload)
        buf = getattr(self._local, "buf", None)
        if buf is not None:
            buf.append(item if idempotency_key is None else (*item, idempotency_key, handle))
        else:
            self._put([item if idempotency_key is None else (*item, idempotency_key, handle)])
        return handle

    def _put(self, items: Iterable[tuple[Any, ...]]) -> None:
        """Queue ``(priority, delay ms, payload)`` items; a keyed one, ``(..., key, handle)``, only
        if no task holds its key (else its handle gets that task's id)."""
        with self._cv:
            if self._closed:
                raise RuntimeError("this MemoryBroker is closed")
            now = time.monotonic()
            for prio, delay_ms, payload, *keyed in items:
                if keyed:
                    key, handle = keyed
                    hit = self._keys.get(key)
                    if hit is not None and now < hit[1]:
                        handle.task_id = hit[0]
                        continue
                    self._keys[key] = (handle.task_id, now + self.idempotency_ttl + max(delay_ms, 0) / 1000)
                    if len(self._keys) >= self._keys_sweep_at:  # (expired keys dropped as the table grows)
                        self._keys = {k: v for k, v in self._keys.items() if now < v[1]}
                        self._keys_sweep_at = max(1024, 2 * len(self._keys))
                if delay_ms > 0:
                    heapq.heappush(self._delayed, (now + delay_ms / 1000, next(self._seq), prio, payload))
                else:
                    self._queues[prio].append((payload, 0))
            self._cv.notify_all()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        if getattr(self._local, "buf", None) is not None:
            yield  # nested: the outer block publishes
            return
        buf: list[tuple[Any, ...]] = []
        self._local.buf = buf
        try:
            yield
        finally:
            self._local.buf = None
        self._put(buf)  # one lock: all of the block or (closed) none

    def publish_raw(self, prio: int, payload: bytes) -> None:
        self._put([(int(prio), 0, payload)])

    # -- consuming -------------------------------------------------------------------------
    def fetch(self, capacity: int, timeout: float) -> list[Delivery]:
        adopted: list[Callable[[], Any]] = []  # callbacks of keyed copies given a first run's outcome
        try:
            return self._fetch(capacity, timeout, adopted)
        finally:
            for cb in adopted:
                cb()

    def _fetch(self, capacity: int, timeout: float, adopted: list[Callable[[], Any]]) -> list[Delivery]:
        deadline = time.monotonic() + max(timeout, 0)
        with self._cv:
            while True:
                now = time.monotonic()
                self._reclaim(now)
                self._promote(now)
                out: list[Delivery] = []
                for prio, q in enumerate(self._queues):
                    while q and len(out) < capacity:
                        payload, n = q.popleft()
                        if self._done and self._adopt(payload, adopted):
                            continue  # a copy of a keyed task that succeeded: not run again
                        d = Delivery(next(self._seq), prio, payload, n + 1)
                        self._held[d.token] = (now + self.visibility_timeout, d)
                        out.append(d)
                if out or now >= deadline or self._closed:
                    return out
                wake = deadline
                if self._delayed:
                    wake = min(wake, self._delayed[0][0])
                if self._held:
                    wake = min(wake, min(t for t, _ in self._held.values()))
                self._cv.wait(max(wake - now, 0.001))

    def _promote(self, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            _, _, prio, payload = heapq.heappop(self._delayed)
            self._queues[prio].append((payload, 0))

    def _reclaim(self, now: float) -> None:
        for token, (deadline, d) in list(self._held.items()):
            if deadline <= now:  # its consumer went silent: the next fetch gets it
                del self._held[token]
                if self.max_deliveries is not None and d.deliveries >= self.max_deliveries:
                    self._bury(d, f"reclaimed {d.deliveries} times from consumers that stopped (max_deliveries)")
                else:
                    self._queues[d.priority].append((d.payload, d.deliveries))

    def commit(
        self, delivery: Delivery, record: bytes | None, *, retry_ms: float | None = None, dead_error: str | None = None
    ) -> None:
        with self._cv:
            self._held.pop(delivery.token, None)
            task_id, key = self._identity(delivery.payload)
            if key and retry_ms is None:  # ended for good: its key is kept no longer than its result
                self._settle_key(key, task_id)
            if record is not None and task_id and self.result_ttl:
                self._results[task_id] = (time.monotonic() + self.result_ttl, record)
                if key and parse_result(self.serializer, record)[0] is TaskStatus.SUCCEEDED:
                    self._done.setdefault(key, task_id)
            if retry_ms is not None:
                heapq.heappush(
                    self._delayed,
                    (time.monotonic() + retry_ms / 1000, next(self._seq), delivery.priority, delivery.payload),
                )
            elif dead_error is not None:
                self._bury(delivery, dead_error)
            self._cv.notify_all()
            callbacks = self._callbacks.pop(task_id, []) if record is not None and task_id else []
        for cb in callbacks:
            cb()

    def _apply(self, d: Delivery, ops: tuple, claim: Any) -> None:
        """Apply a worker's outcome operations (base.Outcome) for the held ``d`` (lock held)."""
        self._held.pop(d.token, None)
        settled = False
        for op in ops:
            kind = op[0]
            if kind == Outcome.RESULT:
                if self.result_ttl:
                    self._results[op[1]] = (time.monotonic() + self.result_ttl, op[2])
                    self._woken.append(op[1])
            elif kind == Outcome.DELAY:
                due = time.monotonic() + op[1] / 1000
                heapq.heappush(self._delayed, (due, next(self._seq), d.priority, op[2]))
            elif kind == Outcome.DEAD:
                self._bury(d, op[1])
            elif kind == Outcome.COPY_RESULT:
                rec = self._record(op[1])
                self._results[op[2]] = (time.monotonic() + self.result_ttl, rec if rec is not None else op[3])
                self._woken.append(op[2])
            elif kind == Outcome.KEY_DONE:
                self._done.setdefault(op[1], op[2])
                settled = True
            elif kind == Outcome.RUN_FAILED:
                pass  # (no run is stored here: a step message from elsewhere is dead-lettered alone)
            else:
                raise NotImplementedError(f"MemoryBroker: outcome {kind!r} (workflow runs need the RedisBroker)")
        if claim is not None and not settled:
            self._release_claim(claim)
        elif claim is not None:
            self._claims.pop(claim[0], None)

    def _settle_key(self, key: str, task_id: str) -> None:
        """A task that ended for good: its key's submit-time record keeps no longer than its
        result (lock held)."""
        hit = self._keys.get(key)
        if hit is not None and hit[0] == task_id:
            self._keys[key] = (task_id, min(hit[1], time.monotonic() + self.result_ttl))

    def _release_claim(self, claim: tuple[str, str]) -> None:
        held = self._claims.get(claim[0])
        if held is not None and held[0] == claim[1]:
            del self._claims[claim[0]]

    # -- limits (lock held) ------------------------------------------------------------------
    def _reserve(self, ident: str, interval_us: int) -> int:
        now = time.time() * 1000
        slot = max(now, self._tat.get(ident, 0.0))
        self._tat[ident] = slot + interval_us / 1000
        if len(self._tat) > 10_000:  # (forget the limits whose last slot is past)
            self._tat = {k: v for k, v in self._tat.items() if v > now}
        return int(slot)

    def _acquire(self, ident: str, limit: int, lease_id: str, prio: int, payload: bytes) -> bool:
        now = time.monotonic()
        leases = self._leases.setdefault(ident, {})
        for k in [k for k, until in leases.items() if until <= now]:
            del leases[k]
        if lease_id in leases or len(leases) < limit:
            leases[lease_id] = now + self.visibility_timeout
            return True
        _, parked = self._parked.get(ident, (limit, deque()))
        parked.append((prio, payload))
        self._parked[ident] = (limit, parked)
        return False

    def _wake(self, ident: str) -> None:
        """Queue parked tasks of ``ident`` again while fewer than their limit hold leases."""
        hit = self._parked.get(ident)
        if hit is None:
            return
        limit, parked = hit
        free = limit - len(self._leases.get(ident, ()))
        while free > 0 and parked:
            prio, payload = parked.popleft()
            self._queues[prio].append((payload, 0))
            free -= 1
        if not parked:
            del self._parked[ident]
        self._cv.notify_all()

    def _release_lease(self, lease: tuple[str, str]) -> None:
        ident, lease_id = lease
        leases = self._leases.get(ident)
        if leases is not None:
            leases.pop(lease_id, None)
            if not leases:
                del self._leases[ident]
        self._wake(ident)

    def _renew_leases(self, mine: Iterable[tuple[tuple[str, str], int]]) -> None:
        """Extend the leases ``mine`` (``((limit id, lease id), token of the held message)``);
        one that lapsed while its message is still held (its task still runs: a stalled
        heartbeat) is taken back, or one more task than the limit would start."""
        now = time.monotonic()
        until = now + self.visibility_timeout
        for (ident, lease_id), token in mine:
            leases = self._leases.get(ident)
            if leases is not None and leases.get(lease_id, 0.0) > now:
                leases[lease_id] = until
            elif token in self._held:
                self._leases.setdefault(ident, {})[lease_id] = until
        for ident in list(self._parked):  # leases that lapsed (a consumer that went silent)
            leases = self._leases.get(ident, {})
            for k in [k for k, t in leases.items() if t <= now]:
                del leases[k]
            self._wake(ident)

    def _adopt(self, payload: bytes, adopted: list[Callable[[], Any]]) -> bool:
        """If ``payload`` is a copy of a keyed task that succeeded, give it that task's outcome
        (its waiters are woken, its callbacks added to ``adopted``) and report True: it is
        acknowledged without running."""
        task_id, key = self._identity(payload)
        first = self._done.get(key) if key else None
        if first is None:
            return False
        rec = self._record(first)
        if rec is not None and task_id and task_id != first:
            self._results[task_id] = (time.monotonic() + self.result_ttl, rec)
            adopted += self._callbacks.pop(task_id, [])
            self._cv.notify_all()
        return True

    def _identity(self, payload: bytes) -> tuple[str, str | None]:
        try:
            msg = self.serializer.loads(payload)
            opts = msg[MSG_OPTIONS] if len(msg) > MSG_OPTIONS and isinstance(msg[MSG_OPTIONS], dict) else {}
            return str(msg[MSG_ID]), opts.get(OPT_IDEMPOTENCY_KEY)
        except (DecodeError, TypeError, IndexError, KeyError):
            return "", None

    def _bury(self, d: Delivery, error: str) -> None:
        task_id, _ = self._identity(d.payload)
        name = ""
        with contextlib.suppress(DecodeError, TypeError, IndexError, KeyError):
            name = str(self.serializer.loads(d.payload)[MSG_NAME])
        entry_id = f"{int(time.time() * 1000)}-{next(self._seq)}"
        self._dead[entry_id] = {
            "id": entry_id,
            "task_id": task_id,
            "name": name,
            "error": error,
            "priority": TaskPriority(d.priority).name,
            "at": time.time(),
            "payload": d.payload,
            "_prio": d.priority,
        }

    # -- results -----------------------------------------------------------------------------
    def result(self, task_id: str) -> MemoryResult:
        return MemoryResult(task_id, self)

    def _record(self, task_id: str) -> bytes | None:
        hit = self._results.get(task_id)
        if hit is None:
            return None
        if hit[0] < time.monotonic():
            del self._results[task_id]
            return None
        return hit[1]

    def _wait_record(self, task_id: str, timeout: float | None) -> bytes | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while True:
                rec = self._record(task_id)
                if rec is not None:
                    return rec
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cv.wait(left)

    def _watch(self, task_id: str, fn: Callable[[], Any]) -> None:
        with self._cv:
            if self._record(task_id) is None:
                self._callbacks.setdefault(task_id, []).append(fn)
                return
        fn()

    # -- dead letters --------------------------------------------------------------------
    def dead_letters(self, count: int = 100, start: str = "-") -> list[dict[str, Any]]:
        with self._cv:
            items = list(self._dead.values())
        if start != "-":
            ids = [i["id"] for i in items]
            items = items[ids.index(start) :] if start in ids else []
        return [{k: v for k, v in i.items() if not k.startswith("_")} for i in items[:count]]

    def dead_letter_count(self) -> int:
        with self._cv:
            return len(self._dead)

    def redrive(self, ids: Iterable[str] | None = None) -> int:
        with self._cv:
            wanted = list(self._dead) if ids is None else [str(i) for i in ids]
            moved = 0
            for entry_id in wanted:
                entry = self._dead.pop(entry_id, None)
                if entry is None:
                    continue
                payload = entry["payload"]
                with contextlib.suppress(DecodeError, TypeError, IndexError):
                    msg = self.serializer.loads(payload)
                    if len(msg) > MSG_ATTEMPTS:
                        msg[MSG_ATTEMPTS] = 0  # a fresh count of attempts
                        payload = self.serializer.same_format(payload).dumps(msg)
                self._results.pop(entry["task_id"], None)  # its waiters get the re-run's outcome
                self._queues[entry["_prio"]].append((payload, 0))
                moved += 1
            self._cv.notify_all()
            return moved

    # -- workflow runs -------------------------------------------------------------------
    def run_workflow(self, plan: Any) -> MemoryResult:
        raise NotImplementedError(
            f"workflow {plan.name!r}: workflow runs across workers need the RedisBroker (its workers release the "
            "steps); with MemoryBroker, run the workflow on an engine without a broker"
        )

    def cancel_run(self, run_id: str) -> bool:
        with self._cv:
            if self._record(run_id) is not None:
                return False  # it has ended
        raise NotImplementedError(
            f"cancel() of task {run_id}: MemoryBroker cannot cancel a single published task (the "
            "RedisBroker can), and it runs no workflows"
        )

    # -- housekeeping --------------------------------------------------------------------
    def queued(self) -> dict[str, int]:
        with self._cv:
            out = {p.name: len(q) for p, q in zip(TaskPriority, self._queues, strict=True)}
            out["delayed"] = len(self._delayed)
            out["dead"] = len(self._dead)
            return out

    def purge(self) -> None:
        with self._cv:
            # the tasks deleted never end: their idempotency keys let go of them (as on Redis)
            payloads = [x[0] for q in self._queues for x in q] + [x[3] for x in self._delayed]
            gone = {self._identity(x) for x in payloads}
            for task_id, key in gone:
                if key and self._keys.get(key, ("",))[0] == task_id:
                    del self._keys[key]
            for q in self._queues:
                q.clear()
            self._parked.clear()
            self._delayed.clear()
            self._dead.clear()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def __repr__(self) -> str:
        return f"<MemoryBroker queue={self.queue!r}>"


class MemoryConsumer(ConsumerSession):
    """A worker's consumer of a :class:`MemoryBroker`: the messages it holds are renewed by its
    heartbeat, taken by another consumer's fetch after ``visibility_timeout`` without one;
    a batch of outcomes is applied under the broker's lock (all of it at once). Workflow steps
    are refused (the in-memory broker runs no workflows)."""

    unavailable: tuple[type[BaseException], ...] = ()
    refused: tuple[type[BaseException], ...] = ()
    errors: tuple[type[BaseException], ...] = ()

    def __init__(self, broker: MemoryBroker, name: str) -> None:
        self.broker = broker
        self.name = name
        self.max_record = 1 << 62
        self._held: dict[int, Delivery] = {}  # token -> delivery, while this consumer holds it
        self._leases: dict[tuple[str, str], Any] = {}  # concurrency leases held -> token, renewed by heartbeat

    def limit_note(self, limit: int) -> str:
        return ""

    def setup(self) -> float:
        return 0.0

    def fetch(self, capacity: int, block_ms: int) -> Entries:
        out: Entries = []
        for d in self.broker.fetch(capacity, block_ms / 1000):
            self._held[d.token] = d
            out += (d.priority, d.token, d.payload)
        return out

    def promote(self) -> float:
        return -1.0  # (fetch makes due messages fetchable, and wakes for the next one)

    def recover(self, capacity: int, held: set[Any]) -> tuple[Entries, bool]:
        return [], False  # (no reply is ever lost in memory)

    def reclaim(self, capacity: int) -> tuple[Entries, dict[Any, int]]:
        return [], {}  # (fetch hands out the messages of silent consumers; max_deliveries applies there)

    def heartbeat(self, held: list[tuple[Any, int]], claims: list[tuple[Any, Any]] | None) -> None:
        b = self.broker
        with b._cv:
            until = time.monotonic() + b.visibility_timeout
            for token, _ in held:
                hit = b._held.get(token)
                if hit is not None:
                    b._held[token] = (until, hit[1])
            for _, (key, token) in claims or ():
                holder = b._claims.get(key)
                if holder is not None and holder[0] == token:
                    b._claims[key] = (token, until)
            b._renew_leases(self._leases.items())

    def clock_offset_ms(self) -> float:
        return 0.0  # (the broker's clock is this process's)

    def reserve_slots(self, items: list[tuple[str, int]]) -> tuple[list[int], int]:
        b = self.broker
        with b._cv:
            slots = [b._reserve(ident, us) for ident, us in items]
        return slots, int(time.time() * 1000)

    def acquire_leases(self, items: list[tuple[str, int, str, int, bytes]]) -> list[Any]:
        b = self.broker
        out: list[Any] = []
        with b._cv:
            for ident, limit, lease_id, prio, payload in items:
                if b._acquire(ident, limit, lease_id, prio, payload):
                    self._leases[(ident, lease_id)] = int(lease_id.rpartition(":")[2])
                    out.append((ident, lease_id))
                else:
                    out.append(None)
        return out

    def write_progress(self, task_id: str, record: bytes) -> None:
        b = self.broker
        with b._cv:
            now = time.monotonic()
            if len(b._progress) > 10_000:  # (the expired ones go)
                b._progress = {k: v for k, v in b._progress.items() if v[0] > now}
            b._progress[task_id] = (now + (b.result_ttl or 3600), record)

    def claim_keys(self, items: list[tuple[Any, str]]) -> list[tuple[str, Any]]:
        b = self.broker
        out: list[tuple[str, Any]] = []
        with b._cv:
            now = time.monotonic()
            for token, key in items:
                first = b._done.get(key)
                holder = b._claims.get(key)
                mine = f"{self.name} {token}"
                if first is not None:
                    out.append(("done", first))
                elif holder is not None and holder[1] > now and holder[0] != mine:
                    out.append(("held", max(1, int((holder[1] - now) * 1000))))
                else:
                    b._claims[key] = (mine, now + b.visibility_timeout)
                    out.append(("claimed", (key, mine)))
        return out

    def step_inputs(self, items: list[tuple[str, list[int]]]) -> list[Any]:
        return [NotImplementedError("the MemoryBroker runs no workflows") for _ in items]

    def begin_batch(self, token: bytes) -> None:
        pass

    def commit(self, jobs: Sequence[CommitJob], rescue: Any) -> tuple[Any, list[bool]]:
        b = self.broker
        with b._cv:
            for j in jobs:
                d = self._held.pop(j.eid, None) or Delivery(j.eid, j.prio, j.payload)
                try:
                    b._apply(d, j.ops, j.claim)
                except Exception as exc:
                    j.kinds = rescue(j, exc)
                    b._apply(d, j.ops, j.claim)
                if j.settle is not None and j.settle[0] is not None:  # ended for good (base.Outcome)
                    b._settle_key(str(j.settle[0]), j.task_id())
                if j.lease is not None:  # given back with the outcome, waking a parked task
                    self._leases.pop(j.lease, None)
                    b._release_lease(j.lease)
            b._cv.notify_all()
            woken, b._woken = b._woken, []
            callbacks = [cb for tid in woken for cb in b._callbacks.pop(tid, [])]
        for cb in callbacks:
            cb()
        return None, [True] * len(jobs)

    def ack(self, pending: Any) -> None:
        pass

    def leave(self, committer_done: bool) -> None:
        pass


class MemoryResult:
    """The result handle of a task published to a MemoryBroker (the same surface as
    RemoteResult: ``status``, ``is_ready()``, ``wait(timeout)``, ``await``, ``add_callback``)."""

    __slots__ = ("_broker", "task_id")

    def __init__(self, task_id: str, broker: MemoryBroker) -> None:
        self.task_id = task_id
        self._broker = broker

    def _check_results(self) -> None:
        if not self._broker.result_ttl:
            raise RuntimeError("this broker stores no results (result_ttl=0); create it with result_ttl > 0")

    @property
    def status(self) -> TaskStatus:
        self._check_results()
        with self._broker._cv:
            rec = self._broker._record(self.task_id)
        return TaskStatus.PENDING if rec is None else parse_result(self._broker.serializer, rec)[0]

    def is_ready(self) -> bool:
        return self.status.is_final

    done = is_ready

    @property
    def progress(self) -> Any:
        """The task's last ``set_progress()`` report (a ``Progress``), or None before the first."""
        from ..progress import from_wire

        b = self._broker
        with b._cv:
            hit = b._progress.get(self.task_id)
            if hit is not None and hit[0] < time.monotonic():
                del b._progress[self.task_id]
                hit = None
        if hit is None:
            return None
        try:
            return from_wire(b.serializer.same_format(hit[1]).loads(hit[1]))
        except DecodeError:
            return None

    def wait(self, timeout: float | None = None) -> Any:
        self._check_results()
        rec = self._broker._wait_record(self.task_id, timeout)
        if rec is None:
            raise TimeoutError(f"task {self.task_id} not finished within {timeout} s")
        status, value = parse_result(self._broker.serializer, rec)
        if status is TaskStatus.SUCCEEDED:
            return value
        raise decode_error(value)

    result = wait

    def __await__(self) -> Any:
        return asyncio.to_thread(self.wait).__await__()

    def add_callback(self, cb: Callable[[Any], Any]) -> None:
        """Call ``cb(value)`` when the task succeeds (from the thread that commits it)."""
        self._check_results()

        def done() -> None:
            try:
                value = self.wait(0)
            except Exception:
                return  # not a success: no call
            try:
                cb(value)
            except Exception:
                log.exception("a callback of task %s raised", self.task_id)

        self._broker._watch(self.task_id, done)

    def cancel(self) -> bool:
        return self._broker.cancel_run(self.task_id)

    def __repr__(self) -> str:
        return f"<MemoryResult {self.task_id}>"
