"""Rate and concurrency limits of distributed tasks, cluster-wide (atomic in Redis).

A worker asks before it runs a fetched task whose config has ``rate_limit`` or
``concurrency_limit`` (one script call per fetched batch, for all its limited tasks; tasks
without limits are not looked at). The worker decides (worker.py, ``Worker._admit``); its
consumer session (redis_consumer.py: ``reserve_slots``, ``acquire_leases``, the lease release
in ``commit``, the renewal in ``heartbeat``) runs the scripts through :class:`RedisLimits`:

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

A task with both limits is rate-limited first, then takes a lease. (MemoryBroker keeps the same
limits in memory, shared by its consumers: memory.py.)
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from . import scripts
from .redis import GROUP

if TYPE_CHECKING:
    from .redis import RedisBroker

__all__ = ["LEAD_MS", "RedisLimits"]


# A task whose slot is further than this is deferred through the delayed set to this much before
# its slot, then waits the rest in the worker's engine timer (precise to the ms: the delayed set
# is promoted with a fetch loop's latency). Holding it that long holds one of the worker's slots.
LEAD_MS = 40


class RedisLimits:
    """The limit scripts of the consumer session ``consumer`` on ``broker`` (its queue's park
    sets and streams), and the leases it holds (renewed by its heartbeat)."""

    def __init__(self, broker: RedisBroker, consumer: str) -> None:
        self.broker = broker
        self.consumer = consumer
        r = self._r = broker.redis
        self._rate_script = r.register_script(scripts.RATE_LIMIT)
        self._cc_script = r.register_script(scripts.CONCURRENCY)
        self._rl_prefix = f"{broker.prefix}:rl:"
        self._cc_prefix = f"{broker.prefix}:cc:"
        self._cp_prefix = f"{broker.prefix}:{broker.queue}:cp:"
        self._lock = threading.Lock()
        # (lease set, park set) -> (limit, {lease ids held here})
        self._leases: dict[tuple[str, str], tuple[int, set[str]]] = {}
        self._offset_ms: float | None = None

    def offset_ms(self) -> float:
        """The Redis server's clock minus ours, in ms (asked once; then from each rate call)."""
        if self._offset_ms is None:
            t0 = time.time()
            sec, us = self._r.time()
            self._offset_ms = sec * 1000 + us / 1000 - (t0 + time.time()) * 500
        return self._offset_ms

    def reserve(self, items: list[tuple[str, int]]) -> tuple[list[int], int]:
        """``rate_limit.lua`` for each (limit id, emission interval us): the slots, server now."""
        *slots, now_ms = self._rate_script(
            keys=[self._rl_prefix + ident for ident, _ in items], args=[us for _, us in items]
        )
        self._offset_ms = int(now_ms) - time.time() * 1000
        return [int(s) for s in slots], int(now_ms)

    def acquire(self, items: list[tuple[str, int, str, int, bytes]]) -> list[Any]:
        """``concurrency.lua acquire`` for each (limit id, limit, lease id, prio, payload): a
        lease ``(lease set, park set, limit, lease id)``, or None (parked by the script)."""
        lease_ms = max(1000, int(self.broker.visibility_timeout * 1000))
        keys: list[str] = []
        args: list[Any] = ["acquire", lease_ms]
        for ident, limit, lease_id, prio, payload in items:
            keys += (self._cc_prefix + ident, self._cp_prefix + ident)
            args += (limit, lease_id, b"%d" % prio + payload)
        got = self._cc_script(keys=keys, args=args)
        out: list[Any] = []
        with self._lock:
            for i, ((_, limit, lease_id, _, _), ok) in enumerate(zip(items, got, strict=True)):
                pair = (keys[2 * i], keys[2 * i + 1])
                # (known here even when parked: the heartbeat reaps its lapsed leases)
                held = self._leases.setdefault(pair, (limit, set()))[1]
                if int(ok):
                    held.add(lease_id)
                    out.append((pair[0], pair[1], limit, lease_id))
                else:
                    out.append(None)
        return out

    def release(self, pipe: Any, lease: tuple[str, str, int, str]) -> None:
        """Queue the release of ``lease`` on ``pipe`` (the commit of its job's outcome)."""
        lease_set, park, limit, lease_id = lease
        with self._lock:
            entry = self._leases.get((lease_set, park))
            if entry is not None:
                entry[1].discard(lease_id)
        self._cc_script(keys=[lease_set, park, *self.broker.streams], args=["release", limit, lease_id], client=pipe)

    def renew(self, pipe: Any) -> None:
        """Heartbeat: extend the leases held here, reap lapsed ones, wake parked tasks for them
        (queued on ``pipe``)."""
        with self._lock:
            groups = [(pair, limit, list(held)) for pair, (limit, held) in self._leases.items()]
            if len(self._leases) > 10_000:  # (many keys: forget those without a lease held here)
                self._leases = {k: v for k, v in self._leases.items() if v[1]}
        if not groups:
            return
        lease_ms = max(1000, int(self.broker.visibility_timeout * 1000))
        streams = self.broker.streams
        for (lease_set, park), limit, held in groups:
            self._cc_script(
                keys=[lease_set, park, *streams],
                args=["renew", lease_ms, limit, GROUP, self.consumer, *held],
                client=pipe,
            )
