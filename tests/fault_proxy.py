"""A TCP proxy between Redis clients and a redis-server, which a test commands to break the
connections: reset them (RST), blackhole them (bytes swallowed, the sockets stay open), delay
them, refuse new ones, or do one of these when a chosen command goes by (MULTI/EXEC of a
commit, XCLAIM of a lease renewal, the fetch script, the idempotency claim...),
before it reaches Redis or after it did (the reply is lost). 127.0.0.1 only.

    proxy = FaultProxy(redis_port)
    broker = RedisBroker(proxy.url, socket_timeout=2)
    t = proxy.on_command(b"EXEC", "reset_after")   # the next commit is applied, its reply lost
    t.fired.wait(10)
    proxy.blackhole(1.5)                            # 1.5 s of silence, then traffic again
    proxy.reset_all()

Every fault is noted in ``proxy.events`` as (monotonic time, what) so a test can tell which tasks
were in flight when Redis was lost.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any

__all__ = ["FaultProxy", "Trigger"]

_ACTIONS = ("reset_before", "reset_after", "blackhole")


class Trigger:
    """Fires ``action`` on the first ``times`` client chunks that contain ``pattern``."""

    def __init__(self, pattern: bytes, action: str, times: int) -> None:
        if action not in _ACTIONS:
            raise ValueError(f"action: one of {_ACTIONS}, got {action!r}")
        self.pattern = pattern
        self.action = action
        self.left = times
        self.fired = threading.Event()
        self.at = 0.0  # wall-clock time it fired (time.time(), as the tasks' own logs)


class _Link:
    """One client connection and its connection to the server: a pump thread per direction."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.closed = False
        self.lose_reply = False

    def start(self) -> None:
        for src, dst, up in ((self.client, self.server, True), (self.server, self.client, False)):
            threading.Thread(target=self._pump, args=(src, dst, up), daemon=True, name="fault-proxy-pump").start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        p = self.proxy
        try:
            while not self.closed:
                data = src.recv(65536)
                if not data:
                    break
                if up:
                    action = p._match(data)
                    if action == "reset_before":
                        break
                    if action == "blackhole":
                        p._blackhole_now()
                    elif action == "reset_after":
                        self.lose_reply = True
                elif self.lose_reply:
                    break  # the command was applied; its reply never reaches the client
                if p._swallow():
                    continue
                if p.delay:
                    time.sleep(p.delay)
                dst.sendall(data)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for s in (self.client, self.server):
            try:  # RST, not FIN: what a crashed peer or a dropped route looks like
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                # wakes the pump blocked in recv() on it (a close() alone would not, and the
                # socket would live on, silent, until that recv returned)
                s.shutdown(socket.SHUT_RD)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass
        self.proxy._forget(self)


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(256)
        self.port = self._listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._triggers: list[Trigger] = []
        self._blackhole_until = 0.0
        self._refusing = False
        self.delay = 0.0
        self.events: list[tuple[float, str]] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="fault-proxy-accept").start()

    # -- commands ------------------------------------------------------------------------
    def reset_all(self) -> None:
        """Reset every open connection now (clients reconnect through the proxy)."""
        self._note("reset_all")
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close()

    def blackhole(self, seconds: float) -> None:
        """For ``seconds``, swallow every byte both ways (connections stay open: clients see
        silence, not an error, until their own timeouts)."""
        self._note(f"blackhole {seconds:.2f}s")
        with self._lock:
            self._blackhole_until = max(self._blackhole_until, time.monotonic() + seconds)

    def refuse(self, on: bool = True) -> None:
        """Refuse (reset) new connections while on; with ``on``, also reset the open ones."""
        self._note(f"refuse {on}")
        self._refusing = on
        if on:
            self.reset_all()

    def set_delay(self, seconds: float) -> None:
        """Delay every chunk by ``seconds`` (both ways)."""
        self._note(f"delay {seconds:.3f}s")
        self.delay = seconds

    def on_command(self, pattern: bytes, action: str, times: int = 1) -> Trigger:
        """When a client sends a chunk containing ``pattern`` (a command name such as b"EXEC",
        or a script's sha): ``reset_before`` (the command never reaches Redis),
        ``reset_after`` (it does, its reply is lost) or ``blackhole`` (one second of silence)."""
        t = Trigger(pattern, action, times)
        with self._lock:
            self._triggers.append(t)
        return t

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.close()
        except OSError:
            pass
        self.reset_all()

    # -- internals -----------------------------------------------------------------------
    def _note(self, what: str) -> None:
        self.events.append((time.monotonic(), what))

    def _match(self, data: bytes) -> str | None:
        with self._lock:
            for t in self._triggers:
                if t.left > 0 and t.pattern in data:
                    t.left -= 1
                    if t.left == 0:
                        self._triggers.remove(t)
                    self.events.append((time.monotonic(), f"{t.action} on {t.pattern[:16]!r}"))
                    t.at = time.time()
                    t.fired.set()
                    return t.action
        return None

    def _blackhole_now(self) -> None:
        with self._lock:
            self._blackhole_until = max(self._blackhole_until, time.monotonic() + 1.0)

    def _swallow(self) -> bool:
        return time.monotonic() < self._blackhole_until

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._refusing:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:  # the server is down: the client sees a reset
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(self, client, server)
            with self._lock:
                self._links.add(link)
            link.start()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
