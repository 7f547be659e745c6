"""The producer of distributed mode: what ``BackgroundTasks(broker=...)`` builds.

:class:`DistributedTasks` is a BackgroundTasks whose submission methods publish to a
:class:`~.base.Broker` instead of the local queues: ``add_task``, ``options(...).add_task``,
``batch()``, ``result(task_id)`` and (through ``broker.run_workflow``) a workflow's
``execute()``. Everything else is the engine's own: ``@tasks.task`` registers functions by name
(a worker runs them on this same local engine), ``@tasks.periodic`` fires on its schedule and
publishes through ``add_task``. The plain engine keeps its C ``add_task`` (no Python frame);
only this subclass pays for a Python method, and the broker round trip dwarfs it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from ..engine import BackgroundTasks
from .base import Broker, Result


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
        broker = as_broker(broker)  # before the engine starts its threads: bad input leaks nothing
        super().__init__(*args, **kwargs)
        self.broker = broker

    def take_over_periodic(self, engine: BackgroundTasks) -> None:
        """Declare ``engine``'s periodic tasks here, with the same settings, and cancel them
        there (``catzilla-tasks worker app:tasks --broker URL`` on an app made without a
        broker): on Redis they become the broker's schedules, fired once per tick across the
        cluster. ``engine`` itself is left as it is (an ordinary engine)."""
        for p in engine.periodic_tasks:
            if p.cancelled or p.engine is self:
                continue
            p.cancel()
            self.periodic(every=p.every, cron=p.cron, tz=p.tz, overlap=p.overlap, args=p.args, kwargs=p.kwargs)(p.func)

    # -- submission: published to the broker ------------------------------------------------
    def add_task(self, func: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> Any:
        """Publish ``func(*args, **kwargs)`` (a registered task function, or its name); returns
        its result handle (``RemoteResult`` on Redis) once the broker holds it."""
        return self.broker.submit(func, args, kwargs, None)

    def options(self, *, idempotency_key: str | None = None, **fields: Any) -> RemoteOptions:
        """As BackgroundTasks.options (validated the same way, at the call site), plus
        ``idempotency_key``: of the copies of a task with one key, one succeeds (see the broker
        contract)."""
        return RemoteOptions(self.broker, super().options(**fields), idempotency_key)

    def _submit(self, func: Any, args: tuple, kwargs: dict[str, Any] | None, cfg: Any, block: Any) -> Any:
        # the engine's internal submission (periodic tasks, integrations) publishes too
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

    __slots__ = ("_broker", "_key", "_options")

    def __init__(self, broker: Broker, options: Any, key: str | None) -> None:
        self._broker = broker
        self._options = options
        self._key = key

    def add_task(self, func: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> Any:
        return self._broker.submit(func, args, kwargs, self._options.config_for_call(func), self._key)
