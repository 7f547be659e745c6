"""``Consumer``: a :class:`~.worker.Worker` on its own thread, for tests and embedding.

``Consumer(tasks, broker).start()`` runs the tasks of ``broker`` (any
:class:`~.base.FetchingBroker`: MemoryBroker, RedisBroker) on the engine ``tasks`` in a daemon
thread, exactly as ``Worker.run()`` does (the same retries through the broker, dead letters,
idempotency keys); ``stop()`` ends it once the held tasks are committed.
"""

from __future__ import annotations

import threading
from typing import Any

from .base import FetchingBroker
from .worker import Worker

__all__ = ["Consumer"]


class Consumer(Worker):
    """A Worker of ``broker`` on ``tasks`` with at most ``concurrency`` tasks held, run by
    ``start()`` on a thread of its own."""

    def __init__(self, tasks: Any, broker: FetchingBroker, *, concurrency: int = 8, **kwargs: Any) -> None:
        if not isinstance(broker, FetchingBroker):
            raise TypeError(
                f"Consumer: expected a FetchingBroker (MemoryBroker, RedisBroker...), got {type(broker).__name__}"
            )
        super().__init__(tasks, broker, concurrency=concurrency, **kwargs)
        self._thread: threading.Thread | None = None

    def start(self) -> Consumer:
        """Run the worker on a daemon thread; returns once it fetches."""
        self._thread = threading.Thread(target=self.run, name="catzilla-consumer", daemon=True)
        self._thread.start()
        while not self.ready.wait(0.05):
            if not self._thread.is_alive():  # set-up failed: run() raised on its thread
                raise RuntimeError("the consumer stopped before it could fetch (see the log)")
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop fetching and wait for the held tasks to be committed (at most ``timeout``
        seconds: what is left is redelivered, at least once)."""
        super().stop(timeout)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(None if timeout is None else timeout + 2)
