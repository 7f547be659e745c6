"""Brokers for distributed mode. ``RedisBroker`` needs the ``[redis]`` extra."""

from __future__ import annotations

from typing import Any

__all__ = ["RedisBroker", "RemoteResult", "RemoteTaskError", "Worker"]


def __getattr__(name: str) -> Any:  # imported on first use: redis is an optional extra
    if name in ("RedisBroker", "RemoteResult", "RemoteTaskError"):
        from . import redis

        return getattr(redis, name)
    if name == "Worker":
        from .worker import Worker

        return Worker
    raise AttributeError(name)
