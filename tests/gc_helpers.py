"""Cycle-collector pressure for race tests (see gc_pressure_on)."""

import contextlib
import gc
import threading
import time


class _LetsOthersRun:
    """Garbage whose finalizer releases the GIL (as any finalizer running Python code may),
    and leaves the next such garbage behind while `on` is set."""

    def __init__(self, on, pause):
        self.on = on
        self.pause = pause
        self.me = self  # a cycle: only the collector frees it

    def __del__(self):
        time.sleep(self.pause)  # long enough for a worker waiting for the GIL to take it
        if self.on.is_set():
            _LetsOthersRun(self.on, self.pause)


@contextlib.contextmanager
def gc_pressure_on(pause: float = 0.0001):
    """Make every container allocation run the (youngest generation of the) cycle collector,
    with a garbage cycle whose finalizer releases the GIL for `pause` s always at hand: a C
    path that allocates between a check and an update then lets other threads run inside that
    window, as a busy application sometimes does by chance."""
    on = threading.Event()
    on.set()
    old = gc.get_threshold()
    _LetsOthersRun(on, pause)
    # older generations rarely: a full collection per allocation would only be slow
    gc.set_threshold(1, 10_000, 10_000)
    try:
        yield
    finally:
        on.clear()
        gc.set_threshold(*old)
        gc.collect()
