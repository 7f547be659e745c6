"""Distributed mode: the same API across machines, on Redis (the ``[redis]`` extra).

Layout in Redis (``P`` = prefix, ``Q`` = queue name)::

    P:Q:q0 .. P:Q:q3   one Stream per priority (CRITICAL .. LOW), consumer group "workers"
    P:Q:delayed        sorted set of delayed tasks and retry back-offs (score: due time, ms)
    P:Q:dead           dead-letter Stream (tasks that exhausted their retries, garbage, unknown names)
    P:r:<task id>      a task's result: a one-element list with a TTL (waiters block on it)
    P:done:<key>       idempotency keys of tasks that succeeded (the id of the task that did it)
    P:claim:<key>      the claim of the copy of a keyed task running now (a lease its worker renews)
    P:idem:<key>       the first task submitted with an idempotency key (see dedup.py)
    P:Q:sched:<name>   a cluster-wide periodic task: next due time, last run... (see schedules.py)
    P:Q:cancelled      ids of cancelled tasks (see cancel.py), announced on channel P:Q:cancel
    P:wf:<run id>      a workflow run: its steps, counters and values (see scripts.py), with a TTL
    P:cluster:...      the cluster registry: workers, their figures, recent failures (registry.py)

A producer (``BackgroundTasks(broker="redis://...")``) XADDs each task to the stream of its
priority; a worker (``catzilla-tasks worker module:tasks``, see :mod:`.worker`) reads with
XREADGROUP, runs the task on its local engine and acknowledges only after it finished.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import numbers
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, cast

from .._redact import redact_url
from ..config import MAX_MS, RESERVED_QUEUE_NAMES, TaskConfig, TaskPriority, TaskStatus, reserved_queue_error
from ..errors import wire_name
from . import scripts, workflow_runs
from .base import ConsumerSession, FetchingBroker
from .group_commit import AsyncGroupCommit, GroupCommit, PerLoop
from .protocol import (
    CONFIG_ATTR,
    DEFAULT_CONFIG,
    MSG_ATTEMPTS,
    MSG_ID,
    MSG_OPTIONS,
    OPT_IDEMPOTENCY_KEY,
    OPT_SCHEDULE,
    STATUS_CODES,
    Overrides,
    RemoteTaskError,
    decode_error,
    encode_error,
    is_workflow_error,
    message,
    parse_result,
    task_name,
)
from .serialization import DecodeError, Serializer, msgpack_module

# a stream's entries as XRANGE returns them from a client without decode_responses
_Entries = list[tuple[bytes, dict[bytes, bytes]]]

try:
    import redis as _redis
    import redis.asyncio as _aredis
except ImportError:  # pragma: no cover - exercised only without the extra
    _redis = None  # type: ignore[assignment]
    _aredis = None  # type: ignore[assignment]

__all__ = ["RedisBroker", "RemoteResult", "RemoteTaskError", "decode_error", "encode_error", "task_name"]

GROUP = "workers"
# results bigger than this are refused (the task fails saying so): far below Redis's own limit on
# one value (proto-max-bulk-len, 512 MB by default, where the connection is reset), and a size at
# which a result belongs in a store of its own with a reference to it in the result
DEFAULT_MAX_RESULT_BYTES = 32 * 1024 * 1024
_REDIS_BULK_MAX = 512 * 1024 * 1024
# how long a blocking read waits past its block for Redis's reply before the connection is
# taken as dead (a spurious one only costs a reconnection: the wait goes on)
_READ_MARGIN = 2.0
# the longest block of one read of a wait without a timeout (a silent Redis is seen by then)
_WAIT_SLICE = 30.0
_CLIENT_DEFAULTS = {"socket_timeout": 30.0, "socket_connect_timeout": 10.0, "socket_keepalive": True}
# a unix socket's connection takes no TCP keepalive (redis-py's raises TypeError when given one)
_UNIX_CLIENT_DEFAULTS = {k: v for k, v in _CLIENT_DEFAULTS.items() if k != "socket_keepalive"}
# connections of an event loop's publishing client (add_task_async): the group commit uses one
_ASYNC_PUBLISH_CONNECTIONS = 8


def _driver_info() -> Any:
    """What our clients report in CLIENT SETINFO: redis-py's name and version, with this
    library as the upstream driver (``redis-py(catzilla-tasks_v0.1.0)`` in CLIENT LIST). Given
    here because redis-py, left to itself, looks its own version up in the installed packages'
    metadata (importlib.metadata: a scan of sys.path and an email parser) for every connection
    it creates; that costs a worker ~0.4 MiB of RSS for a string it has as ``redis.__version__``.
    None on redis-py versions without DriverInfo (< 7.1), which use their own defaults."""
    info = getattr(_redis, "DriverInfo", None)
    if info is None:
        return None
    from .. import __version__

    return info(lib_version=_redis.__version__).add_upstream_driver("catzilla-tasks", __version__)


async def _dropped(conn: Any) -> bool:
    """Whether a kept async connection can no longer carry a command: the server closed it
    since its last use (its end of stream arrived: CLIENT KILL, the server's idle ``timeout``, a
    restart) or it holds bytes nobody asked for. redis-py's pools check the same before lending
    a connection; the group commit's own connection is not lent by a pool."""
    check = getattr(conn, "can_read", None) or conn.can_read_destructive  # (redis-py < 8: the latter)
    try:
        return bool(await check())
    except (_redis.ConnectionError, _redis.TimeoutError, OSError):
        return True


def _require_redis() -> None:
    if _redis is None:
        raise ImportError("distributed mode needs the redis client: pip install 'catzilla-tasks[redis]'")


# the second part of the keys that are not a queue's (P:r:<task id>, P:done:<key>...): a queue
# of one of these names would share its keys with them
_KEY_KINDS = RESERVED_QUEUE_NAMES  # (config.py: no queue, in-process or here, takes one of these names)
_MAX_S = MAX_MS // 1000  # the longest TTL or timeout in seconds: the engine's limit, well within Redis's


