"""Module-level task functions for tests/test_isolation.py.

Process-isolated tasks are pickled by reference, so they must live in a module the child
processes can import (this directory is on sys.path in the test process, and children get
the parent's sys.path).
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
import time


def add(a, b):
    return a + b


def echo(*args, **kwargs):
    return args, kwargs


def touch(path, seconds=0.2):
    time.sleep(seconds)  # the work takes a while: it is still queued when the parent exits
    with open(path, "w"):
        pass
    return path


def getpid():
    return os.getpid()


class CustomError(Exception):
    """A picklable exception with extra state."""

    def __init__(self, message, code):
        super().__init__(message, code)
        self.code = code


def raise_value_error(message):
    raise ValueError(message)


def raise_custom(message, code):
    raise CustomError(message, code)


class UnpicklableError(Exception):
    """Pickles, but cannot be rebuilt: __init__ needs two arguments, args holds one."""

    def __init__(self, message, extra):
        super().__init__(message)
        self.extra = extra


def raise_unpicklable(message):
    raise UnpicklableError(message, object())


class LockError(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()  # a lock attribute cannot be pickled at all


def raise_with_lock(message):
    raise LockError(message)


def return_lock():
    return threading.Lock()


def big_bytes(n, byte=7):
    return bytes([byte]) * n


def byte_sum_and_len(data):
    return len(data), sum(data[:: 4096])


def spin_forever():
    while True:
        pass


def spin(n):
    """Pure-Python CPU work: n loop iterations; returns a value that depends on all of them."""
    acc = 0
    for i in range(n):
        acc = (acc + i * i) % 1_000_003
    return acc


def timed_sleep(seconds, tag):
    """Sleep (the task's own work) and report when it ran, on the system-wide monotonic clock."""
    start = time.monotonic()
    time.sleep(seconds)
    return tag, os.getpid(), start, time.monotonic()


def allocate(total_mb, chunk_mb=10):
    """Hold up to total_mb of memory in chunk_mb pieces; return how many MB it got.

    bytes(n) is calloc'd: the address space is mapped (what RLIMIT_AS counts) without
    touching RAM, so a missing limit costs the test machine nothing."""
    chunks = []
    for _ in range(total_mb // chunk_mb):
        chunks.append(bytes(chunk_mb * 1024 * 1024))
    return len(chunks) * chunk_mb


def segfault():
    ctypes.string_at(0)  # reads address 0: SIGSEGV


def exit_now(code):
    os._exit(code)


def report_pid_and_block(socket_path):
    """Tell the test our pid over a Unix socket, then block until the test closes it (or kills
    us). Returns normally if the test goes away without killing the process."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(socket_path)
        s.sendall(f"{os.getpid()}\n".encode())
        s.recv(1)
    return "released"


def report_pid_and_spin(socket_path):
    """Tell the test our pid, then burn CPU forever (only a kill ends this)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(socket_path)
        s.sendall(f"{os.getpid()}\n".encode())
    spin_forever()


def address_space_limit():
    import resource

    return resource.getrlimit(resource.RLIMIT_AS)


def in_pool_child():
    from catzilla_tasks.isolation import in_pool_child as check

    return check()
