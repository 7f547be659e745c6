"""Cancelling a single task published to Redis: ``RemoteResult.cancel()`` and
``catzilla-tasks cancel TASK_ID``.

One Lua script (``lua/cancel_task.lua``) does the cancel, unless the task has ended: it records
the task's CANCELLED outcome (its waiters get TaskCancelled at once), adds its id to the
prefix's cancelled set ``P:cancelled`` (each id kept there ``max(result_ttl, 1 day)``) and
announces it on the channel ``P:cancel`` (prefix-wide, not per queue: a task routed
to another queue is cancelled from any queue's broker). Then the canceller removes the task from the
delayed set if it waits there. Every worker keeps the recent cancelled ids (:class:`CancelWatch`:
loaded from the set when it subscribes, then pushed on the channel), so:

* a queued or delayed task is dropped by the worker that fetches it: it never runs;
* a running task is asked to stop: ``current_task().cancel_requested`` turns true on its
  worker (an async task is cancelled); whatever it ends with is not recorded (its outcome is
  CANCELLED) and it is not retried.

A task fetched in the moment between the cancel and the announcement reaching its worker starts,
then is asked to stop at once. ``cancel()`` returns True if it cancelled the task, False if the
task had already ended (or was cancelled before). An id Redis knows nothing of (never published,
or its result expired) cannot be told from a queued task without scanning the streams: it is
recorded as cancelled (True). A workflow step's id (``<run id>.<n>``) is refused: a step is
cancelled with its run.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from ..config import TaskStatus
from ..errors import TaskCancelled, wire_name
from .protocol import MSG_ID, MSG_OPTIONS, OPT_IDEMPOTENCY_KEY, OPT_SCHEDULE, STATUS_CODES

if TYPE_CHECKING:
    from .redis import RedisBroker

__all__ = ["CancelWatch", "cancel_task", "settle_dropped"]

log = logging.getLogger("catzilla_tasks.worker")

MARK_TTL = 86400.0  # at least this long (seconds) a cancelled id is remembered by the workers


def _mark_ms(broker: RedisBroker) -> int:
    return int(max(broker.result_ttl, MARK_TTL) * 1000)


def _glob_escape(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


def cancel_task(broker: RedisBroker, task_id: str) -> bool:
    """Cancel the task ``task_id`` (see the module docstring): True if this call cancelled it,
    False if it had ended already."""
    if not isinstance(task_id, str) or not task_id or not task_id.isprintable() or task_id != task_id.strip():
        raise ValueError(f"task_id: expected a task id (a non-empty string), got {task_id!r}")
    run, dot, step = task_id.rpartition(".")
    if dot and run and step.isdigit():
        # a step's id (<run id>.<n>): its worker would drop it and its run would wait forever
        raise ValueError(f"task {task_id} is a step of workflow run {run}: cancel the run ({run}) instead")
    rec = broker.serializer.dumps(
        [STATUS_CODES[TaskStatus.CANCELLED], [wire_name(TaskCancelled), f"task {task_id} was cancelled", ""]]
    )
    script = broker.redis.register_script(_scripts().CANCEL_TASK)
    rc = script(
        keys=[broker.result_key(task_id), broker.cancelled_key],
        args=[task_id, rec, int(broker.result_ttl * 1000), _mark_ms(broker), broker.cancel_channel],
    )
    if int(rc) != 1:
        return False
    _unschedule(broker, task_id)
    return True


def _scripts() -> Any:
    from . import scripts

    return scripts


def _unschedule(broker: RedisBroker, task_id: str) -> int:
    """Remove a cancelled task from the delayed set, if it waits there (a scan of the set for
    members holding its id, each one decoded to be sure): it never comes back to a stream, and
    no worker settles it, so its idempotency key's record and its schedule's marker are settled
    here (``lua/task_settled.lua``)."""
    r = broker.redis
    members = []
    opts: dict[str, Any] = {}
    for member in r.zscan_iter(broker.delayed_key, match=f"*{_glob_escape(task_id)}*", count=1000):
        raw = member[0] if isinstance(member, tuple) else member
        try:
            msg = broker.serializer.loads(raw[1:])
        except Exception:  # noqa: BLE001, S112 - not a message of ours: left alone
            continue
        if isinstance(msg, list) and msg and msg[MSG_ID] == task_id:
            members.append(raw)
            if len(msg) > MSG_OPTIONS and isinstance(msg[MSG_OPTIONS], dict):
                opts = msg[MSG_OPTIONS]
    if not members:
        return 0
    n = int(r.register_script(_scripts().UNSCHEDULE)(keys=[broker.delayed_key], args=members))
    if n:
        # no worker will see it: what refers to it lets go here, as a worker does at a task's end
        # (its idempotency key's submit record keeps no longer than its CANCELLED outcome, its
        # schedule's run-in-progress marker goes: an overlap=False schedule fires again)
        settle_dropped(broker, [(task_id, opts)], int(broker.result_ttl * 1000))
    return n


def settle_dropped(broker: RedisBroker, tasks: list[tuple[str, Any]], keep_ms: int) -> None:
    """Tasks taken out of the queue for good without a worker (cancelled while delayed,
    purged), as ``(task id, message options)``: the submit records of their idempotency keys
    are kept ``keep_ms`` more at most (-1: deleted) and the run markers of their schedules go
    (``lua/task_settled.lua``, which touches them only if they still name that task)."""
    script = broker.redis.register_script(_scripts().TASK_SETTLED)
    pipe = broker.redis.pipeline(transaction=False)
    for task_id, opts in tasks:
        key = opts.get(OPT_IDEMPOTENCY_KEY) if isinstance(opts, dict) else None
        sched = opts.get(OPT_SCHEDULE) if isinstance(opts, dict) else None
        if key is None and sched is None:
            continue
        script(
            keys=[
                broker.dedup_key(str(key)) if key is not None else "",
                broker.schedule_key(str(sched)) + ":run" if sched is not None else "",
            ],
            args=[task_id, keep_ms],
            client=pipe,
        )
    if pipe.command_stack:
        pipe.execute()


class CancelWatch:
    """A worker's view of the cancelled tasks: ``ids`` (the recent cancelled ids, loaded from
    the cancelled set when it subscribes to the cancel channel, then kept up to date by it) and
    the handles of the tasks running here (``track``/``untrack``), which a cancel reaching the
    worker cancels. One thread and one connection per worker."""

    RELOAD_EVERY = 60.0  # seconds between reloads of the set (ids past their expiry drop out)

    def __init__(self, broker: RedisBroker) -> None:
        self.broker = broker
        self.ids: set[str] = set()
        self._running: dict[str, Any] = {}
        self._stop = threading.Event()
        self.ready = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, wait: float = 5.0) -> None:
        """Subscribe (in its thread) and wait up to ``wait`` seconds for the first load."""
        self._thread = threading.Thread(target=self._loop, name="catzilla-cancel-watch", daemon=True)
        self._thread.start()
        if not self.ready.wait(wait):
            log.warning("the cancel channel could not be joined within %.0f s; retrying in the background", wait)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def track(self, task_id: str, handle: Any) -> None:
        """A task started here (ask it to stop at once if it was cancelled meanwhile)."""
        self._running[task_id] = handle
        if task_id in self.ids:
            handle.cancel()

    def untrack(self, task_id: str) -> None:
        self._running.pop(task_id, None)

    def _cancelled(self, task_id: str) -> None:
        self.ids.add(task_id)
        h = self._running.get(task_id)
        if h is not None:
            log.info("task %s was cancelled while running here: asked to stop", task_id)
            h.cancel()

    def _load(self) -> None:
        now_ms = int(time.time() * 1000) - 60_000  # (a margin for clocks apart from the server's)
        got = self.broker.redis.zrangebyscore(self.broker.cancelled_key, now_ms, "+inf")
        fresh = {x.decode() if isinstance(x, bytes) else str(x) for x in got}
        self.ids = fresh
        for tid in fresh & self._running.keys():
            self._cancelled(tid)

    def _loop(self) -> None:
        import redis

        while not self._stop.is_set():
            ps = None
            try:
                ps = self.broker.redis.pubsub(ignore_subscribe_messages=True)
                ps.subscribe(self.broker.cancel_channel)
                self._load()  # after subscribing: a cancel meanwhile is in one or the other
                self.ready.set()
                reload_at = time.monotonic() + self.RELOAD_EVERY
                while not self._stop.is_set():
                    m = ps.get_message(timeout=0.5)
                    if m is not None and m.get("type") == "message":
                        data = m["data"]
                        self._cancelled(data.decode() if isinstance(data, bytes) else str(data))
                    if time.monotonic() >= reload_at:
                        self._load()
                        reload_at = time.monotonic() + self.RELOAD_EVERY
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("cancel channel: redis unavailable (%s); retrying", exc)
                self._stop.wait(0.5)
            except Exception:  # a defect or a refusing server: the thread must not die
                log.exception("cancel channel: unexpected error; retrying")
                self._stop.wait(1.0)
            finally:
                if ps is not None:
                    try:
                        ps.close()
                    except Exception:  # noqa: BLE001, S110 - closing a broken connection
                        pass