def _seconds(value: Any, low: float = 0) -> bool:
    """A broker time in seconds: a real number (any type, as TaskConfig takes) from ``low`` to
    _MAX_S (NaN and infinity fail the comparison; these end up as PEXPIRE milliseconds, where
    they would fail every commit)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        value = float(value)  # compared as a float: a numpy float16 would not hold _MAX_S
    except OverflowError:  # an int past a float's range
        return False
    return low <= value <= _MAX_S


def _count(value: Any, high: float = float("inf")) -> bool:
    """A broker count: an integer of any type (numpy's too) from 1 to ``high``."""
    # Integral does not declare <=: int() is exact for any Integral (numpy's too)
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and 1 <= int(value) <= high


# the config a task given by name has (its decorator is in the worker's process): see _prepare
_NO_CONFIG = object()


class RedisBroker(FetchingBroker):
    """Where distributed tasks live: a Redis server (``redis://`` or ``rediss://`` for TLS,
    password in the URL as ``redis://:secret@host:6379/0``).

    * ``queue``: the name of this set of streams; producers and workers of one queue share them
      (not ``r``, ``done``, ``claim``, ``wf``, ``idem``, ``p``, ``rl``, ``cc`` or ``cluster``: those name other
      keys under the prefix).
    * ``serializer``: ``"msgpack"`` (default) or ``"json"``; ``"pickle"`` only together with
      ``allow_pickle=True`` (anyone who can write to the Redis could then run code in workers).
    * ``result_ttl``: seconds a result is kept (0: results are not stored, ``wait()`` refuses).
    * ``visibility_timeout``: seconds after which a task of a worker that stopped
      acknowledging (it died) is handed to another worker. A live worker keeps its long tasks.
    * ``idempotency_ttl``: seconds a finished task's idempotency key is remembered (> 0: every
      key expires).
    * ``max_deliveries``: a task reclaimed from dead workers this many times (it may be what
      kills them) goes to the dead letters instead of another worker; None: no limit.
    * ``max_result_bytes``: the largest result record a worker stores (default 32 MiB; also kept
      under the server's ``proto-max-bulk-len`` when the worker can read it). A task whose
      encoded return value is bigger fails with ValueError saying so (dead-lettered as any
      failure); the other tasks of its batch are not affected.
    * ``dead_letter_maxlen``: most dead letters kept (a worker's XADD trims the oldest).
    * ``workflow_ttl``: seconds a workflow run's data is kept while no step finishes (the
      countdown restarts at each step that succeeds; a step's ``delay_ms`` is added); a run
      idle that long is dropped. An ended run is kept ``result_ttl``.

    Nothing is sent anywhere but the configured server.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        queue: str = "default",
        prefix: str = "catzilla",
        serializer: str = "msgpack",
        allow_pickle: bool = False,
        result_ttl: float = 3600,
        visibility_timeout: float = 60.0,
        idempotency_ttl: float = 86400,
        max_deliveries: int | None = 10,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
        dead_letter_maxlen: int = 10_000,
        workflow_ttl: float = 7 * 86400,
        **client_options: Any,
    ) -> None:
        _require_redis()
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                "broker URL: expected redis://[:password@]host:port/db, rediss://... (TLS) or unix://..., "
                f"got {redact_url(url)!r}"
            )
        for field, value in (("queue", queue), ("prefix", prefix)):
            if not isinstance(value, str) or not value or any(c in value for c in " {}\n"):
                raise ValueError(f"{field}: must be a non-empty name without spaces or braces, got {value!r}")
        if queue in _KEY_KINDS:  # P:done:q0 would be both a stream and the done key of "q0"
            raise reserved_queue_error("queue", queue)
        if not _seconds(result_ttl):
            raise ValueError(f"result_ttl: must be a number of seconds >= 0 and at most {_MAX_S}, got {result_ttl!r}")
        for ttl_field, ttl in (("idempotency_ttl", idempotency_ttl), ("workflow_ttl", workflow_ttl)):
            if not _seconds(ttl, 0.001):  # 0 would keep them forever: every key must expire
                raise ValueError(f"{ttl_field}: must be a number of seconds >= 0.001 and at most {_MAX_S}, got {ttl!r}")
        # XADD MAXLEN takes a signed 64-bit count: past it every dead-letter XADD would fail
        if not _count(dead_letter_maxlen, 2**63 - 1):
            raise ValueError(
                f"dead_letter_maxlen: must be an integer from 1 to 2**63 - 1, got {dead_letter_maxlen!r:.40}"
            )
        if max_deliveries is not None and not _count(max_deliveries):
            raise ValueError(f"max_deliveries: must be an integer >= 1 or None (no limit), got {max_deliveries!r}")
        if not _seconds(visibility_timeout, 0.001):
            raise ValueError(
                f"visibility_timeout: must be a number of seconds >= 0.001 and at most {_MAX_S}, "
                f"got {visibility_timeout!r}"
            )
        if not (_count(max_result_bytes, _REDIS_BULK_MAX) and max_result_bytes >= 1024):
            raise ValueError(
                f"max_result_bytes: must be an integer from 1024 to {_REDIS_BULK_MAX} (Redis's own "
                f"maximum), got {max_result_bytes!r}"
            )
        self.url = url
        self.queue = queue
        self.prefix = prefix
        self.serializer = Serializer(serializer, allow_pickle=allow_pickle)
        # plain Python numbers from here (a numpy scalar in a command would be sent as its repr)
        self.result_ttl = float(result_ttl)
        self.visibility_timeout = float(visibility_timeout)
        self.idempotency_ttl = float(idempotency_ttl)
        self.max_deliveries = None if max_deliveries is None else int(max_deliveries)
        self.dead_letter_maxlen = int(dead_letter_maxlen)
        self.workflow_ttl = float(workflow_ttl)
        self.max_result_bytes = int(max_result_bytes)
        if not {"driver_info", "lib_name", "lib_version"} & client_options.keys():
            info = _driver_info()
            if info is not None:
                client_options = {"driver_info": info, **client_options}
        self._client_options = client_options
        self._defaults = _UNIX_CLIENT_DEFAULTS if url.startswith("unix://") else _CLIENT_DEFAULTS
        try:
            # a silent connection (a network partition: no reset, no reply) raises after
            # socket_timeout instead of blocking the worker for good; the worker's blocking
            # reads are far shorter (block_ms). Blocked waiters have their own pool, without one.
            self.redis = _redis.Redis.from_url(url, **{**self._defaults, **client_options})
        except ValueError as exc:
            # redis-py quotes the piece it could not parse ("... as 'ab'"), which may be a piece
            # of a password holding a raw '/', '?' or '#': its quoted values are not shown
            detail = re.sub(r"'[^']*'|\"[^\"]*\"", "'***'", str(exc))
            raise ValueError(
                f"broker URL: cannot parse {redact_url(url)!r} ({detail}); a password's '/', '?', "
                "'#', '@' and ':' must be percent-encoded"
            ) from None
        if self.redis.connection_pool.connection_kwargs.get("decode_responses"):
            self.redis.close()
            raise ValueError(
                "decode_responses=True (option or URL): the broker reads payloads and results as bytes; "
                "leave it off (with it, a worker cannot read a single task)"
            )
        # blocked waiters hold a connection each: their own pool, not capped, so they never
        # starve publishing and acknowledging. Its socket timeout bounds the handshake and plain
        # reads; a blocking read is given its own (_blocking_move), a little past its block
        self._wait_redis = _redis.Redis.from_url(
            url, **{**self._defaults, "max_connections": 2**31 - 1, **client_options}
        )
        base = f"{prefix}:{queue}"
        self.streams = tuple(f"{base}:q{p}" for p in range(4))
        self.delayed_key = f"{base}:delayed"
        self.dead_key = f"{base}:dead"
        # + a worker's consumer name: the token of its last commit (see RedisConsumer.commit)
        self.commit_mark_prefix = f"{base}:commit:"
        self._result_prefix = f"{prefix}:r:"
        self._done_prefix = f"{prefix}:done:"
        self._claim_prefix = f"{prefix}:claim:"
        self._wf_prefix = f"{prefix}:wf:"
        # issue 19 part 5, 6: named queues (routing.py), progress (progress.py)
        self._progress_prefix = f"{prefix}:p:"
        self._queue_keys: dict[str, tuple[tuple[str, ...], str]] = {queue: (self.streams, self.delayed_key)}
        # issue 19: schedules (schedules.py), submit-time deduplication (dedup.py), cancel (cancel.py)
        self._idem_prefix = f"{prefix}:idem:"
        self._sched_prefix = f"{base}:sched:"
        self.schedules_key = f"{base}:schedules"
        # (prefix-wide: a task routed to another queue is cancelled from any queue's broker, and
        # that queue's workers must hear of it; task ids are unique across queues)
        self.cancelled_key = f"{prefix}:cancelled"
        self.cancel_channel = f"{prefix}:cancel"
        self._dedup_submit = self.redis.register_script(scripts.DEDUP_SUBMIT)
        self._add_delayed = self.redis.register_script(scripts.ADD_DELAYED)
        self._bulk_xadd = self.redis.register_script(scripts.BULK_XADD)
        self._wf_cancel = self.redis.register_script(scripts.WF_CANCEL)
        self._redrive = self.redis.register_script(scripts.REDRIVE)
        self._publish = self.redis.register_script(scripts.PUBLISH)
        # group commit of concurrent publishes: across threads, and per event loop (add_task_async)
        self._group = GroupCommit(self._flush_begin, self._flush_end)
        self._agroups = PerLoop(self._new_agroup, lambda value: value[4]())
        self._local = threading.local()
        self._overrides = Overrides()
        # the async client of each loop's result waits (closed when its loop shuts down)
        self._aclients = PerLoop(self._new_aclient, lambda client: client.aclose())
        # never a leading "-": `catzilla-tasks inspect ID` / `cancel ID` (and any command line)
        # would take it for an option (one process in 64 published such ids)
        base = base64.urlsafe_b64encode(os.urandom(6)).decode()
        self._id_base = "_" + base[1:] if base[0] == "-" else base
        self._id_next = itertools.count()
        self._names: dict[Any, str] = {}
        # a function -> what its plain calls send but id and payload (see _prepare)
        self._plain: dict[Any, tuple[Any, str, int, int, str | None]] = {}
        self._callbacks: _Watcher | None = None
        self._watcher_lock = threading.Lock()

    def consumer(self, name: str) -> ConsumerSession:
        """A worker's consumer on this broker's streams (see :mod:`.redis_consumer`)."""
        from .redis_consumer import RedisConsumer

        return RedisConsumer(self, name)

    # -- keys ------------------------------------------------------------------------------
    def result_key(self, task_id: str) -> str:
        return self._result_prefix + task_id

    def done_key(self, idempotency_key: str) -> str:
        return self._done_prefix + idempotency_key

    def claim_key(self, idempotency_key: str) -> str:
        return self._claim_prefix + idempotency_key

    def workflow_key(self, run_id: str) -> str:
        return self._wf_prefix + run_id

    def progress_key(self, task_id: str) -> str:
        return self._progress_prefix + task_id

    def queue_keys(self, queue: str | None) -> tuple[tuple[str, ...], str]:
        """(the four priority streams, the delayed set) of a named queue (None: this broker's)."""
        if queue is None:
            queue = self.queue
        hit = self._queue_keys.get(queue)
        if hit is None:
            if queue in _KEY_KINDS:
                raise reserved_queue_error("queue", queue)
            base = f"{self.prefix}:{queue}"
            hit = self._queue_keys[queue] = (tuple(f"{base}:q{p}" for p in range(4)), f"{base}:delayed")
        return hit

    def dedup_key(self, idempotency_key: str) -> str:
        return self._idem_prefix + idempotency_key

    def schedule_key(self, name: str) -> str:
        return self._sched_prefix + name

    # -- publishing ------------------------------------------------------------------------
    def _new_id(self) -> str:
        # a random per-process base and a counter: unique, short (it is in every message);
        # next() of an itertools.count is atomic under the GIL
        return f"{self._id_base}{next(self._id_next):x}"

    def _prepare(
        self, func: Any, args: tuple, kwargs: dict[str, Any] | None, cfg: TaskConfig | None, idempotency_key: str | None
    ) -> tuple[str, tuple[int, int, bytes], str | None]:
        """A task's id, what publishing it sends: (priority, delay in ms, payload), and the
        named queue it is routed to (None: this broker's). Bad input (an unnamed function,
        options or arguments that cannot travel) raises here, at the caller's site, before its
        message joins a flush of others.

        A plain call (no per-call options, no key) of a function seen before takes what it
        sends but its id and payload from ``_plain``: (its decorator config as read then, name,
        priority, delay, queue), valid while the function still carries that config object
        (configs are immutable; a re-decorated function carries a new one)."""
        if cfg is None and idempotency_key is None:
            try:
                hit = self._plain.get(func)
            except TypeError:  # (an unhashable callable: the general path says what it is)
                hit = None
            if hit is not None and (
                hit[0] is _NO_CONFIG if isinstance(func, str) else getattr(func, CONFIG_ATTR, None) is hit[0]
            ):
                tid = self._new_id()
                payload = self.serializer.dumps(message(tid, hit[1], args, kwargs, None))
                return tid, (hit[2], hit[3], payload), hit[4]
        return self._prepare_general(func, args, kwargs, cfg, idempotency_key)

    def _prepare_general(
        self, func: Any, args: tuple, kwargs: dict[str, Any] | None, cfg: TaskConfig | None, idempotency_key: str | None
    ) -> tuple[str, tuple[int, int, bytes], str | None]:
        plain = cfg is None and idempotency_key is None
        own = _NO_CONFIG if isinstance(func, str) else getattr(func, CONFIG_ATTR, None)  # (the key of _plain)
        try:
            name = self._names[func]
        except (KeyError, TypeError):
            name = task_name(func)
            if len(self._names) < 4096 and not isinstance(func, str):
                try:
                    self._names[func] = name
                except TypeError:
                    pass
        if cfg is None:
            cfg = own if isinstance(own, TaskConfig) else DEFAULT_CONFIG
        opts = None if isinstance(func, str) else self._overrides(func, cfg)
        if idempotency_key is not None:
            if not isinstance(idempotency_key, str) or not idempotency_key:
                raise ValueError(f"idempotency_key: expected a non-empty string, got {idempotency_key!r}")
            opts = dict(opts or ())
            opts[OPT_IDEMPOTENCY_KEY] = idempotency_key
        tid = self._new_id()
        payload = self.serializer.dumps(message(tid, name, args, kwargs, opts))
        delay = cfg.delay_ms
        queue = None if cfg.queue is None or cfg.queue == self.queue else cfg.queue  # a named queue (routing)
        sent = (int(cfg._priority), int(delay) if delay > 0 else 0)
        if plain and opts is None and len(self._plain) < 4096:
            try:
                self._plain[func] = (own, name, *sent, queue)
            except TypeError:
                pass
        return tid, (*sent, payload), queue

    def submit(
        self,
        func: Any,
        args: tuple,
        kwargs: dict[str, Any] | None,
        cfg: TaskConfig | None,
        idempotency_key: str | None = None,
    ) -> RemoteResult:
        """Publish one task (held until the end of a ``batch()`` block); return its RemoteResult
        once Redis holds it. Concurrent calls from several threads are group-committed: one
        flush (one round trip) carries every message queued while the previous one was in
        flight (see :mod:`.group_commit`), whatever queue each is routed to. A keyed task
        (deduplicated at submit) is sent on its own, one round trip."""
        tid, item, queue = self._prepare(func, args, kwargs, cfg, idempotency_key)
        if idempotency_key is not None:  # deduplicated at submit, one script of its own (see dedup.py)
            from . import dedup

            return dedup.submit(self, tid, idempotency_key, *item, queue)
        buf = getattr(self._local, "buf", None)
        if buf is not None:  # inside batch(): sent at its end
            self._buffer(buf, item, queue)
        elif queue is not None:  # routed: its queue's streams (a bad queue name raises here)
            self.queue_keys(queue)
            self._group.publish((*item, queue))
        else:
            self._group.publish(item)
        return RemoteResult(tid, self)

    def submit_async(
        self,
        func: Any,
        args: tuple,
        kwargs: dict[str, Any] | None,
        cfg: TaskConfig | None,
        idempotency_key: str | None = None,
    ) -> Awaitable[RemoteResult]:
        """``submit`` for a coroutine (call it on the running loop's thread, await what it
        returns): published on ``redis.asyncio`` without blocking the event loop,
        group-committed with the other coroutines of this loop (one connection per loop
        publishing). Bad input raises here, at the call. Inside a ``batch()`` block of this
        thread the task is held as ``submit`` holds it.

        A task that joins the group commit (not keyed, not held by ``batch()``) returns the
        future of its flush itself, which gives the handle (no coroutine of its own: one frame
        less per publish)."""
        tid, item, queue = self._prepare(func, args, kwargs, cfg, idempotency_key)
        if idempotency_key is None and getattr(self._local, "buf", None) is None:
            loop = asyncio.get_running_loop()
            sent: tuple[Any, ...] = item
            if queue is not None:  # routed: its queue's streams (a bad queue name raises here)
                self.queue_keys(queue)
                sent = (*item, queue)
            return self._agroups.get(loop)[0].enqueue(loop, sent, RemoteResult(tid, self))
        return self._submit_async_apart(tid, item, queue, idempotency_key)

    async def _submit_async_apart(
        self, tid: str, item: tuple[int, int, bytes], queue: str | None, idempotency_key: str | None
    ) -> RemoteResult:
        """``submit_async`` of a task held by ``batch()``, or keyed."""
        buf = getattr(self._local, "buf", None)
        prio, delay_ms, payload = item
        if idempotency_key is not None:
            from . import dedup

            if buf is not None:  # held, deduplicated when the block is published
                return dedup.submit(self, tid, idempotency_key, *item, queue)
            # deduplicated at submit as submit does, on this loop's client (one round trip)
            handle = RemoteResult(tid, self)
            streams, delayed = self.queue_keys(queue)
            dedup_submit = self._agroups.get(asyncio.get_running_loop())[2]
            first = await dedup_submit(
                keys=[self.dedup_key(idempotency_key), streams[prio], delayed],
                args=dedup._args(self, tid, prio, delay_ms, payload),
            )
            handle.task_id = first.decode() if isinstance(first, bytes) else str(first)
            return handle
        # held by batch() (a task outside one is submit_async's own path)
        self._buffer(cast("list[list[Any]]", buf), item, queue)
        return RemoteResult(tid, self)

    def _buffer(self, buf: list[list[Any]], item: tuple[int, int, bytes], queue: str | None = None) -> None:
        """Hold a task in this thread's ``batch()`` buffer (a routed one with its queue's keys:
        a bad queue name raises here, at its caller)."""
        prio, delay_ms, payload = item
        if queue is not None:
            streams, delayed = self.queue_keys(queue)
            buf[6].append((streams, delayed, prio, int(delay_ms), payload))
        elif delay_ms > 0:
            buf[4].append((delay_ms, b"%d" % prio + payload))
        else:
            buf[prio].append(payload)

    def _flush_command(self, items: list[tuple[Any, ...]]) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of ``scripts.PUBLISH`` for one flush (all of it or nothing): five keys
        per queue it publishes to (an item is (priority, delay in ms, payload), plus the queue's
        name when it is routed to another queue than this broker's)."""
        groups: dict[str | None, list[list[Any]]] = {}
        for it in items:
            queue = it[3] if len(it) > 3 else None
            g = groups.get(queue)
            if g is None:
                g = groups[queue] = [[], [], [], [], []]
            prio, delay_ms, payload = it[0], it[1], it[2]
            if delay_ms > 0:
                g[4] += (delay_ms, b"%d" % prio + payload)
            else:
                g[prio].append(payload)
        keys: list[str] = []
        counts: list[Any] = []
        rest: list[Any] = []
        for queue, g in groups.items():
            streams, delayed = self.queue_keys(queue)
            keys += streams
            keys.append(delayed)
            for k in range(4):
                counts.append(len(g[k]))
                rest += g[k]
            counts.append(len(g[4]) // 2)
            rest += g[4]
        return keys, counts + rest

    def _flush_plan(self, items: list[tuple[Any, ...]]) -> tuple[Any, list[Any], list[Any]]:
        """How one flush is sent, atomically: (script, KEYS, ARGV), or (None, [stream], [payload])
        for a lone message, one XADD as it always was. Several messages are one call of
        ``scripts.PUBLISH``, which checks every key it writes before writing any."""
        if len(items) == 1:
            it = items[0]
            prio, delay_ms, payload = it[0], it[1], it[2]
            streams, delayed = self.queue_keys(it[3]) if len(it) > 3 else (self.streams, self.delayed_key)
            if delay_ms > 0:
                return self._add_delayed, [delayed], [delay_ms, b"%d" % prio + payload]
            return None, [streams[prio]], [payload]
        keys, args = self._flush_command(items)
        return self._publish, keys, args

    def _flush_begin(self, items: list[tuple[Any, ...]]) -> tuple[Any, Any]:
        """Send one flush of the threads' group commit on a connection of the pool (its reply is
        read by ``_flush_end``, maybe on another thread). A connection that cannot send leaves
        it to ``_flush_end``, which sends it again through the client (with its retries)."""
        plan = self._flush_plan(items)
        script, keys, args = plan
        if script is None:
            command: tuple[Any, ...] = ("XADD", keys[0], "*", "m", args[0])
        else:
            command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        pool = self.redis.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_command(*command)
        except (_redis.ConnectionError, _redis.TimeoutError, OSError):
            conn.disconnect()
            pool.release(conn)
            return None, plan
        except BaseException:
            conn.disconnect()
            pool.release(conn)
            raise
        return conn, plan

    def _flush_end(self, token: tuple[Any, Any]) -> None:
        """Read the reply of a flush sent by ``_flush_begin`` (its error is the flush's). A flush
        that could not be sent, or a script Redis does not have cached yet, is sent again
        through the client (which loads the script); nothing of it was applied."""
        conn, (script, keys, args) = token
        if conn is not None:
            pool = self.redis.connection_pool
            try:
                conn.read_response()
                return
            except _redis.exceptions.NoScriptError:
                pass  # (the connection is fine) loaded and sent again below
            except _redis.ResponseError:
                raise  # the flush was refused as a whole (see scripts.PUBLISH)
            except BaseException:
                # its reply is lost (the flush may have been applied): every caller of the
                # flush gets the error (at least once: they may publish again)
                conn.disconnect()
                raise
            finally:
                pool.release(conn)
        if script is None:
            self.redis.xadd(keys[0], {"m": args[0]})
        else:
            script(keys=keys, args=args)

    def _new_agroup(self, loop: asyncio.AbstractEventLoop) -> tuple[AsyncGroupCommit, Any, Any, Any, Any]:
        # this loop's publishing client: one flush in flight at a time, so one connection in use
        # for the group commit; keyed tasks (their own script each) wait for one of a few more.
        # The broker's socket timeouts: a silent Redis fails the flush, it does not hang it
        opts = {**self._defaults, "max_connections": _ASYNC_PUBLISH_CONNECTIONS, **self._client_options}
        client = _aredis.Redis(connection_pool=_aredis.BlockingConnectionPool.from_url(self.url, **opts))
        scripts_of = {id(self._publish): client.register_script(scripts.PUBLISH)}
        scripts_of[id(self._add_delayed)] = client.register_script(scripts.ADD_DELAYED)
        pool = client.connection_pool
        # the group commit's own connection, kept while it works: its socket reads and writes
        # carry no timeout of their own (redis-py wraps each in a task of its own for one, twice
        # per flush); one asyncio.timeout bounds the whole flush instead
        timeout = pool.connection_kwargs.get("socket_timeout")
        kwargs = {**pool.connection_kwargs, "socket_timeout": None}
        held: list[Any] = []

        async def drop() -> None:  # (its reply is lost or it failed: never reused)
            if held:
                await asyncio.shield(held.pop().disconnect())

        async def send(items: list[tuple[Any, ...]]) -> None:
            script, keys, args = self._flush_plan(items)
            if script is None:
                command: tuple[Any, ...] = ("XADD", keys[0], "*", "m", args[0])
            else:
                command = ("EVALSHA", script.sha, len(keys), *keys, *args)
            # as in _flush_end: a flush that could not be sent, or an uncached script, goes
            # through the client (which loads it, with its retries)
            if held and held[0].is_connected and await _dropped(held[0]):
                await drop()  # closed by the server since its last flush (CLIENT KILL, idle timeout, restart)
            if not held:
                held.append(pool.connection_class(**kwargs))
            conn = held[0]
            try:
                async with asyncio.timeout(timeout):
                    try:
                        await conn.send_command(*command)
                    except (_redis.ConnectionError, _redis.TimeoutError, OSError):
                        await drop()  # not sent: sent again through the client below
                    else:
                        await conn.read_response()
                        return
            except _redis.exceptions.NoScriptError:
                pass
            except _redis.ResponseError:
                raise  # the flush was refused as a whole (see scripts.PUBLISH)
            except TimeoutError:  # (asyncio.timeout's): as the broker's socket timeout says it
                await drop()
                raise _redis.TimeoutError(
                    f"no reply from Redis in {timeout} s (socket_timeout): the flush may or may not have been stored"
                ) from None
            except BaseException:
                # reply lost (maybe applied), or cancelled with a reply still to come
                await drop()
                raise
            if script is None:
                await client.xadd(keys[0], {"m": args[0]})
            else:
                await scripts_of[id(script)](keys=keys, args=args)

        async def close() -> None:  # (the loop shuts down: see PerLoop)
            with contextlib.suppress(Exception):
                await drop()
            await pool.disconnect()

        dedup_submit = client.register_script(scripts.DEDUP_SUBMIT)
        return AsyncGroupCommit(send), client, dedup_submit, scripts_of[id(self._add_delayed)], close

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Publish every add_task of this block (in this thread) at its end, in one round trip
        (a Lua script XADDs up to 1,000 tasks per call). If the block raises, nothing of it is
        published; if publishing fails, the error is raised here."""
        if getattr(self._local, "buf", None) is not None:
            yield  # nested: the outer block publishes
            return
        # four priorities, the delayed ones, the keyed ones (deduplicated: see dedup.py), then those
        # of named queues (routing)
        buf: list[list[Any]] = [[], [], [], [], [], [], []]
        self._local.buf = buf
        try:
            yield
        finally:
            self._local.buf = None
        pipe = self.redis.pipeline(transaction=False)
        for prio in range(4):
            items = buf[prio]
            for i in range(0, len(items), 1000):
                self._bulk_xadd(keys=[self.streams[prio]], args=items[i : i + 1000], client=pipe)
        for delay, member in buf[4]:
            self._add_delayed(keys=[self.delayed_key], args=[delay, member], client=pipe)
        for streams, delayed, prio, delay, payload in buf[6]:  # named queues (routing)
            if delay > 0:
                self._add_delayed(keys=[delayed], args=[delay, b"%d" % prio + payload], client=pipe)
            else:
                pipe.xadd(streams[prio], {"m": payload})
        if buf[5]:  # (last: settle_batch reads their replies at the end)
            from . import dedup

            dedup.queue_batch(self, pipe, buf[5])
        if any(buf):
            replies = pipe.execute()
            if buf[5]:
                dedup.settle_batch(replies, buf[5])

    # -- workflows ---------------------------------------------------------------------------
    def run_workflow(self, plan: Any) -> RemoteResult:
        """Start a validated workflow plan (``workflows._Plan``) on the workers: one MULTI
        writes the run's hash (every step's message, dependency counters, dependents) and
        XADDs the steps without dependencies. From then on the workers release the steps
        (``scripts.WF_STEP_DONE``), so this process may exit. Returns the run's RemoteResult
        (value: every step's value by step id; a failed step: WorkflowError)."""
        ser = self.serializer
        if ser.name not in ("msgpack", "json"):
            raise ValueError(
                f"workflow {plan.name!r}: across workers, a workflow's values travel as msgpack or JSON "
                f"(the run's result is assembled in Redis); this broker's serializer is {ser.name!r}"
            )
        if not self.result_ttl:
            raise ValueError(
                f"workflow {plan.name!r}: this broker stores no results (result_ttl=0), and steps pass their "
                "values through Redis; create the RedisBroker with result_ttl > 0"
            )
        run_id = self._new_id()
        n = len(plan.ids)
        key = self.workflow_key(run_id)
        res_key = self.result_key(run_id)
        pipe = self.redis.pipeline(transaction=True)
        if n == 0:
            pipe.rpush(res_key, ser.dumps([0, {}]))
            pipe.pexpire(res_key, int(self.result_ttl * 1000))
            pipe.execute()
            return RemoteResult(run_id, self)
        fields: dict[str, Any] = {"state": "run", "left": n, "n": n, "name": plan.name}
        if ser.name == "msgpack":
            mp = msgpack_module()
            head = b"m\x92\x00" + (
                bytes([0x80 | n])
                if n < 16
                else b"\xde" + n.to_bytes(2, "big")
                if n < 2**16
                else b"\xdf" + n.to_bytes(4, "big")
            )
            fields.update(head=head, sep=b"", colon=b"", tail=b"")
            enc_key = mp.packb
        else:
            import json

            fields.update(head=b"j[0,{", sep=b",", colon=b":", tail=b"}]")
            enc_key = lambda k: json.dumps(k).encode()  # noqa: E731
        roots: list[tuple[int, bytes, int]] = []
        longest_delay = 0
        for j, step in enumerate(workflow_runs.encode_steps(plan, run_id, ser)):
            fields[f"p:{j}"] = step.pending
            fields[f"d:{j}"] = ",".join(str(d) for d in step.dependents)
            fields[f"m:{j}"] = b"%d" % step.priority + step.payload
            fields[f"k:{j}"] = enc_key(step.step_id)
            if step.delay_ms:
                fields[f"y:{j}"] = step.delay_ms  # released into the delayed set (wf_step_done.lua)
                longest_delay = max(longest_delay, step.delay_ms)
            if step.pending == 0:
                roots.append((step.priority, step.payload, step.delay_ms))
        # a run that never ends (a step lost with the data of a Redis without persistence, say)
        # must not keep its hash for ever: it expires once no step finished for this long
        idle_ms = int(self.workflow_ttl * 1000) + longest_delay
        fields["ttl"] = idle_ms  # each step that succeeds restarts the countdown (WF_STEP_DONE)
        pipe.hset(key, mapping=cast("Mapping[Any, Any]", fields))
        pipe.pexpire(key, idle_ms)
        for prio, payload, delay in roots:
            if delay:
                self._add_delayed(keys=[self.delayed_key], args=[delay, b"%d" % prio + payload], client=pipe)
            else:
                pipe.xadd(self.streams[prio], {"m": payload})
        pipe.execute()
        return RemoteResult(run_id, self)

    def _step_values(self, run: dict) -> dict[str, Any]:
        """The values of the steps that succeeded, by step id, from a run's hash (HGETALL)."""
        fmt = (run.get(b"head") or b"m")[:1]
        out = {}
        for field, value in run.items():
            if field.startswith(b"v:"):
                k = run.get(b"k:" + field[2:])
                if k is None:  # a value without its step's key: not a step's
                    continue
                try:
                    out[self.serializer.loads(fmt + k)] = self.serializer.loads(value)
                except (DecodeError, TypeError):
                    continue
        return out

    def cancel_run(self, run_id: str) -> bool:
        """Cancel a workflow run (see Broker.cancel_run): one script marks it cancelled and
        stores its CANCELLED outcome, unless it has ended."""
        done = self._cancel_run_if_any(run_id)
        if done is None:
            raise ValueError(
                f"cancel_run({run_id!r}): no workflow run has this id; cancel(task_id) cancels a single task"
            )
        return done

    def _cancel_run_if_any(self, run_id: str) -> bool | None:
        """cancel_run's work: True if cancelled here, False if it had ended, None if the id names
        no workflow run (a single task's)."""
        ttl_ms = int(self.result_ttl * 1000) or 3_600_000
        key = self.workflow_key(run_id)
        name = cast("bytes | None", self.redis.hget(key, "name"))
        label = f"workflow {name.decode(errors='replace')!r}" if name is not None else "workflow"
        rec = self.serializer.dumps(
            [
                STATUS_CODES[TaskStatus.CANCELLED],
                ["catzilla_tasks.TaskCancelled", f"{label} run {run_id} was cancelled", ""],
            ]
        )
        rc = self._wf_cancel(keys=[key, self.result_key(run_id)], args=[rec, ttl_ms])
        if rc == 1:
            return True
        if rc == 0:
            return False
        return None

    def cancel(self, task_id: str) -> bool:
        """Cancel a task or a workflow run by id, from any process (see cancel.py and
        ``cancel_run``): True if this call cancelled it, False if it had already ended."""
        done = self._cancel_run_if_any(task_id)
        if done is not None:
            return done
        from .cancel import cancel_task

        return cancel_task(self, task_id)

    def publish_raw(self, prio: int, payload: bytes) -> None:
        """XADD a ready payload (used by redrive and tests)."""
        self.redis.xadd(self.streams[prio], {"m": payload})

    # -- results -----------------------------------------------------------------------------
    def result(self, task_id: str) -> RemoteResult:
        """The RemoteResult of a task id (from any process)."""
        return RemoteResult(task_id, self)

    def _aclient(self) -> Any:
        return self._aclients.get(asyncio.get_running_loop())

    def _new_aclient(self, loop: asyncio.AbstractEventLoop) -> Any:
        opts = {"max_connections": 2**31 - 1, "socket_timeout": None, **self._client_options}
        return _aredis.Redis.from_url(self.url, **opts)

    # -- dead letters ---------------------------------------------------------------------
    def dead_letters(self, count: int = 100, start: str = "-") -> list[dict[str, Any]]:
        """Tasks in the dead-letter stream, oldest first: id, task_id, name, error, priority, at."""
        out = []
        for entry_id, fields in cast(_Entries, self.redis.xrange(self.dead_key, min=start, count=count)):
            f = {k.decode(): v for k, v in fields.items()}
            out.append(
                {
                    "id": entry_id.decode(),
                    "task_id": f.get("i", b"").decode(errors="replace"),
                    "name": f.get("n", b"").decode(errors="replace"),
                    "error": f.get("e", b"").decode(errors="replace"),
                    "priority": TaskPriority(_dead_priority(f.get("p"))).name,
                    "at": int(f["t"]) / 1000 if f.get("t", b"").isdigit() else 0.0,
                    "payload": f.get("m", b""),
                }
            )
        return out

    def dead_letter_count(self) -> int:
        return int(self.redis.xlen(self.dead_key))

    def redrive(self, ids: Iterable[str] | None = None) -> int:
        """Put dead-lettered tasks back in their streams (all of them when ``ids`` is None: those
        dead when it is called, not those dead-lettered meanwhile), with a fresh count of
        retries and no recorded outcome (its waiters get the re-run's); returns how many this
        call moved. Each move is one Lua script that queues the task only if it deleted the dead
        letter, so concurrent re-drives move each dead letter once."""
        wanted = None if ids is None else {str(i) for i in ids}
        moved = 0
        start = "-"
        # only what is dead now: a re-driven task that fails again is dead-lettered anew, after
        # these; read on, a worker failing it at once would keep this loop going for ever
        newest = cast(_Entries, self.redis.xrevrange(self.dead_key, count=1))
        if not newest:
            return 0
        end = newest[0][0]
        while True:
            batch = cast(_Entries, self.redis.xrange(self.dead_key, min=start, max=end, count=500))
            if not batch:
                break
            pipe = self.redis.pipeline(transaction=False)  # each script is atomic on its own
            n = 0
            for entry_id, fields in batch:
                eid = entry_id.decode()
                if wanted is not None and eid not in wanted:
                    continue
                payload = fields.get(b"m", b"")
                prio = _dead_priority(fields.get(b"p"))
                task_id = fields.get(b"i", b"").decode(errors="replace")
                try:
                    msg = self.serializer.loads(payload)
                    if isinstance(msg, list) and len(msg) >= 5:
                        msg[MSG_ATTEMPTS] = 0  # a fresh count of attempts
                        payload = self.serializer.same_format(payload).dumps(msg)
                    if isinstance(msg, list) and msg and isinstance(msg[MSG_ID], str):
                        task_id = msg[MSG_ID]
                except (DecodeError, TypeError):
                    pass  # redriven as it is: it will be dead-lettered again, with its error
                keys = [self.dead_key, self.streams[prio]]
                if task_id:
                    keys.append(self.result_key(task_id))  # its recorded failure goes (see REDRIVE)
                self._redrive(keys=keys, args=[entry_id, payload], client=pipe)
                n += 1
            if n:
                moved += sum(pipe.execute())
            last = batch[-1][0].decode()
            ms, seq = last.split("-")
            start = f"{ms}-{int(seq) + 1}"
        return moved

    # -- housekeeping --------------------------------------------------------------------
    def queued(self) -> dict[str, int]:
        """Tasks waiting per priority (not yet read by a worker), plus delayed and dead."""
        pipe = self.redis.pipeline(transaction=False)
        for s in self.streams:
            pipe.xlen(s)
        pipe.zcard(self.delayed_key)
        pipe.xlen(self.dead_key)
        *lens, delayed, dead = pipe.execute()
        out = {p.name: int(n) for p, n in zip(TaskPriority, lens, strict=True)}
        out["delayed"] = int(delayed)
        out["dead"] = int(dead)
        return out

    def purge(self) -> None:
        """Delete this queue's streams, delayed set and dead letters (not results). The tasks
        deleted never end: the submit records of their idempotency keys and the run markers of
        their schedules go with them (a keyed add_task queues a new task, an overlap=False
        schedule fires again)."""
        gone = [*self._queued_options()]
        self.redis.delete(*self.streams, self.delayed_key, self.dead_key)
        if gone:
            from .cancel import settle_dropped

            settle_dropped(self, gone, -1)  # (no outcome to keep them for: the records go)

    def _queued_options(self) -> Iterator[tuple[str, Any]]:
        """``(task id, options)`` of the keyed and scheduled tasks in the streams and the
        delayed set (read in slices; undecodable messages are skipped)."""

        def of(payload: bytes) -> tuple[str, Any] | None:
            try:
                msg = self.serializer.loads(payload)
            except Exception:  # noqa: BLE001 - not a message of ours
                return None
            if not isinstance(msg, list) or len(msg) <= MSG_OPTIONS or not isinstance(msg[MSG_OPTIONS], dict):
                return None
            opts = msg[MSG_OPTIONS]
            return (str(msg[MSG_ID]), opts) if OPT_IDEMPOTENCY_KEY in opts or OPT_SCHEDULE in opts else None

        for stream in self.streams:
            start = "-"
            while True:
                batch = cast("list[Any]", self.redis.xrange(stream, start, "+", count=1000))
                for _eid, fields in batch:
                    hit = of(fields.get(b"m", b""))
                    if hit is not None:
                        yield hit
                if len(batch) < 1000:
                    break
                start = "(" + batch[-1][0].decode()
        for member, _ in self.redis.zscan_iter(self.delayed_key, count=1000):
            hit = of(member[1:])
            if hit is not None:
                yield hit

    def _blocking_move(self, key: str, block: float) -> bytes | None:
        """``BLMOVE key key LEFT LEFT block`` (the first record, left in place) on a waiters'
        connection, whose read gives up ``_READ_MARGIN`` past the block: a Redis gone silent
        (a dropped route: no reset, no reply) raises TimeoutError, it does not hold the waiter
        for good."""
        pool = self._wait_redis.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_command("BLMOVE", key, key, "LEFT", "LEFT", block)
            return conn.read_response(timeout=block + _READ_MARGIN)
        except BaseException:
            conn.disconnect()  # (a reply may still come on it: never reused)
            raise
        finally:
            pool.release(conn)

    def _watcher(self) -> _Watcher:
        """The one thread that runs every ``add_callback`` of this broker's results."""
        with self._watcher_lock:
            if self._callbacks is None:
                self._callbacks = _Watcher(self)
            return self._callbacks

    def close(self) -> None:
        with self._watcher_lock:
            watcher, self._callbacks = self._callbacks, None  # (a later add_callback starts a new one)
        if watcher is not None:
            watcher.close()
        self.redis.close()
        self._wait_redis.close()

    def __repr__(self) -> str:
        return f"<RedisBroker {redact_url(self.url)} queue={self.queue!r}>"


def _dead_priority(field: bytes | None) -> int:
    """A dead letter's priority field, as read back from Redis: 0-3, or NORMAL for anything else
    (one bad field must not break the listing or a re-drive of the whole stream)."""
    return int(field) if field in (b"0", b"1", b"2", b"3") else int(TaskPriority.NORMAL)


class RemoteResult:
    """The result of a task published to Redis, usable from any process: ``wait(timeout)``,
    ``await result``, ``status``, ``is_ready()``, ``add_callback(cb)``.

    Waiting blocks on the result key in Redis (BLMOVE of its one-element list onto itself),
    so a waiter is woken by the worker's write, not by polling. Every waiter on one result is
    woken. Each blocked waiter holds one Redis connection while it waits.
    """

    __slots__ = ("task_id", "_broker", "_final", "__weakref__")

    def __init__(self, task_id: str, broker: RedisBroker) -> None:
        self.task_id = task_id
        self._broker = broker
        self._final: tuple[TaskStatus, Any] | None = None

    def _check_results(self) -> None:
        if not self._broker.result_ttl:
            raise RuntimeError(
                "this broker stores no results (result_ttl=0); create the RedisBroker with result_ttl > 0 "
                "(seconds to keep them) to wait for results"
            )

    def _take(self, raw: bytes | None) -> tuple[TaskStatus, Any] | None:
        if raw is None:
            return None
        self._final = parse_result(self._broker.serializer, raw)
        return self._final

    @property
    def status(self) -> TaskStatus:
        """PENDING until a worker stored the outcome (queued and running are not told apart)."""
        if self._final is None:
            self._check_results()
            self._take(cast("bytes | None", self._broker.redis.lindex(self._broker.result_key(self.task_id), 0)))
        return self._final[0] if self._final is not None else TaskStatus.PENDING

    def is_ready(self) -> bool:
        return self.status.is_final

    @property
    def progress(self) -> Any:
        """The task's last ``set_progress()`` report (a ``Progress(fraction, message)``), or None
        before the first (kept ``result_ttl`` after it was written)."""
        from ..progress import from_wire

        raw = cast("bytes | None", self._broker.redis.get(self._broker.progress_key(self.task_id)))
        if raw is None:
            return None
        try:
            return from_wire(self._broker.serializer.same_format(raw).loads(raw))
        except DecodeError:
            return None

    done = is_ready

    def _outcome(self, run: dict | None = None) -> Any:
        status, value = self._final  # type: ignore[misc]
        if status is TaskStatus.SUCCEEDED:
            return value
        exc = decode_error(value)
        if is_workflow_error(exc):
            if run is None:
                run = self._broker.redis.hgetall(self._broker.workflow_key(self.task_id))
            exc.results = self._broker._step_values(run)  # type: ignore[attr-defined]
        raise exc

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the task finished; return its value or raise its exception (TimeoutError
        when not done within ``timeout`` seconds). A lost connection (Redis restarting) is
        re-established and the wait goes on."""
        if self._final is None:
            self._check_results()
            key = self._broker.result_key(self.task_id)
            client = self._broker._wait_redis
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                try:
                    if left is not None and left <= 0:
                        self._take(cast("bytes | None", client.lindex(key, 0)))
                    else:
                        self._take(
                            self._broker._blocking_move(
                                key, _WAIT_SLICE if left is None else min(max(left, 0.001), _WAIT_SLICE)
                            )
                        )
                except (_redis.ConnectionError, _redis.TimeoutError):
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError(
                            f"task {self.task_id}: Redis unreachable, not finished within {timeout} s"
                        ) from None
                    time.sleep(0.05)  # back-off before reconnecting
                    continue
                if (
                    self._final is not None
                    or (left is not None and left <= 0.001)
                    or (deadline is not None and time.monotonic() >= deadline)
                ):
                    break
            if self._final is None:
                raise TimeoutError(f"task {self.task_id} not finished within {timeout} s")
        return self._outcome()

    result = wait

    async def _await(self) -> Any:
        if self._final is None:
            self._check_results()
            key = self._broker.result_key(self.task_id)
            while self._final is None:
                try:  # as wait(): a lost connection (Redis restarting) is re-established, and
                    # a silent one (no reset, no reply) given up a little past the block
                    move = self._broker._aclient().blmove(key, key, _WAIT_SLICE, "LEFT", "LEFT")
                    self._take(await asyncio.wait_for(move, _WAIT_SLICE + _READ_MARGIN))
                except (_redis.ConnectionError, _redis.TimeoutError, TimeoutError):
                    await asyncio.sleep(0.05)  # back-off before reconnecting
        run = None
        if self._final[0] is not TaskStatus.SUCCEEDED and is_workflow_error(decode_error(self._final[1])):
            run = await self._broker._aclient().hgetall(self._broker.workflow_key(self.task_id))
        return self._outcome(run)

    def __await__(self) -> Any:
        return self._await().__await__()

    def _on_done(self, fn: Callable[[RemoteResult], Any]) -> None:
        """Call ``fn(self)`` once the task finished (from the broker's one callback thread)."""
        if self._final is not None or not self._broker.result_ttl:  # (no results: nothing to wait for)
            fn(self)
            return
        self._broker._watcher().add(self, fn)

    def add_callback(self, cb: Callable[[Any], Any]) -> None:
        """Call ``cb(value)`` when the task succeeds."""
        self._check_results()

        def done(r: RemoteResult) -> None:
            if r._final is not None and r._final[0] is TaskStatus.SUCCEEDED:
                cb(r._final[1])

        self._on_done(done)

    def cancel(self) -> bool:
        """Cancel the task (see ``RedisBroker.cancel``): a queued or delayed task never runs, a
        running one is asked to stop (``current_task().cancel_requested``; an async task is
        cancelled); its outcome is CANCELLED (``wait()`` raises TaskCancelled) for every waiter.
        A workflow run (the result of ``execute()``): no step is released any more, queued
        steps are skipped, running ones finish. True if this call cancelled it, False if it had
        already ended."""
        if self._final is not None:
            return False
        return self._broker.cancel(self.task_id)

    def __repr__(self) -> str:
        state = self._final[0].name if self._final is not None else "PENDING?"
        return f"<RemoteResult {self.task_id} {state}>"


class _Watcher:
    """The results that have callbacks (``add_callback``), for one broker: one thread and one
    connection for all of them, however many. Each round reads every watched result key in
    one pipelined round trip (LINDEX); the pause between rounds grows from 10 ms to 1 s while
    nothing finishes and starts again at 10 ms when something does or a callback is added. A
    result that never comes costs an entry here, not a thread. Callbacks run in this thread
    (an exception in one is logged, the others still run); a lost connection is retried."""

    def __init__(self, broker: RedisBroker) -> None:
        self._broker = broker
        self._cv = threading.Condition()
        self._watched: dict[str, tuple[RemoteResult, list[Callable[[RemoteResult], Any]]]] = {}
        self._poke = False
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="catzilla-result-callbacks", daemon=True)
        self._thread.start()

    def add(self, result: RemoteResult, fn: Callable[[RemoteResult], Any]) -> None:
        with self._cv:
            entry = self._watched.get(result.task_id)
            if entry is None:
                self._watched[result.task_id] = (result, [fn])
            else:
                entry[1].append(fn)
            self._poke = True
            self._cv.notify()

    def close(self) -> None:
        """Stop the thread; callbacks of results not finished by now never run (logged)."""
        with self._cv:
            self._closed = True
            left = len(self._watched)
            self._cv.notify()
        if left:
            import logging

            logging.getLogger("catzilla_tasks.results").warning(
                "broker closed with %d results still watched: their callbacks will not run", left
            )

    def _loop(self) -> None:
        import logging

        log = logging.getLogger("catzilla_tasks.results")
        pause = 0.01
        client = self._broker.redis
        while True:
            with self._cv:
                while not self._watched and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                if not self._poke:
                    self._cv.wait(pause)
                self._poke = False
                ids = list(self._watched)
            try:
                ready = self._read(client, ids)
            except (_redis.ConnectionError, _redis.TimeoutError) as exc:
                log.warning("result callbacks: redis unavailable (%s); retrying", exc)
                pause = 0.5
                continue
            except Exception:  # (a defect, or a server refusing us): the thread must not die
                log.exception("result callbacks: reading the results failed; retrying")
                pause = 1.0
                continue
            if not ready:
                pause = min(pause * 2, 1.0)
                continue
            pause = 0.01
            for task_id in ready:
                with self._cv:
                    result, fns = self._watched.pop(task_id)
                for fn in fns:
                    try:
                        fn(result)
                    except BaseException:  # (SystemExit too: it would end this thread, and every callback with it)
                        log.exception("a callback of task %s raised", task_id)

    def _read(self, client: Any, ids: list[str]) -> list[str]:
        ready = []
        for i in range(0, len(ids), 1000):
            chunk = ids[i : i + 1000]
            pipe = client.pipeline(transaction=False)
            for task_id in chunk:
                pipe.lindex(self._broker.result_key(task_id), 0)
            for task_id, raw in zip(chunk, pipe.execute(raise_on_error=False), strict=True):
                if raw is not None:
                    with self._cv:
                        entry = self._watched.get(task_id)
                    if entry is not None:
                        self._settle(entry[0], raw)
                        ready.append(task_id)
        return ready

    @staticmethod
    def _settle(result: RemoteResult, raw: Any) -> None:
        """Take the stored record; one that cannot be read (a key of another type, a record
        this side cannot decode) ends the result as a failure saying so, as ``wait()`` would
        raise: its callbacks and awaiters learn it, and the other watched results go on."""
        try:
            if isinstance(raw, Exception):
                raise raw
            result._take(raw)
        except Exception as exc:  # noqa: BLE001 - whatever it is, this one result says it
            result._final = (
                TaskStatus.FAILED,
                [wire_name(DecodeError), f"the result of task {result.task_id} cannot be read: {exc}", ""],
            )
