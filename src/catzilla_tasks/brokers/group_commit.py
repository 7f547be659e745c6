"""Group commit for a producer: concurrent publishes coalesce into one round trip.

A caller that finds no flush in progress becomes the *leader*: it sends what is queued (its
own message first, alone if nobody else is publishing: no timer, no added latency for a lone
caller) in one call of ``send``. Callers that arrive while a flush is in flight queue their
message and wait; when the flush ends, the leader wakes the callers of its flush with its
outcome and hands the lead to the first caller still queued, whose thread sends everything
queued by then. Each thread sends at most one flush, so no caller is kept flushing for others.

* :class:`GroupCommit` coalesces threads (one lock, one wait lock per waiting caller).
* :class:`AsyncGroupCommit` coalesces the coroutines of one event loop (a flusher task per
  burst; a caller awaits a future of its own, so cancelling it never cancels the flush of
  others). :class:`PerLoop` keeps one per running loop.

A caller returns only once ``send`` returned for its flush (the broker holds its message: at
least once), or raises the flush's error (every caller of a failed flush gets it; the broker's
``send`` makes a flush atomic, so none of its messages is stored). Nothing here knows Redis:
``send`` is the broker's. State is per process: a forked child starts with none of the
parent's (its threads are not there to finish a flush).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["AsyncGroupCommit", "GroupCommit", "PerLoop"]

# the most messages one flush sends (the rest go with the next flush): bounds one round trip
MAX_FLUSH = 4096


def _copy_error(exc: BaseException) -> BaseException:
    """The flush's error for one more caller: a copy (one instance raised in several threads
    would share its traceback), or the error itself when it cannot be copied. An interruption of
    the leader (KeyboardInterrupt, SystemExit) is the leader's own: its followers learn that the
    flush was interrupted, which may or may not have reached the broker."""
    if not isinstance(exc, Exception):
        return ConnectionError(
            f"the flush carrying this publish was interrupted in another thread ({type(exc).__name__}); "
            "it may or may not have been stored"
        )
    try:
        dup = copy.copy(exc)
    except Exception:  # noqa: BLE001 - an exception class that cannot be rebuilt: share it
        return exc
    return dup if type(dup) is type(exc) else exc


class _Waiter:
    """A caller queued behind a flush: its message, and a lock it blocks on until woken."""

    __slots__ = ("error", "first", "followers", "item", "lead", "sem", "token")

    def __init__(self, item: Any) -> None:
        self.item = item
        self.first = False  # taken first of a flush (set with the lock held): it will be woken to lead
        self.lead = False  # woken to read the reply of the flush carrying it (it is its first)
        self.token: Any = None  # that flush, as ``begin`` returned it
        self.followers: list[_Waiter] = []  # the other callers of that flush
        self.error: BaseException | None = None
        self.sem = threading.Lock()
        self.sem.acquire()


class GroupCommit:
    """Group commit across the threads of one process (see the module docstring), for a flush
    sent in two steps: ``begin(items)`` sends it (it returns a token; raising, it sent nothing
    that could be applied) and ``end(token)`` waits for its reply (raising, the flush failed as
    a whole). ``publish(item)`` returns once ``end`` returned for the flush carrying ``item``,
    or raises its error.

    The flushes form a chain with one in flight at a time: the thread that read a flush's reply
    sends the next one (everything queued meanwhile) *before* waking the callers of its own, so
    the round trip of the next flush overlaps their wake-ups; it hands the next flush's reply
    to that flush's first caller, whose thread reads it and goes on the same way. Each thread
    reads at most one reply, so no caller is kept waiting for others' flushes."""

    def __init__(
        self, begin: Callable[[list[Any]], Any], end: Callable[[Any], None], max_flush: int = MAX_FLUSH
    ) -> None:
        self._begin = begin
        self._end = end
        self._max = max_flush
        self._reset()
        _live.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[_Waiter] = []
        self._busy = False  # a flush is in flight (its reader sends the next one)

    def publish(self, item: Any) -> None:
        with self._lock:
            if not self._busy:
                self._busy = True
                w = None
            else:
                w = _Waiter(item)
                self._queue.append(w)
        if w is None:  # alone: sent and read on this thread now
            try:
                token = self._begin([item])
            except BaseException:
                self._next()  # callers may have queued meanwhile: the chain goes on without us
                raise
            self._read(token, ())
            return
        try:
            w.sem.acquire()
        except BaseException:  # interrupted while waiting (KeyboardInterrupt in the main thread)
            self._abandon(w)
            raise
        if w.lead:
            self._read(w.token, w.followers)
        elif w.error is not None:
            raise w.error

    def _read(self, token: Any, followers: Any) -> None:
        """Read the reply of a flush, send the next one, then wake this flush's callers."""
        error: BaseException | None = None
        interrupted: BaseException | None = None
        try:
            self._end(token)
        except BaseException as exc:
            error = exc
        finally:
            try:
                self._next()
            except BaseException as exc:  # this thread interrupted while sending it (handed on)
                interrupted = exc
            for f in followers:
                if error is not None:
                    f.error = _copy_error(error)
                f.sem.release()
        if error is not None:
            raise error
        if interrupted is not None:
            raise interrupted

    def _next(self) -> None:
        """Send what is queued as the next flush and hand its reply to its first caller, or
        end the chain when nothing is queued. A flush that cannot be sent fails its callers
        (none of its messages was applied), and the chain goes on with what queued after. An
        interruption of this thread (KeyboardInterrupt, SystemExit) while it sends fails that
        flush's callers too, and is raised once the chain is handed on."""
        interrupted: BaseException | None = None
        while True:
            with self._lock:
                if not self._queue:
                    self._busy = False
                    break
                batch = self._queue[: self._max]
                del self._queue[: self._max]
                batch[0].first = True
            try:
                token = self._begin([b.item for b in batch])
            except BaseException as exc:  # noqa: BLE001 - the callers of that flush get it
                for b in batch:
                    b.error = _copy_error(exc)
                    b.sem.release()
                if interrupted is None and not isinstance(exc, Exception):
                    interrupted = exc
                continue
            first = batch[0]
            first.token = token
            first.followers = batch[1:]
            first.lead = True  # (last: an interrupted first reads lead, then token and followers)
            first.sem.release()
            break
        if interrupted is not None:
            raise interrupted

    def _abandon(self, w: _Waiter) -> None:
        """A waiter that will not wait any more: out of the queue if no flush took it (then it
        is not published). A flush it was to read is read here, for its other callers: if it
        was taken first of a flush still being sent, the wake that hands it that flush is waited
        for (it comes once ``begin`` returned), or nobody would ever read it."""
        with self._lock:
            if w in self._queue:
                self._queue.remove(w)
                return
            first = w.first
        if first and not w.lead and w.error is None:
            while True:
                try:
                    w.sem.acquire()
                    break
                except BaseException:  # noqa: BLE001, S112 - interrupted again: the wake is one send away
                    continue
        if w.lead:  # woken to read a flush (the wake came with the interruption)
            # its callers get the flush's outcome; this caller raises its own interruption
            with contextlib.suppress(BaseException):
                self._read(w.token, w.followers)


