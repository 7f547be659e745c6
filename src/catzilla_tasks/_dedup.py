"""Submit-time deduplication in-process: ``tasks.options(idempotency_key=K).add_task(...)``.

The engine keeps, per key, the handle of the first task submitted with it. A second
``add_task`` with the key while that task is queued, delayed or running, or within
``idempotency_ttl`` seconds of its submission once it has finished, returns that handle (same
``task_id``, same outcome) and queues nothing. Checked and recorded under one lock, so threads
submitting one key at once queue one task. Entries past their time are dropped as the table
grows. (On a broker the same rule holds across processes: brokers/dedup.py.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["KeyedOptions", "Registry", "check_key"]


def check_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"idempotency_key: expected a non-empty string, got {key!r}")
    return key


class Registry:
    """The keys of one engine: key -> (handle of the first task, monotonic time its TTL ends)."""

    __slots__ = ("ttl", "_lock", "_by_key", "_sweep_at")

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._by_key: dict[str, tuple[Any, float]] = {}
        self._sweep_at = 1024

    def submit(self, key: str, make: Callable[[], Any]) -> Any:
        now = time.monotonic()
        with self._lock:
            hit = self._by_key.get(key)
            if hit is not None and (now < hit[1] or not hit[0].is_ready()):
                return hit[0]
            handle = make()  # (raises: nothing recorded)
            self._by_key[key] = (handle, now + self.ttl)
            if len(self._by_key) >= self._sweep_at:
                self._sweep(now)
        return handle

    def _sweep(self, now: float) -> None:
        self._by_key = {k: v for k, v in self._by_key.items() if now < v[1] or not v[0].is_ready()}
        self._sweep_at = max(1024, 2 * len(self._by_key))


class KeyedOptions:
    """``tasks.options(..., idempotency_key=K)`` on an in-process engine."""

    __slots__ = ("_registry", "_options", "_key")

    def __init__(self, registry: Registry, options: Any, key: str) -> None:
        self._registry = registry
        self._options = options
        self._key = key

    def add_task(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return self._registry.submit(self._key, lambda: self._options.add_task(func, *args, **kwargs))
