"""TaskResult (from the C engine) and TaskFuture: awaiting, then/catch chaining."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from . import _engine
from .config import TaskStatus

if TYPE_CHECKING:
    import asyncio

__all__ = ["TaskResult", "TaskFuture"]

TaskResult = _engine.TaskResult


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _wake(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]) -> None:
    """In the thread that ends the task: hand over to the awaiting loop's thread. If that loop
    has closed meanwhile (the awaiting coroutine was cancelled, its server stopped), nobody is
    left to wake."""
    try:
        loop.call_soon_threadsafe(_resolve, fut)
    except RuntimeError:
        if not loop.is_closed():
            raise


async def _await_result(handle: TaskResult[Any]) -> Any:
    if not handle.is_ready():
        import asyncio  # loaded already: something is awaiting (imported here so plain use never loads it)

        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        # Cancelling the awaiting coroutine does not cancel the task (use handle.cancel()).
        handle._on_done(lambda _h: _wake(loop, fut))
        await fut
    return handle.wait(0)


def await_impl(handle: TaskResult[Any]) -> Generator[Any, None, Any]:
    """The ``__await__`` of a TaskResult (the engine installs it in the C type)."""
    return _await_result(handle).__await__()


def forward_outcome(source: TaskResult[Any], target: TaskResult[Any]) -> None:
    """Settle target with source's outcome (source is final)."""
    try:
        status = source.status
        if status is TaskStatus.CANCELLED:
            target._settle(cancelled=True)
            return
        try:
            value = source.wait(0)
        except BaseException as exc:  # the task's own exception, handed on
            target._settle(exc=exc)
        else:
            _settle_with(target, value)
    finally:
        # The exception's traceback keeps this frame: it must not keep the two tasks too
        # (a cycle through two handles of each, which the collector cannot see through).
        source = target = None  # type: ignore[assignment]


def _settle_with(target: TaskResult[Any], value: Any) -> None:
    # A callback that returns another task: the chain follows it (like a promise).
    if isinstance(value, TaskFuture):
        value = value._result
    if isinstance(value, TaskResult):
        value._on_done(lambda h: forward_outcome(h, target))
    else:
        target._settle(value=value)


class TaskFuture:
    """A future over a live task: awaitable, with ``then`` and ``catch`` chaining.

    ``TaskFuture(task_id)`` or ``TaskFuture(task_result)``. ``then(cb)`` gives a new future
    with ``cb(value)`` once this one succeeds (a failure passes through untouched);
    ``catch(handler)`` gives one that turns a failure into ``handler(exc)`` (a success passes
    through). Callbacks run in the thread that ends the task (an engine worker), and a
    callback that raises fails the future it produces, nothing else. If a callback returns a
    TaskResult or TaskFuture, the new future follows that task.
    """

    __slots__ = ("_result",)

    def __init__(self, task: TaskResult[Any] | TaskFuture | str) -> None:
        if isinstance(task, TaskFuture):
            task = task._result
        elif isinstance(task, str):
            task = TaskResult(task)
        elif not isinstance(task, TaskResult):
            raise TypeError(
                f"TaskFuture() takes a task id (str), a TaskResult or a TaskFuture, got {type(task).__name__}"
            )
        self._result: TaskResult[Any] = task

    @property
    def task_id(self) -> str:
        return self._result.task_id

    @property
    def status(self) -> TaskStatus:
        return self._result.status

    def is_ready(self) -> bool:
        return self._result.is_ready()

    done = is_ready

    def wait(self, timeout: float | None = None) -> Any:
        """Block until final; return the value or raise the error (TimeoutError if not in time)."""
        return self._result.wait(timeout)

    result = wait

    def cancel(self) -> bool:
        return self._result.cancel()

    def __await__(self) -> Generator[Any, None, Any]:
        return self._result.__await__()

    def then(self, callback: Callable[[Any], Any]) -> TaskFuture:
        if not callable(callback):
            raise TypeError(f"then() needs a callable taking the value, got {type(callback).__name__}")
        nxt = _engine.detached()

        def on_done(h: TaskResult[Any]) -> None:
            try:
                if h.status is TaskStatus.SUCCEEDED:
                    try:
                        value = callback(h.wait(0))
                    except BaseException as exc:
                        nxt._settle(exc=exc)
                    else:
                        _settle_with(nxt, value)
                else:
                    forward_outcome(h, nxt)
            finally:
                h = None  # type: ignore[assignment]  # (see forward_outcome)

        self._result._on_done(on_done)
        return TaskFuture(nxt)

    def catch(
        self,
        handler: Callable[[BaseException], Any],
        exception_type: type[BaseException] | tuple[type[BaseException], ...] = Exception,
    ) -> TaskFuture:
        if not callable(handler):
            raise TypeError(f"catch() needs a callable taking the exception, got {type(handler).__name__}")
        nxt = _engine.detached()

        def on_done(h: TaskResult[Any]) -> None:
            try:
                if h.status in (TaskStatus.FAILED, TaskStatus.TIMED_OUT):
                    try:
                        h.wait(0)
                    except exception_type as exc:
                        try:
                            value = handler(exc)
                        except BaseException as exc2:
                            nxt._settle(exc=exc2)
                        else:
                            _settle_with(nxt, value)
                        return
                    except BaseException as exc:
                        nxt._settle(exc=exc)
                        return
                forward_outcome(h, nxt)
            finally:
                h = None  # type: ignore[assignment]  # (see forward_outcome)

        self._result._on_done(on_done)
        return TaskFuture(nxt)

    def __repr__(self) -> str:
        return f"<TaskFuture {self._result.task_id} {self._result.status.name}>"