_live: weakref.WeakSet[GroupCommit] = weakref.WeakSet()
_per_loop: weakref.WeakSet[PerLoop] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # the parent's flushes, their leaders and waiters are not in the child: start empty
    for gc in list(_live):
        gc._reset()
    for pl in list(_per_loop):
        pl._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)


class AsyncGroupCommit:
    """Group commit among the coroutines of one event loop, for one ``send(items)`` coroutine
    function. ``await publish(item)`` returns once ``send`` stored ``item`` or raises its error.

    The first caller of a burst starts a flusher task; it sends what is queued, then what was
    queued during that send, until nothing is. A caller cancelled before its message was taken
    by a flush withdraws it (it is not published); once taken, it is published whatever
    happens to the caller (at least once). If the flusher itself is cancelled (the loop shuts
    down), the callers still waiting get ConnectionError; the messages of the flush it was
    sending may or may not have been stored."""

    def __init__(
        self,
        send: Callable[[list[Any]], Awaitable[Any]],
        idle: Callable[[], Awaitable[Any]] | None = None,
        max_flush: int = MAX_FLUSH,
    ) -> None:
        self._send = send
        self._idle = idle  # awaited when a burst ends (the broker gives its connection back)
        self._max = max_flush
        # (message, its caller's future, what that future gives once the message is stored)
        self._queue: list[tuple[Any, asyncio.Future[Any], Any]] = []
        self._taken: list[tuple[Any, asyncio.Future[Any], Any]] = []  # the flush being sent
        self._flusher: asyncio.Task[None] | None = None

    def enqueue(self, loop: asyncio.AbstractEventLoop, item: Any, result: Any = None) -> asyncio.Future[Any]:
        """Queue ``item`` (``loop`` is the running loop, this object's); the future is done when
        its flush is, with ``result`` (awaiting it is ``publish``)."""
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.append((item, fut, result))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush_all())
        return fut

    async def publish(self, item: Any) -> None:
        await self.enqueue(asyncio.get_running_loop(), item)

    async def _flush_all(self) -> None:
        try:
            while self._queue:
                await self._flush_queued()
                if self._idle is not None:
                    await self._idle()  # (callers queued meanwhile: the loop goes on)
        except BaseException:
            # cancelled (the loop is shutting down) or interrupted: nobody may wait for ever
            left, self._queue = self._taken + self._queue, []
            for _, fut, _ in left:
                if not fut.done():
                    fut.set_exception(
                        ConnectionError("publish interrupted: the event loop's flusher was cancelled (loop shutdown)")
                    )
            raise
        finally:
            self._taken = []
            self._flusher = None

    async def _flush_queued(self) -> None:
        """Send what is queued, flush after flush, until nothing is."""
        while self._queue:
            batch = self._queue[: self._max]
            del self._queue[: self._max]
            live = self._taken = [b for b in batch if not b[1].done()]  # cancelled: withdrawn
            if not live:
                continue
            try:
                await self._send([b[0] for b in live])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every caller of this flush gets it
                for i, (_, fut, _) in enumerate(live):
                    if not fut.done():
                        fut.set_exception(exc if i == 0 else _copy_error(exc))
            else:
                for _, fut, result in live:
                    if not fut.done():
                        fut.set_result(result)
            self._taken = []


