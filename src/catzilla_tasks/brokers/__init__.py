"""Brokers for distributed mode. ``RedisBroker`` needs the ``[redis]`` extra."""

from __future__ import annotations

from typing import Any

__all__ = [
    "Broker",
    "Consumer",
    "DistributedTasks",
    "MemoryBroker",
    "RedisBroker",
    "RemoteResult",
    "RemoteTaskError",
    "Worker",
    "WorkerIdInUse",
]

_HOMES = {"Broker": "base", "Consumer": "consumer", "DistributedTasks": "producer", "MemoryBroker": "memory"}


def __getattr__(name: str) -> Any:  # imported on first use: redis is an optional extra
    if name in ("RedisBroker", "RemoteResult", "RemoteTaskError"):
        from . import redis

        return getattr(redis, name)
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    if name == "Worker":
        from .worker import Worker

        return Worker
    if name == "WorkerIdInUse":
        from .registry import WorkerIdInUse

        return WorkerIdInUse
    raise AttributeError(name)
