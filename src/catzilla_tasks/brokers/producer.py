"""The producer of distributed mode: what ``BackgroundTasks(broker=...)`` builds.

:class:`DistributedTasks` is a BackgroundTasks whose submission methods publish to a
:class:`~.base.Broker` instead of the local queues: ``add_task``, ``add_task_async``,
``options(...).add_task`` / ``.add_task_async``, ``batch()``, ``result(task_id)`` and
(through ``broker.run_workflow``) a workflow's ``execute()``. Everything else is the engine's
own: ``@tasks.task`` registers functions by name (a worker runs them on this same local
engine), ``@tasks.periodic`` fires on its schedule and publishes through ``add_task``. The
plain engine keeps its C ``add_task`` (no Python frame); only this subclass pays for a Python
method, and the broker round trip dwarfs it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from .. import tracing as _tracing
from ..config import TaskConfig
from ..engine import BackgroundTasks
from .base import Broker, Result, destination_name
from .protocol import CONFIG_ATTR, DEFAULT_CONFIG, OUTGOING_HEADERS


def as_broker(broker: Any) -> Broker:
    """A Broker from what ``BackgroundTasks(broker=...)`` takes: a Broker, or a URL (``redis://``,
    ``rediss://``, ``unix://``: a RedisBroker with default settings)."""
    if isinstance(broker, Broker):
        return broker
    if isinstance(broker, str):
        from .redis import RedisBroker

        return RedisBroker(broker)
    raise TypeError(f"broker: expected a redis:// URL or a Broker (RedisBroker...), got {type(broker).__name__}")


class DistributedTasks(BackgroundTasks):
    """A BackgroundTasks that publishes its tasks to ``broker`` (see the module docstring).
    Built by ``BackgroundTasks(..., broker=...)``; the other arguments size the local engine a
    worker runs the tasks on."""

    broker: Broker

    def __init__(self, *args: Any, broker: Any, **kwargs: Any) -> None:
        given = broker
        broker = as_broker(broker)  # before the engine starts its threads: bad input leaks nothing
        ttl = kwargs.get("idempotency_ttl")
        if ttl is not None and not isinstance(given, str):
            # the broker deduplicates keyed tasks with its own TTL: an engine's that differs from
            # it would be an option doing nothing
            have = getattr(broker, "idempotency_ttl", None)
            if have is None:
                raise ValueError(f"idempotency_ttl: {type(broker).__name__} does not deduplicate keyed tasks at submit")
            if isinstance(ttl, (int, float)) and not isinstance(ttl, bool) and float(ttl) != have:
                raise ValueError(
                    f"idempotency_ttl={ttl!r} differs from the broker's ({have!r}): on a broker engine it is the "
                    f"broker's option ({type(broker).__name__}(..., idempotency_ttl=...))"
                )
        super().__init__(*args, **kwargs)
        self.broker = broker
        if ttl is not None and isinstance(given, str):  # (a broker made here from the URL: validated above)
            broker.idempotency_ttl = self.idempotency_ttl

    def take_over_periodic(self, engine: BackgroundTasks) -> None:
        """Declare ``engine``'s periodic tasks here, with the same settings, and cancel them
        there (``catzilla-tasks worker app:tasks --broker URL`` on an app made without a
        broker): on Redis they become the broker's schedules, fired once per tick across the
        cluster. ``engine`` itself is left as it is (an ordinary engine)."""
        for p in engine.periodic_tasks:
            if p.cancelled or p.engine is self:
                continue
            p.cancel()  # (under its lock: p.runs is final now)
            self.periodic(
                every=p.every,
                cron=p.cron,
                tz=p.tz,
                overlap=p.overlap,
                # its first run, unless the in-process schedule fired it already
                first_run_now=p.first_run_now and p.runs == 0,
                args=p.args,
                kwargs=p.kwargs,
            )(p.func)

    # -- submission: published to the broker ------------------------------------------------
    def add_task(self, func: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> Any:
        """Publish ``func(*args, **kwargs)`` (a registered task function, or its name); returns
        its result handle (``RemoteResult`` on Redis) once the broker holds it."""
        if self.tracing and _tracing.provider_set():  # (tracing hook: see _traced)
            return _traced(self.broker, func, args, kwargs, None, None)
        return self.broker.submit(func, args, kwargs, None)

    async def add_task_async(self, func: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> Any:
        """``add_task`` for ``async def`` code: publishes without blocking the event loop
        (``redis.asyncio``) and returns the same handle once the broker holds the task.
        Concurrent calls of one loop share round trips (group commit), as threads' ``add_task``
        calls do. Bad input raises here, before anything is sent."""
        if self.tracing and _tracing.provider_set():  # (tracing hook: see _traced_async)
            return await _traced_async(self.broker, func, args, kwargs, None, None)
        try:
            submit = self.broker.submit_async  # type: ignore[attr-defined]
        except AttributeError:
            return await _submit_async(self.broker, func, args, kwargs, None, None)
        return await submit(func, args, kwargs, None)

    def options(self, *, idempotency_key: str | None = None, **fields: Any) -> RemoteOptions:
        """As BackgroundTasks.options (validated the same way, at the call site), plus
        ``idempotency_key``: of the copies of a task with one key, one succeeds (see the broker
        contract)."""
        return RemoteOptions(self, super().options(**fields), idempotency_key)

    def _submit(self, func: Any, args: tuple, kwargs: dict[str, Any] | None, cfg: Any, block: Any) -> Any:
        # the engine's internal submission (periodic tasks, integrations) publishes too
        if self.tracing and _tracing.provider_set():
            return _traced(self.broker, func, args, kwargs, cfg, None)
        return self.broker.submit(func, args, kwargs, cfg)

    def _periodic_type(self) -> type:
        # on Redis a schedule fires once per tick however many processes declare it
        from .redis import RedisBroker

        if isinstance(self.broker, RedisBroker):
            from .schedules import ClusterPeriodicTask

            return ClusterPeriodicTask
        return super()._periodic_type()

    def _gates(self, *_: Any, **__: Any) -> Any:
        raise NotImplementedError(
            "the engine's local workflow gates are not used in distributed mode: TaskChain.execute() publishes "
            "the workflow to the broker (Broker.run_workflow)"
        )

    def batch(self) -> AbstractContextManager[None]:
        """Publish every add_task of the block (in this thread) at its end, in as few round
        trips as the broker can (see Broker.batch)."""
        return self.broker.batch()

    def result(self, task_id: str) -> Result:
        """The result handle of a task id published by any process."""
        return self.broker.result(task_id)


class RemoteOptions:
    """``tasks.options(...)`` on a DistributedTasks: the engine's validated options plus
    ``idempotency_key``."""

    __slots__ = ("_engine", "_broker", "_key", "_options")

    def __init__(self, engine: DistributedTasks, options: Any, key: str | None) -> None:
        self._engine = engine
        self._broker = engine.broker
        self._options = options
        self._key = key

    def add_task(self, func: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> Any:
        cfg = self._options.config_for_call(func)
        if self._engine.tracing and _tracing.provider_set():
            return _traced(self._broker, func, args, kwargs, cfg, self._key)
        return self._broker.submit(func, args, kwargs, cfg, self._key)

    async def add_task_async(self, func: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> Any:
        """``add_task`` with these options, for ``async def`` code (see DistributedTasks.add_task_async)."""
        cfg = self._options.config_for_call(func)
        if self._engine.tracing and _tracing.provider_set():
            return await _traced_async(self._broker, func, args, kwargs, cfg, self._key)
        return await _submit_async(self._broker, func, args, kwargs, cfg, self._key)


async def _submit_async(
    broker: Broker, func: Any, args: tuple, kwargs: dict[str, Any] | None, cfg: Any, key: str | None
) -> Any:
    """Publish from a coroutine: the broker's own ``submit_async`` (RedisBroker's), an
    in-process broker's ``submit`` (no I/O to wait for), or else ``submit`` in a thread: a
    broker without an async client never blocks the event loop."""
    submit_async = getattr(broker, "submit_async", None)
    if submit_async is not None:
        return await submit_async(func, args, kwargs, cfg, key)
    from .memory import MemoryBroker

    if isinstance(broker, MemoryBroker):
        return broker.submit(func, args, kwargs, cfg, key)
    import asyncio

    # (the thread runs in a copy of this context: the trace headers set by _traced_async travel)
    return await asyncio.to_thread(broker.submit, func, args, kwargs, cfg, key)


# -- tracing hook (the [otel] extra; see catzilla_tasks.tracing) -------------------------------
def _destination(broker: Broker, func: Any, cfg: Any) -> Callable[[], str]:
    """The stream a task is published to (asked only for a span): its priority's, in its named
    queue when it is routed to one."""

    def destination() -> str:
        own = cfg if cfg is not None else getattr(func, CONFIG_ATTR, None) if not isinstance(func, str) else None
        prio = int(own.priority) if isinstance(own, TaskConfig) else int(DEFAULT_CONFIG.priority)
        return destination_name(broker, own.queue if isinstance(own, TaskConfig) else None, prio)

    return destination


def _traced(broker: Broker, func: Any, args: tuple, kwargs: dict[str, Any] | None, cfg: Any, key: str | None) -> Any:
    """``broker.submit`` in a PRODUCER span whose trace context the message carries."""
    destination = _destination(broker, func, cfg)
    if key is None:
        return _tracing.publish(lambda: broker.submit(func, args, kwargs, cfg), func, destination, OUTGOING_HEADERS)
    return _tracing.publish(lambda: broker.submit(func, args, kwargs, cfg, key), func, destination, OUTGOING_HEADERS)


async def _traced_async(
    broker: Broker, func: Any, args: tuple, kwargs: dict[str, Any] | None, cfg: Any, key: str | None
) -> Any:
    """:func:`_submit_async` in a PRODUCER span whose trace context the message carries."""
    destination = _destination(broker, func, cfg)
    return await _tracing.publish_async(
        lambda: _submit_async(broker, func, args, kwargs, cfg, key), func, destination, OUTGOING_HEADERS
    )
