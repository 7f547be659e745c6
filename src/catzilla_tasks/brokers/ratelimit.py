"""Rate and concurrency limits of distributed tasks, cluster-wide (atomic in Redis).

A worker asks before it runs a fetched task whose config has ``rate_limit`` or
``concurrency_limit`` (one script call per fetched batch, for all its limited tasks; tasks
without limits are not looked at):

* **rate_limit** (``lua/rate_limit.lua``): GCRA with reservation per task name (and
  ``rate_limit_key``), on the Redis server's clock, so every worker shares one limit. A task
  gets the next free slot; if that is later than now, it is *deferred*: acknowledged and put in
  the delayed set for the wait in the same commit transaction, with the mark ``"L"`` in its
  options (its slot is taken: it runs when it comes back, without asking again). It holds no
  worker slot while it waits and is never dropped or failed. In any window of W seconds at most
  ``floor(W * rate) + 1`` tasks of a limit are admitted (a burst of one); starts trail
  admissions by the promotion and fetch latency (a few ms).
* **concurrency_limit** (``lua/concurrency.lua``): a task takes a lease (a member of the sorted
  set ``P:cc:<name>``, expiring after the broker's ``visibility_timeout`` and renewed by its
  worker's heartbeat, so a dead worker's lease lapses; a live worker's lease that lapsed while
  it could not reach Redis is taken back by its next heartbeat while its task is pending there).
  Over the limit it is *parked* in the
  sorted set ``P:<queue>:cp:<name>`` by the same script (atomically: no wake-up can be
  missed) and acknowledged; each lease released (in the transaction that commits the task's
  outcome) moves parked tasks back into their queue's streams, oldest first, while leases are
  free. Heartbeats also wake parked tasks for leases that lapsed.

A task with both limits is rate-limited first, then takes a lease.
"""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING, Any, cast

from ..config import TaskConfig
from ..limits import Limits, limit_key
from . import scripts
from .protocol import MSG_ARGS, MSG_KWARGS, MSG_NAME, MSG_OPTIONS, OPT_RESERVED
from .redis import GROUP

if TYPE_CHECKING:
    from .worker import Worker, _Job

__all__ = ["RedisLimits"]


# A task whose slot is further than this is deferred through the delayed set to this much before
# its slot, then waits the rest in the worker's engine timer (precise to the ms: the delayed set
# is promoted with a fetch loop's latency). Holding it that long holds one of the worker's slots.
LEAD_MS = 40


def cfg_of(j: _Job) -> TaskConfig:
    return cast(TaskConfig, j.cfg)  # (limited jobs have one)


def _ident(name: str, key: str | None) -> str:
    return name if key is None else f"{name}:{key}"


