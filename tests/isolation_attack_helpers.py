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
