"""Submit-time deduplication on Redis: ``options(idempotency_key=K).add_task(...)``.

A task with a key is published by one Lua script (``lua/dedup_submit.lua``) that first looks
for the key's submit record ``P:idem:<K>``: when a task with that key is queued, running, or
finished within the key's TTL, nothing is queued and the caller gets a handle to that first
task (same ``task_id``, same outcome); otherwise the record is set to the new task's id (TTL
``idempotency_ttl`` from the time the task is due) and the task queued, in the same atomic step,
so any number of processes submitting one key at once queue one task. When the task ends for
good (not a retry) the worker shortens the record's TTL to the result's (``lua/task_settled.lua``;
the canceller does for a delayed task it takes out of the delayed set, which no worker sees):
a handle is never given to a task whose outcome has expired.

Inside ``batch()`` a keyed task is deduplicated when the block is published: the handle returned
by ``add_task`` takes the first task's id then.

The worker-side claim of idempotency keys (``scripts.IDEM_CLAIM``) stays: copies published
without this record (after it expired, a re-drive, ``publish_raw``) still succeed at most once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .redis import RedisBroker, RemoteResult

__all__ = ["submit", "queue_batch", "settle_batch"]


def _args(broker: RedisBroker, tid: str, prio: int, delay_ms: float, payload: bytes) -> list[Any]:
    return [tid, max(1, int(broker.idempotency_ttl * 1000)), payload, int(delay_ms) if delay_ms > 0 else 0, prio]


def submit(
    broker: RedisBroker, tid: str, key: str, prio: int, delay_ms: float, payload: bytes, queue: str | None = None
) -> RemoteResult:
    """Publish a keyed task (or, inside ``batch()``, hold it until the block ends) to ``queue``
    (None: the broker's own); the handle of the task that holds the key."""
    from .redis import RemoteResult

    handle = RemoteResult(tid, broker)
    buf = getattr(broker._local, "buf", None)
    if buf is not None:
        buf[5].append((handle, key, prio, delay_ms, payload, queue))
        return handle
    streams, delayed = broker.queue_keys(queue)
    first = broker._dedup_submit(
        keys=[broker.dedup_key(key), streams[prio], delayed],
        args=_args(broker, tid, prio, delay_ms, payload),
    )
    handle.task_id = first.decode() if isinstance(first, bytes) else str(first)
    return handle


def queue_batch(broker: RedisBroker, pipe: Any, items: list[tuple[Any, str, int, float, bytes, str | None]]) -> None:
    """Queue the keyed tasks of a ``batch()`` block on its pipeline (after everything else)."""
    for handle, key, prio, delay_ms, payload, queue in items:
        streams, delayed = broker.queue_keys(queue)
        broker._dedup_submit(
            keys=[broker.dedup_key(key), streams[prio], delayed],
            args=_args(broker, handle.task_id, prio, delay_ms, payload),
            client=pipe,
        )


def settle_batch(replies: list[Any], items: list[tuple[Any, str, int, float, bytes, str | None]]) -> None:
    """Give each keyed handle of a published block the id of the task that holds its key."""
    for (handle, *_), first in zip(items, replies[len(replies) - len(items) :], strict=True):
        if isinstance(first, BaseException):
            raise first
        handle.task_id = first.decode() if isinstance(first, bytes) else str(first)