class RedisLimits:
    """The limit side of one :class:`~.worker.Worker`."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        b = worker.broker
        self._rate_script = worker._r.register_script(scripts.RATE_LIMIT)
        self._cc_script = worker._r.register_script(scripts.CONCURRENCY)
        self._rl_prefix = f"{b.prefix}:rl:"
        self._cc_prefix = f"{b.prefix}:cc:"
        self._cp_prefix = f"{b.prefix}:{b.queue}:cp:"
        self._lock = threading.Lock()
        # (lease set, park set) -> (limit, {lease ids held here})
        self._leases: dict[tuple[str, str], tuple[int, set[str]]] = {}
        self._offset_ms: float | None = None
        self._delays = Limits()  # (its cache of configs with a delay)

    def offset_ms(self) -> float:
        """The Redis server's clock minus ours, in ms (asked once; then from each rate call)."""
        if self._offset_ms is None:
            t0 = time.time()
            sec, us = self.w._r.time()
            self._offset_ms = sec * 1000 + us / 1000 - (t0 + time.time()) * 500
        return self._offset_ms

    def delayed(self, cfg: TaskConfig, delay_ms: int) -> TaskConfig:
        return self._delays.delayed(cfg, delay_ms)

    def admit(self, jobs: list[_Job]) -> None:
        """Decide for the limited ``jobs`` (no error, not skipped): run (a lease taken if it has
        a concurrency limit), deferred (``j.defer`` ms, its payload marked as reserved) or
        parked (``j.parked``)."""
        w = self.w
        ser = w.broker.serializer
        rated: list[tuple[_Job, str, float]] = []  # (job, limit id, emission interval in us)
        leased: list[tuple[_Job, str]] = []
        for j in jobs:
            cfg = cast(TaskConfig, j.cfg)  # (limited jobs have one)
            msg = j.msg
            try:
                key = limit_key(cfg, tuple(msg[MSG_ARGS]), msg[MSG_KWARGS])
            except Exception as exc:
                j.error = f"{type(exc).__name__}: rate_limit_key failed: {exc}"
                continue
            ident = _ident(msg[MSG_NAME], key)
            opts = msg[MSG_OPTIONS] if len(msg) > MSG_OPTIONS and msg[MSG_OPTIONS] else None
            slot = opts.get(OPT_RESERVED) if opts else None
            if cfg._rate is not None and not slot:
                rated.append((j, ident, cfg._rate[1] / cfg._rate[0] * 1_000_000))
                continue
            if isinstance(slot, int) and not isinstance(slot, bool):  # back for its reserved slot
                j.local_delay = max(0, int(slot - time.time() * 1000 - self.offset_ms()))
            if cfg.concurrency_limit is not None:
                leased.append((j, ident))
        if rated:
            *slots, now_ms = self._rate_script(
                keys=[self._rl_prefix + ident for _, ident, _ in rated],
                args=[max(1, math.ceil(us)) for _, _, us in rated],  # (rounded up: never over the rate)
            )
            self._offset_ms = int(now_ms) - time.time() * 1000
            for (j, ident, _), slot in zip(rated, slots, strict=True):
                wait = int(slot) - int(now_ms)
                if wait > LEAD_MS:
                    msg = ser.loads(j.payload)  # (the payload as sent: its arguments intact)
                    while len(msg) < 6:
                        msg.append(0 if len(msg) == 4 else None)
                    opts = dict(msg[MSG_OPTIONS] or {})
                    opts[OPT_RESERVED] = int(slot)
                    msg[MSG_OPTIONS] = opts
                    j.payload = ser.dumps(msg)
                    j.defer = wait - LEAD_MS
                    j.limit_deferred = True
                    continue
                j.local_delay = max(0, wait)
                if cfg_of(j).concurrency_limit is not None:
                    leased.append((j, ident))
        if leased:
            lease_ms = max(1000, int(w.broker.visibility_timeout * 1000))
            keys: list[str] = []
            args: list[Any] = ["acquire", lease_ms]
            for j, ident in leased:
                lease_id = f"{j.msg[0]}:{j.eid.decode()}"
                keys += (self._cc_prefix + ident, self._cp_prefix + ident)
                args += (j.cfg.concurrency_limit, lease_id, b"%d" % j.prio + j.payload)  # type: ignore[union-attr]
            got = self._cc_script(keys=keys, args=args)
            with self._lock:
                for i, ((j, _name), ok) in enumerate(zip(leased, got, strict=True)):
                    pair = (keys[2 * i], keys[2 * i + 1])
                    limit = int(args[2 + 3 * i])
                    # (known here even when parked: the heartbeat reaps its lapsed leases)
                    held = self._leases.setdefault(pair, (limit, set()))[1]
                    if int(ok):
                        lease_id = str(args[3 + 3 * i])
                        held.add(lease_id)
                        j.lease = (pair[0], pair[1], limit, lease_id)
                    else:
                        j.parked = True

    def release(self, pipe: Any, j: _Job) -> None:
        """Queue the release of ``j``'s lease on ``pipe`` (the commit of its outcome)."""
        lease, park, limit, lease_id = j.lease  # type: ignore[misc]
        with self._lock:
            entry = self._leases.get((lease, park))
            if entry is not None:
                entry[1].discard(lease_id)
        self._cc_script(keys=[lease, park, *self.w.broker.streams], args=["release", limit, lease_id], client=pipe)

    def renew(self, pipe: Any) -> None:
        """Heartbeat: extend the leases held here, reap lapsed ones, wake parked tasks for them
        (on ``pipe``, or at once when it is None)."""
        with self._lock:
            groups = [(pair, limit, list(held)) for pair, (limit, held) in self._leases.items()]
            if len(self._leases) > 10_000:  # (many keys: forget those without a lease held here)
                self._leases = {k: v for k, v in self._leases.items() if v[1]}
        if not groups:
            return
        if pipe is None:
            p = self.w._r.pipeline(transaction=False)
            self.renew(p)
            p.execute()
            return
        lease_ms = max(1000, int(self.w.broker.visibility_timeout * 1000))
        streams = self.w.broker.streams
        for (lease, park), limit, held in groups:
            self._cc_script(
                keys=[lease, park, *streams],
                args=["renew", lease_ms, limit, GROUP, self.w.consumer, *held],
                client=pipe,
            )
