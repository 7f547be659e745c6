"""An app for `catzilla-tasks worker limit_app:tasks --queues ...` in test_routing.py."""

from __future__ import annotations

import os
import signal

import limit_tasks as lt

from catzilla_tasks import BackgroundTasks
from catzilla_tasks.brokers import RedisBroker

tasks: BackgroundTasks | None = None


def reset(url: str, prefix: str) -> None:
    global tasks
    tasks = BackgroundTasks(workers=2, broker=RedisBroker(url, prefix=prefix), handle_sigterm=False)
    lt.register(tasks)


def stop() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # the worker's handler stops it