class PerLoop:
    """One :class:`AsyncGroupCommit` (and whatever the broker keeps with it: ``make(loop)``'s
    value) per event loop, dropped with its loop.

    ``close(value)`` (a coroutine function) releases what a value holds (its connections) when
    its loop shuts down: in ``loop.shutdown_asyncgens()``, which ``asyncio.run``, its Runner,
    uvicorn and pytest-asyncio call before closing a loop. The values of loops closed otherwise
    are dropped the next time a loop asks for one (a value holds its loop through its
    connections: nothing else would ever drop it)."""

    def __init__(
        self,
        make: Callable[[asyncio.AbstractEventLoop], Any],
        close: Callable[[Any], Awaitable[Any]] | None = None,
    ) -> None:
        self._make = make
        self._close = close
        self._reset()
        _per_loop.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
        # a loop -> the async generator whose closing at the loop's shutdown closes its value
        self._hooks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], Any] | None = None  # the last one asked for

    def get(self, loop: asyncio.AbstractEventLoop) -> Any:
        """The value of ``loop`` (the running loop; made on first use)."""
        last = self._last
        if last is not None and last[0]() is loop:
            return last[1]
        with self._lock:
            value = self._by_loop.get(loop)
            if value is None:
                for old in [lp for lp in list(self._by_loop.keys()) if lp.is_closed()]:
                    self._by_loop.pop(old, None)
                    self._hooks.pop(old, None)
                value = self._by_loop[loop] = self._make(loop)
                if self._close is not None:
                    self._hooks[loop] = _at_shutdown(self._close, value)
            self._last = (weakref.ref(loop), value)
            return value


def _at_shutdown(close: Callable[[Any], Awaitable[Any]], value: Any) -> Any:
    """An async generator of the running loop (its first step is taken here, on the loop's
    thread, which registers it with the loop) that awaits ``close(value)`` when the loop closes
    it: ``shutdown_asyncgens()``, or its finalizer while the loop runs. A loop closed without
    either drops it silently."""

    async def hook() -> Any:
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await close(value)

    agen = hook()
    with contextlib.suppress(StopIteration):
        agen.asend(None).send(None)  # (runs to its yield: no await before it)
    return agen
