"""Module-level task functions for tests/test_isolation_edges.py (process-isolated tasks are
pickled by reference: children import this module; tests/ is on their sys.path)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time


async def async_add(a, b):
    await asyncio.sleep(0)
    return a + b, asyncio.get_running_loop() is not None


async def async_fail(message):
    await asyncio.sleep(0)
    raise ValueError(message)


def spawn_sleeper_then_block(pid_file, block_s=120):
    """Start a grandchild (a sleeping subprocess), write 'child_pid grandchild_pid', block."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    tmp = pid_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()} {p.pid} {os.getpgid(0)}")
    os.replace(tmp, pid_file)
    time.sleep(block_s)
    return "finished"


def write_pid_then_block(pid_file, block_s=120):
    tmp = pid_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, pid_file)
    time.sleep(block_s)
    return "finished"


def write_pid_then_sleep_and_mark(pid_file, mark_file, block_s):
    """Write the pid, sleep block_s, then create mark_file: the task ran to its end."""
    write_pid_then_block(pid_file, block_s)
    with open(mark_file, "a") as f:
        f.write(f"{os.getpid()}\n")
    return "done"


def start_threads(n):
    """n threads, each waiting on an event (their stacks count toward address space)."""
    stop = threading.Event()
    threads = [threading.Thread(target=stop.wait) for _ in range(n)]
    try:
        for t in threads:
            t.start()
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join()
    return n


def map_anonymous(mib):
    import mmap

    m = mmap.mmap(-1, mib * 1024 * 1024)
    m.close()
    return mib


def wrap_memory_error(mib):
    try:
        return bytearray(mib * 1024 * 1024)
    except MemoryError as exc:
        raise ValueError("could not build the buffer") from exc


def raise_runtime_error(text):
    raise RuntimeError(text)
