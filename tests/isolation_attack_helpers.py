"""Module-level task functions for tests/test_isolation_attack.py (children import them)."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def spawn_sleeper_then_exit(pid_file):
    """Start a grandchild (a sleeping subprocess), write 'child_pid grandchild_pid', then die
    at once (os._exit: the task's child is lost, its subprocess is not)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    tmp = pid_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()} {p.pid}")
    os.replace(tmp, pid_file)
    os._exit(3)


def append_line(path, i):
    """Append i to the file at path: the task ran."""
    with open(path, "a") as f:
        f.write(f"{i}\n")
    return i


async def async_sleep(s):
    import asyncio

    await asyncio.sleep(s)
    return s


async def async_unpicklable():
    import threading

    return threading.Lock()


def allocate(mib):
    return len(bytearray(int(mib * 1024 * 1024)))


def raise_value_error():
    raise ValueError("isolated boom")


async def async_sleep_forever():
    import asyncio

    await asyncio.sleep(300)


def sleep_then(s, value):
    import time as _time

    _time.sleep(s)
    return value


def import_module(name):
    """Import a module the child has not loaded yet (mapping its shared objects)."""
    import importlib

    importlib.import_module(name)
    return name


def dlopen(path):
    """Load a shared library with ctypes (imported by an earlier task of the same child)."""
    import ctypes

    ctypes.CDLL(path)
    return path


def fail_once_file_exists(path):
    """Raise once another task has created path (it is running)."""
    while not os.path.exists(path):  # another process writes it: nothing to wait on but the file
        time.sleep(0.01)
    raise ValueError("the other step failed")


def write_pid_then_sleep_and_mark(pid_file, mark_file, block_s):
    tmp = pid_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, pid_file)
    time.sleep(block_s)
    with open(mark_file, "a") as f:
        f.write(f"{os.getpid()}\n")
    return "done"


class InterruptWhenPickled:
    """An argument whose pickling raises KeyboardInterrupt (Ctrl-C while map queues items)."""

    def __reduce__(self):
        raise KeyboardInterrupt
