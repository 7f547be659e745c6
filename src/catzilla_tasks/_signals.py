"""Graceful SIGTERM: an engine in the main program runs what is queued before the process stops.

A process asked to stop with SIGTERM (``kill``, ``docker stop``, systemd, Kubernetes) dies at
once by default: no ``finally``, no ``atexit``, and every task still queued is lost. The first
``BackgroundTasks`` created in the main thread installs :func:`_on_sigterm`, which

1. restores the handler that was there before (a second SIGTERM acts as it did without us:
   by default it kills the process at once),
2. stops every live engine from accepting tasks, then shuts each down with
   ``wait_for_completion=True`` (its ``exit_timeout``): queued tasks run, running ones finish,
3. calls the previous handler if it was a Python function, else raises ``SystemExit(143)``
   (128 + SIGTERM), so ``finally`` blocks and ``atexit`` hooks still run.

Nothing is installed when SIGTERM is ignored (``SIG_IGN``), when its handler was set outside
Python (``signal.getsignal`` returns None: a C library owns it), off the main thread (Python
allows handlers only there), or when opted out: ``BackgroundTasks(handle_sigterm=False)`` or
``CATZILLA_TASKS_SIGTERM=0`` in the environment. A server that handles SIGTERM itself (uvicorn,
Catzilla's C core) replaces the handler while it serves; it stops serving on SIGTERM and the
engine's ``atexit`` hook, or the framework integration's shutdown, then runs the queued tasks
(uvicorn also restores the handler it found and re-raises SIGTERM after its shutdown, so an
engine without the lifespan integration is drained here).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["ENV_VAR", "enabled", "install", "installed"]

ENV_VAR = "CATZILLA_TASKS_SIGTERM"
_OFF = frozenset({"0", "false", "no", "off"})

log = logging.getLogger("catzilla_tasks")

_lock = threading.Lock()
_previous: Any = None
_engines: Callable[[], Iterable[Any]] | None = None


def enabled(flag: bool) -> bool:
    """The constructor's ``handle_sigterm`` combined with the environment's opt-out."""
    return bool(flag) and os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF


def installed() -> bool:
    """Whether our handler is SIGTERM's handler right now."""
    return signal.getsignal(signal.SIGTERM) is _on_sigterm


def install(engines: Callable[[], Iterable[Any]]) -> bool:
    """Install the handler (main thread only); ``engines()`` lists the engines to drain.

    Returns whether the handler is in place. Installing again (a second engine) is a no-op;
    if someone replaced our handler meanwhile, theirs stays.
    """
    global _previous, _engines
    if threading.current_thread() is not threading.main_thread():
        return False
    with _lock:
        _engines = engines
        current = signal.getsignal(signal.SIGTERM)
        if current is _on_sigterm:
            return True
        if current is None or current == signal.SIG_IGN:
            return False  # a C-level handler we cannot chain, or the program ignores SIGTERM
        if _previous is not None:
            return False  # ours was installed once and replaced since: the new owner decides
        _previous = current
        signal.signal(signal.SIGTERM, _on_sigterm)
        return True


def _on_sigterm(signum: int, frame: Any) -> None:
    previous = _previous if _previous is not None else signal.SIG_DFL
    signal.signal(signal.SIGTERM, previous)  # a second SIGTERM does what it did without us
    live = [e for e in (_engines() if _engines is not None else ()) if not e.is_shutdown]
    unfinished = 0
    for eng in live:
        try:
            eng._close()  # every engine stops accepting before any drains
            st = eng._stats()
            unfinished += st["queued_total"] + st["running"] + st["scheduled"]
        except Exception:
            log.exception("catzilla_tasks: SIGTERM: could not close %r", eng)
    log.warning(
        "catzilla_tasks: SIGTERM: finishing %d unfinished task(s) of %d engine(s) before exit", unfinished, len(live)
    )
    for eng in live:
        try:
            eng.shutdown(wait_for_completion=True, timeout=eng.exit_timeout)
        except Exception:
            log.exception("catzilla_tasks: SIGTERM: shutdown of %r did not complete", eng)
    if callable(previous):
        previous(signum, frame)
        return
    raise SystemExit(128 + signum)
