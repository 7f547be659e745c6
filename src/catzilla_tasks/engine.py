"""BackgroundTasks: the Python face of the C engine."""

from __future__ import annotations

import atexit
import contextvars
import datetime
import functools
import itertools
import logging
import numbers
import os
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar, overload

from . import _engine, _signals
from ._redact import redact_text
from .config import MAX_MS, TaskConfig, TaskPriority
from .errors import ShutdownTimeout
from .results import TaskResult

if TYPE_CHECKING:
    import asyncio

__all__ = ["BackgroundTasks", "task", "ShutdownTimeout", "current_task"]

log = logging.getLogger("catzilla_tasks")

F = TypeVar("F", bound=Callable[..., Any])

CONFIG_ATTR = "__catzilla_task__"
_DEFAULT_CONFIG = TaskConfig()


def _report_error(what: str, subject: Any, exc: BaseException | None) -> None:
    name = getattr(subject, "__qualname__", None) or redact_text(repr(subject))  # a partial's arguments
    if what == "stuck":
        log.warning("%s", exc)  # exc is the message here
    elif what == "task":
        # Only failures nobody read are logged, once: here when the task ends unheld.
        log.error("task %s failed and nobody read its outcome", name, exc_info=exc)
    elif what == "task_late":
        # ...or when its last handle goes, possibly inside a garbage collection that goes on
        # clearing the exception: logged as text, the exception is not kept in the record.
        if isinstance(exc, BaseException):
            text = "".join(traceback.format_exception(exc)).rstrip()
            log.error("task %s failed and nobody read its outcome\n%s", name, text)
        else:  # only a summary is left (see report_unobserved)
            log.error("%s", exc)
    else:
        log.error("%s %s raised", what, name, exc_info=exc)


_CURRENT_ASYNC: contextvars.ContextVar[TaskResult[Any] | None] = contextvars.ContextVar("catzilla_task", default=None)


def current_task() -> TaskResult[Any] | None:
    """The TaskResult of the task running here (in a worker thread or on the engine's event
    loop), or None outside a task. A long task can check ``current_task().cancel_requested``
    and stop early when someone called ``cancel()`` on it."""
    t = _engine.current_task()
    return t if t is not None else _CURRENT_ASYNC.get()


def _run_coroutine(engine: BackgroundTasks, handle: TaskResult[Any], coro: Coroutine[Any, Any, Any]) -> None:
    engine._loop_runner().submit(handle, coro)


def _cancel_async(engine: BackgroundTasks, handle: TaskResult[Any]) -> None:
    runner = engine._runner
    if runner is not None:
        runner.cancel(handle._key)


# isolation (multiprocessing, pickle) and compiler (the numba front end) are imported on first
# use: a process that never isolates a task or decorates one does not pay for them.
def _compiler() -> Any:
    from . import compiler

    return compiler


def _native_of(func: Any) -> Any:
    """compiler.native_of(func) without importing the compiler: only it attaches native tasks,
    so a map of plain functions in a process that never compiles does not load it."""
    compiler = sys.modules.get(f"{__package__}.compiler")
    return compiler.native_of(func) if compiler is not None else None


def _in_pool_child() -> bool:
    """isolation.in_pool_child() without importing isolation (or multiprocessing) when neither
    is loaded: a pool child, or a multiprocessing child importing its parent's main module,
    has both loaded already."""
    iso = sys.modules.get(f"{__package__}.isolation")
    if iso is not None:
        return bool(iso.in_pool_child())
    mp = sys.modules.get("multiprocessing")
    if mp is None or not hasattr(mp, "current_process"):
        return False
    return bool(getattr(mp.current_process(), "_inheriting", False))


def _isolate(
    engine: BackgroundTasks, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], cfg: TaskConfig
) -> Callable[[], Any]:
    from . import isolation

    payload = isolation.pickle_task(func, args, kwargs)  # TypeError here, at add_task, if it cannot go
    pool = engine._process_pool()
    timeout = cfg.timeout_ms / 1000 if cfg.timeout_ms else None
    name = getattr(func, "__qualname__", None) or repr(func)
    return isolation.IsolatedCall(pool, payload, name, timeout, cfg.memory_limit_mb)


def _failed(engine: BackgroundTasks, task_id: str, func: Any, exc: BaseException | None) -> None:
    engine._failures.append(
        {
            "task_id": task_id,
            # shown by get_stats() and the dashboard: no credentials (a connection string in a message,
            # or in the repr of a partial that names a task without a __qualname__)
            "name": getattr(func, "__qualname__", None) or redact_text(repr(func)),
            "error": redact_text(f"{type(exc).__name__}: {exc}") if exc is not None else "",
            "finished_at": time.time(),
        }
    )


def trace_submit_hook(
    engine: BackgroundTasks, func: Any, args: tuple[Any, ...], kwargs: Any, cfg: Any, block: Any
) -> Any:
    # the C add_task/_submit when tracing may be wanted (the trace_submit hook, installed by _hooks.py;
    # see trace_wanted in _engine/py_engine.c): tracing is imported on first use
    from . import tracing

    if not tracing.provider_set():
        return engine._submit_plain(func, args, kwargs, cfg, block)
    return tracing.submit_local(engine, func, args, kwargs, cfg, block)


# -- rate limits, concurrency limits, named queues (limits.py) and progress (progress.py) ------
# (installed with the other hooks by _hooks.py)
def route_hook(engine: BackgroundTasks, func: Any, args: Any, kwargs: Any, cfg: TaskConfig, block: float) -> Any:
    from . import limits  # only once a task with a limit or a named queue is added

    return limits.route(engine, func, args, kwargs, cfg, block)


def make_progress_hook(handle: TaskResult[Any], fraction: Any, message: Any) -> Any:
    from . import progress

    return progress.hook(handle, fraction, message)


def _new_event_loop() -> asyncio.AbstractEventLoop:
    import asyncio  # only once an async task runs: asyncio is ~10 MiB of a process that has none

    try:
        import uvloop  # optional extra: faster loop when installed
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class _LoopRunner:
    """The engine's event-loop thread: async tasks run here, many at once."""

    def __init__(self, engine: BackgroundTasks) -> None:
        self.loop = _new_event_loop()
        self._tasks: dict[int, asyncio.Task[Any]] = {}
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(started, engine), name=f"{engine.name}-asyncio", daemon=True
        )
        self._thread.start()
        started.wait()

    def _run(self, started: threading.Event, engine: BackgroundTasks) -> None:
        import asyncio

        asyncio.set_event_loop(self.loop)
        engine._adopt_loop_thread()  # a blocking wait() here is refused (use await)
        del engine
        self.loop.call_soon(started.set)
        try:
            while True:
                try:
                    self.loop.run_forever()
                except (SystemExit, KeyboardInterrupt):
                    # A task raised it (sys.exit() in a coroutine): asyncio ends that task with
                    # the exception, then lets it out of the loop. It is the task's failure
                    # (settled by its done callback on the next turn), not the loop's: go on.
                    continue
                break  # stop() was called
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def submit(self, handle: TaskResult[Any], coro: Coroutine[Any, Any, Any]) -> None:
        self.loop.call_soon_threadsafe(self._start, handle, coro)

    def _start(self, handle: TaskResult[Any], coro: Coroutine[Any, Any, Any]) -> None:
        ctx = contextvars.copy_context()
        ctx.run(_CURRENT_ASYNC.set, handle)
        t = self.loop.create_task(coro, context=ctx)
        self._tasks[handle._key] = t
        t.add_done_callback(functools.partial(self._done, handle))

    def cancel(self, key: int) -> None:
        """Cancel the coroutine of a task (any thread)."""
        self.loop.call_soon_threadsafe(self._cancel, key)

    def _cancel(self, key: int) -> None:
        t = self._tasks.get(key)
        if t is not None:
            t.cancel()

    def _done(self, handle: TaskResult[Any], t: asyncio.Task[Any]) -> None:
        self._tasks.pop(handle._key, None)
        if t.cancelled():
            handle._settle(cancelled=True)
        elif (exc := t.exception()) is not None:
            handle._settle(exc=exc)
        else:
            handle._settle(value=t.result())

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()


def _check_queues(queues: Any) -> dict[str, int]:
    """``queues={"emails": 4}``: named queues and their workers, validated."""
    if queues is None:
        return {}
    if not isinstance(queues, dict):
        raise TypeError(f"queues: expected a dict of queue name -> workers, got {type(queues).__name__}")
    from .config import QUEUE_NAME, RESERVED_QUEUE_NAMES, reserved_queue_error

    for q, n in queues.items():
        if not isinstance(q, str) or not QUEUE_NAME.fullmatch(q) or q == "default":
            raise ValueError(
                f"queues: {q!r} is not a queue name (letters, digits, '_', '-', '.'; 'default' is the engine itself)"
            )
        if q in RESERVED_QUEUE_NAMES:
            raise reserved_queue_error("queues", q)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"queues: the workers of {q!r} must be an integer >= 1, got {n!r}")
    return dict(queues)


def _make_config(source: str, priority: Any = None, config: TaskConfig | None = None, **fields: Any) -> TaskConfig:
    if config is not None:
        if not isinstance(config, TaskConfig):
            raise TypeError(f"{source}: config must be a TaskConfig, got {type(config).__name__}")
        if priority is not None:
            fields["priority"] = priority
        return config.replace(**fields) if fields else config
    if priority is not None:
        fields["priority"] = priority
    try:
        return TaskConfig(**fields)
    except TypeError as exc:
        raise TypeError(f"{source}: {exc}") from None


def _attach(func: F, cfg: TaskConfig) -> F:
    if not callable(func):
        raise TypeError(f"@task decorates a function, got {type(func).__name__} {func!r}")
    try:
        setattr(func, CONFIG_ATTR, cfg)
    except (AttributeError, TypeError):
        raise TypeError(
            f"cannot attach a task config to {func!r} (it takes no attributes); wrap it in a def, "
            "or pass options per call with tasks.options(...).add_task(...)"
        ) from None
    return func


@overload
def task(func: F, /) -> F: ...
@overload
def task(
    func: None = None, /, *, priority: TaskPriority | int | str = ..., compile_to_c: bool | str = ..., **config: Any
) -> Callable[[F], F]: ...
def task(
    func: Any = None, /, *, priority: Any = TaskPriority.NORMAL, compile_to_c: bool | str = True, **config: Any
) -> Any:
    """Attach a task config to a function, for any engine: ``@task(priority=TaskPriority.HIGH)``.

    The function is returned unchanged (calling it directly still runs it here and now).
    ``compile_to_c=True`` (the default) runs a simple numeric function as native code with no
    GIL when it can (catzilla_tasks.compiler; needs the ``[compile]`` extra), otherwise as
    Python; ``"require"`` raises CompileError when it cannot; ``False`` never compiles.
    """
    cfg = _make_config("task()", priority, **config)

    def decorate(f: F) -> F:
        return _attach(f, cfg if compile_to_c is False else _compiler().attach(f, cfg, compile_to_c))

    return decorate(func) if func is not None else decorate


class _Options:
    """Per-call overrides: ``tasks.options(priority=..., block_timeout=...).add_task(f, ...)``.

    Fields given here are laid over the task's own config (its decorator's, or the defaults);
    an explicit ``config=`` replaces it. The merged configs are cached, so a reused
    ``options(...)`` object costs one dictionary lookup per call.
    """

    __slots__ = ("_engine", "_config", "_fields", "_block", "_merged")

    def __init__(
        self, engine: BackgroundTasks, config: TaskConfig | None, fields: dict[str, Any], block: float | None
    ) -> None:
        self._engine = engine
        self._config = config
        self._fields = fields
        self._block = block
        # id(base config) -> (base, merged); None is the key for "no decorator config"
        self._merged: dict[int | None, tuple[Any, TaskConfig]] = {}
        if config is None and fields:
            self._merged[None] = (None, _DEFAULT_CONFIG.replace(**fields))

    def _config_for(self, func: Callable[..., Any]) -> TaskConfig | None:
        base = getattr(func, CONFIG_ATTR, None)
        if not isinstance(base, TaskConfig):
            base = getattr(getattr(func, "__func__", None), CONFIG_ATTR, None)
            if not isinstance(base, TaskConfig):
                return self._merged[None][1]
        hit = self._merged.get(id(base))
        if hit is None or hit[0] is not base:
            if len(self._merged) > 64:
                self._merged = {None: self._merged[None]}
            hit = (base, base.replace(**self._fields))
            self._merged[id(base)] = hit
        return hit[1]

    def config_for_call(self, func: Callable[..., Any] | str) -> TaskConfig | None:
        """The config a call of ``func`` with these options runs with (None: the function's
        own); a task name (a string) gets the defaults with these fields laid over them."""
        cfg = self._config
        if cfg is None and self._fields:
            cfg = self._config_for(func)  # type: ignore[arg-type]
        return cfg

    def add_task(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskResult[Any]:
        cfg = self._config
        if cfg is None and self._fields:
            cfg = self._config_for(func)
        return self._engine._submit(func, args, kwargs, cfg, self._block)

    async def add_task_async(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskResult[Any]:
        """``add_task`` for a coroutine. Queued at once (the engine is in this process); with a
        ``block_timeout`` and a full engine, the wait for room runs in a thread, not on the
        event loop."""
        cfg = self._config
        if cfg is None and self._fields:
            cfg = self._config_for(func)
        if not self._block:
            return self._engine._submit(func, args, kwargs, cfg, self._block)
        try:
            return self._engine._submit(func, args, kwargs, cfg, None)
        except _engine.QueueFull:
            pass
        import asyncio  # (loaded: this runs in a coroutine)

        return await asyncio.to_thread(self._engine._submit, func, args, kwargs, cfg, self._block)


_live: weakref.WeakSet[BackgroundTasks] = weakref.WeakSet()
_created = itertools.count()  # creation order of the engines (workflows' default engine is the newest)


def newest_running_engine() -> BackgroundTasks | None:
    """The most recently created engine of this process that is not shut down (None: none is)."""
    running = [e for e in list(_live) if not e.is_shutdown]
    return max(running, key=lambda e: getattr(e, "_created_seq", -1)) if running else None


def _after_fork_in_child() -> None:
    """An engine belongs to the process that made it: in a forked child its worker threads do
    not exist, and the tasks queued in it are the parent's (the parent runs them; the child must
    not run them again). Every engine copied into the child refuses work with a clear error and
    reports no workers; the child creates its own engine."""
    for eng in list(_live):
        eng._forget_after_fork()
        eng._forked = True
    _live.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _shutdown_all() -> None:
    """Interpreter exit: run what is queued (each engine's exit_timeout), then stop."""
    for eng in list(_live):
        try:
            eng.shutdown(wait_for_completion=True, timeout=eng.exit_timeout)
        except Exception:
            log.exception("catzilla_tasks: shutdown at exit did not complete")


class _InitSignature:
    """``BackgroundTasks.__signature__``: its ``__init__``'s, which inspect.signature would
    otherwise not report because the class defines ``__new__`` (lifespan() validates an
    engine's keywords with it). Computed on use: inspect is not imported with the engine."""

    def __get__(self, obj: Any, cls: type[BackgroundTasks]) -> Any:
        if obj is not None:
            raise AttributeError("__signature__")
        import inspect

        sig = inspect.signature(cls.__init__)
        return sig.replace(parameters=list(sig.parameters.values())[1:])


class BackgroundTasks(_engine.Engine):
    """An in-process task engine: four priority queues and a pool of native worker threads.

    ``BackgroundTasks()`` just works. ``add_task(func, *args, **kwargs)`` queues a call and
    returns its TaskResult at once; the engine runs it on a worker thread (an ``async def``
    runs on the engine's event-loop thread). Use it as a context manager, or call
    ``shutdown()``: queued work runs before the engine stops (also at interpreter exit).
    ``queues={"emails": 4}``: named queues, each an engine of its own with that many workers (a
    bulkhead: slow tasks of one queue never starve the others); ``@tasks.task(queue="emails")``
    or ``options(queue="emails")`` routes a task there (limits.py).

    Created in the main thread, it also makes SIGTERM run the queued work before the process
    exits (``handle_sigterm=False`` or ``CATZILLA_TASKS_SIGTERM=0`` turns that off).
    """

    def __init__(
        self,
        workers: int | None = None,
        min_workers: int | None = None,
        max_workers: int | None = None,
        queue_size: int = 10000,
        enable_auto_scaling: bool = True,
        memory_pool_mb: float | None = None,
        *,
        aging_ms: float = 100.0,
        exit_timeout: float | None = 30.0,
        name: str = "catzilla-tasks",
        handle_sigterm: bool = True,
        idempotency_ttl: float = 86400.0,
        tracing: bool = True,
        broker: Any = None,
        queues: dict[str, int] | None = None,
    ) -> None:
        if broker is not None:  # (DistributedTasks passes broker=None here and sets its own)
            raise TypeError(
                f"{type(self).__name__}: broker= needs BackgroundTasks(broker=...) itself or a "
                "subclass of catzilla_tasks.brokers.producer.DistributedTasks"
            )
        cpus = os.cpu_count() or 1
        if _in_pool_child():
            # a module-level engine re-imported in a process-pool child: keep it minimal there
            workers, min_workers, max_workers, enable_auto_scaling = 1, 1, 1, False
        if memory_pool_mb is not None and (
            isinstance(memory_pool_mb, bool) or not isinstance(memory_pool_mb, (int, float)) or not memory_pool_mb > 0
        ):
            raise ValueError(f"memory_pool_mb: must be a number > 0 (megabytes) or None, got {memory_pool_mb!r}")
        if workers is None:
            workers = min(32, cpus * 2)
        if min_workers is None:
            # up to 2 by default, never more than asked for: BackgroundTasks(workers=1) is one worker
            min_workers = min(2, workers) if isinstance(workers, int) and not isinstance(workers, bool) else 2
        for field, value in (("workers", workers), ("min_workers", min_workers), ("queue_size", queue_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}: must be an integer >= 1, got {value!r}")
        if max_workers is None:
            max_workers = max(workers * 4, min_workers)
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers: must be an integer >= 1, got {max_workers!r}")
        if not min_workers <= max_workers:
            raise ValueError(f"min_workers ({min_workers}) must be <= max_workers ({max_workers})")
        if not min_workers <= workers <= max_workers:
            raise ValueError(
                f"workers ({workers}) must be between min_workers ({min_workers}) and max_workers ({max_workers})"
            )
        if not isinstance(tracing, bool):
            raise ValueError(f"tracing: expected True or False, got {tracing!r}")
        if aging_ms <= 0:
            raise ValueError(f"aging_ms: must be > 0, got {aging_ms!r}")
        if (
            isinstance(idempotency_ttl, bool)
            or not isinstance(idempotency_ttl, (int, float))
            or not 0 < idempotency_ttl <= MAX_MS / 1000
        ):
            raise ValueError(f"idempotency_ttl: must be a number of seconds > 0, got {idempotency_ttl!r}")
        queues = _check_queues(queues)
        super().__init__(workers=workers, queue_size=queue_size, aging_ms=float(aging_ms), max_threads=max_workers + 16)
        self.name = name
        # OpenTelemetry spans around add_task and the run, when a tracer provider is set (tracing.py)
        self.tracing = tracing
        self._set_tracing(tracing)
        # A cap on the bytes the queued tasks' arguments hold (see _engine/py_memory.c, memory_pool_mb):
        # a task that does not fit is refused with QueueFull. None: queue_size is the bound.
        self.memory_pool_mb = memory_pool_mb
        if memory_pool_mb is not None and memory_pool_mb != float("inf"):
            self._set_memory_cap(min(int(memory_pool_mb * 2**20), 2**62))
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.enable_auto_scaling = bool(enable_auto_scaling)
        self.exit_timeout = exit_timeout
        self._registered: dict[str, Callable[..., Any]] = {}
        self._runner: _LoopRunner | None = None
        self._runner_lock = threading.Lock()
        self._pool: Any = None
        self._periodic: list[Any] = []
        self._options_cache: dict[Any, _Options] = {}
        self._limits: Any = None  # limits.Limits, made by the first task with a limit
        # named queues: a bulkhead engine each, with its own workers (see limits.py)
        self._queue_engines: dict[str, BackgroundTasks] = {
            q: BackgroundTasks(
                workers=n,
                min_workers=n,
                max_workers=n,
                queue_size=queue_size,
                enable_auto_scaling=False,
                aging_ms=aging_ms,
                exit_timeout=exit_timeout,
                name=f"{name}:{q}",
                handle_sigterm=False,
            )
            for q, n in queues.items()
        }
        # submit-time deduplication by idempotency key (_dedup.py), made on first use
        self.idempotency_ttl = float(idempotency_ttl)
        self._dedup: Any = None
        self._failures: deque[dict[str, Any]] = deque(maxlen=20)
        from .monitor import AutoScaler, TaskMonitor

        self.monitor = TaskMonitor(self)
        self.autoscaler = AutoScaler(self, self.monitor)
        if self.enable_auto_scaling:
            self.autoscaler.enable_auto_scaling()
        self.process_workers = os.cpu_count() or 1
        self._shutdown_done = False  # threads stopped
        self._closing = False  # shutdown() called
        self._forked = False  # this process is a fork of the one that made the engine
        self._finisher: threading.Thread | None = None  # stops the threads after a timed-out shutdown
        self._shutdown_lock = threading.Lock()  # one shutdown() at a time: a second one waits for it
        self._created_seq = next(_created)
        _live.add(self)
        # SIGTERM runs what is queued, then exits (main thread only; see _signals.py)
        if _signals.enabled(handle_sigterm) and not _in_pool_child():
            _signals.install(lambda: list(_live))
        # Distributed mode is the DistributedTasks subclass (see __new__), which sets its broker
        self.broker: Any = None

    __signature__ = _InitSignature()

    def __new__(cls, *args: Any, broker: Any = None, **kwargs: Any) -> BackgroundTasks:
        # BackgroundTasks(broker=...) is a producer for that broker: an instance of the
        # subclass whose add_task publishes (the plain engine keeps its C add_task)
        if broker is not None and cls is BackgroundTasks:
            from .brokers.producer import DistributedTasks

            cls = DistributedTasks
        return _engine.Engine.__new__(cls)

    # -- registration -------------------------------------------------------------------
    @overload
    def task(self, func: F, /) -> F: ...
    @overload
    def task(
        self,
        func: None = None,
        /,
        *,
        priority: TaskPriority | int | str = ...,
        compile_to_c: bool | str = ...,
        **config: Any,
    ) -> Callable[[F], F]: ...
    def task(
        self,
        func: Any = None,
        /,
        *,
        priority: Any = TaskPriority.NORMAL,
        compile_to_c: bool | str = True,
        **config: Any,
    ) -> Any:
        """Decorator: ``@tasks.task(priority=TaskPriority.HIGH, max_retries=...)``.

        Attaches the config (as the module-level ``task`` does, ``compile_to_c`` included) and
        registers the function by name on this engine. The function itself is returned unchanged.
        """
        cfg = _make_config("task()", priority, **config)

        def decorate(f: F) -> F:
            _attach(f, cfg if compile_to_c is False else _compiler().attach(f, cfg, compile_to_c))
            self._registered[f"{f.__module__}.{f.__qualname__}"] = f
            return f

        return decorate(func) if func is not None else decorate

    @property
    def registered_tasks(self) -> dict[str, Callable[..., Any]]:
        return dict(self._registered)

    def periodic(
        self,
        *,
        every: datetime.timedelta | float | None = None,
        cron: str | None = None,
        tz: datetime.tzinfo | None = None,
        overlap: bool = False,
        first_run_now: bool = False,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        **config: Any,
    ) -> Callable[[F], F]:
        """Run the decorated function on a schedule: ``@tasks.periodic(every=timedelta(minutes=5))``
        or ``@tasks.periodic(cron="*/5 * * * *")`` (cron needs the ``[cron]`` extra).

        By default a run does not overlap the previous one (``overlap=False``: a run due while
        the last is still going is skipped) and missed runs are skipped, not piled up. Extra
        keywords are the task's config (priority, timeout_ms, ...). The PeriodicTask is at
        ``func.periodic`` (``.cancel()`` stops it) and in ``tasks.periodic_tasks``.
        """
        cls = self._periodic_type()

        def decorate(f: F) -> F:
            if config:
                _attach(f, _make_config("periodic()", None, **config))
            p = cls(
                self,
                f,
                every=every,
                cron=cron,
                tz=tz,
                overlap=overlap,
                args=args,
                kwargs=kwargs,
                first_run_now=first_run_now,
            )
            self._periodic.append(p)
            # a task under its name too: a worker runs the runs a broker engine publishes
            self._registered[f"{f.__module__}.{f.__qualname__}"] = f
            try:
                f.periodic = p  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return f

        return decorate

    def _periodic_type(self) -> type:
        """The class of this engine's periodic tasks (a broker engine's fire once per tick
        across its cluster: brokers/schedules.py)."""
        from .periodic import PeriodicTask

        return PeriodicTask

    @property
    def periodic_tasks(self) -> list[Any]:
        return list(self._periodic)

    def chain(self, name: str) -> Any:
        """A new, empty workflow (:class:`~catzilla_tasks.TaskChain`) that runs on this engine."""
        from .workflows import chain_for

        return chain_for(self, name)

    # -- submission -----------------------------------------------------------------------
    # add_task(func, *args, **kwargs) is the C method of _engine.Engine (no Python frame).

    async def add_task_async(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskResult[Any]:
        """``add_task`` for ``async def`` code: the same TaskResult, the same errors. In this
        in-process engine queueing never waits on I/O, so it returns at once (it is ``add_task``);
        on a broker engine (``BackgroundTasks(broker=...)``) it publishes without blocking the
        event loop. Code that runs under both can always await it."""
        return self.add_task(func, *args, **kwargs)

    def options(
        self,
        *,
        priority: TaskPriority | int | str | None = None,
        config: TaskConfig | None = None,
        block_timeout: float | None = None,
        eta: datetime.datetime | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> Any:
        """Per-call overrides without clashing with the task's own keywords::

            tasks.options(priority=TaskPriority.CRITICAL).add_task(send, user_id, message="hi")

        ``block_timeout``: when the engine is full, wait up to that many seconds for room
        (``-1`` or ``float('inf')``: wait as long as it takes) instead of raising QueueFull.
        ``eta``: an aware or naive-local ``datetime`` at which to run (instead of ``delay_ms``).
        Any TaskConfig field may be given (``delay_ms=``, ``max_retries=``, ``timeout_ms=``...).
        ``idempotency_key``: a second add_task with the key while the first task with it is
        queued or running, or within ``idempotency_ttl`` seconds of its submission, returns the
        first task's handle and queues nothing (see _dedup.py).
        """
        if idempotency_key is not None:
            from . import _dedup

            plain = self.options(priority=priority, config=config, block_timeout=block_timeout, eta=eta, **fields)
            with self._runner_lock:
                if self._dedup is None:
                    self._dedup = _dedup.Registry(self.idempotency_ttl)
            return _dedup.KeyedOptions(self._dedup, plain, _dedup.check_key(idempotency_key))
        if priority is not None:
            fields["priority"] = priority
        # The same options again (the common case: options(priority=CRITICAL) on a request
        # path) reuse one validated _Options: building a TaskConfig costs ~15 us.
        key: Any = None
        if eta is None:
            try:
                # the values' types too: True == 1 (and 1.0 == 1) must not find options validated for 1
                key = (
                    tuple(sorted((k, type(v), v) for k, v in fields.items())),
                    id(config) if config is not None else None,
                    type(block_timeout),
                    block_timeout,
                )
                hit = self._options_cache.get(key)
            except TypeError:  # an unhashable value: no caching
                key = hit = None
            if hit is not None and hit._config is config:
                return hit
        if eta is not None:
            if "delay_ms" in fields:
                raise TypeError("options(): give eta or delay_ms, not both")
            if not isinstance(eta, datetime.datetime):
                raise ValueError(f"eta: expected a datetime, got {type(eta).__name__} {eta!r}")
            now = datetime.datetime.now(eta.tzinfo) if eta.tzinfo else datetime.datetime.now()
            delay_ms = max(0.0, (eta - now).total_seconds() * 1000.0)
            if delay_ms > MAX_MS:
                raise ValueError(f"eta: {eta} is past the longest time the engine can wait (100 years from now)")
            fields["delay_ms"] = delay_ms
        unknown = set(fields) - set(_DEFAULT_CONFIG.as_dict())
        if unknown:
            raise TypeError(
                f"options(): unknown option(s) {', '.join(sorted(unknown))}; options are "
                f"{', '.join(_DEFAULT_CONFIG.as_dict())}, config and block_timeout (the task's own "
                "arguments go to add_task)"
            )
        cfg = _make_config("options()", None, config, **fields) if config is not None else None
        if block_timeout is not None:
            if isinstance(block_timeout, bool) or not isinstance(block_timeout, (int, float)):
                raise ValueError(f"block_timeout: expected seconds (a number), got {block_timeout!r}")
            if block_timeout != block_timeout:
                raise ValueError("block_timeout: NaN is not a number of seconds")
            if block_timeout == float("inf"):
                block_timeout = -1
            elif block_timeout < 0 and block_timeout != -1:
                raise ValueError(
                    f"block_timeout: must be >= 0 seconds, or -1 to wait without limit; got {block_timeout!r}"
                )
        opts = _Options(self, cfg, fields, block_timeout)  # validates, at the call site
        if key is not None:
            if len(self._options_cache) >= 256:
                self._options_cache.clear()
            self._options_cache[key] = opts
        return opts

    # -- waiting and stopping -------------------------------------------------------------
    def map(
        self,
        func: Callable[..., Any],
        iterable_of_args: Any,
        /,
        *more_iterables: Any,
        chunk_size: int | None = None,
        return_exceptions: bool = False,
        out: Any = None,
    ) -> Any:
        """Run ``func(*args)`` for every ``args`` of ``iterable_of_args`` (a tuple of positional
        arguments, or a single value for a one-parameter function) as tasks submitted in one call;
        the results in order.

        ``tasks.map(func, col0, col1, ...)``: one iterable per parameter, as the built-in ``map``
        (of equal lengths). Any argument may be an object with the buffer protocol
        (``array.array``, a numpy array, a memoryview): 1-D, one value per item, or, as the only
        iterable, 2-D of shape (n, nargs), one row of arguments per item. A compiled task reads
        int64, float64 or bool buffers in place, on its workers, with no Python object per item;
        their formats must match its signature exactly (TypeError otherwise, before anything
        runs). Python tasks get the items as Python numbers.

        A compiled task (``@task``, ``compile_to_c``) runs as native code on the workers with no
        GIL, ``chunk_size`` items per engine node (default: at least 8 nodes per worker, at most
        4096 items per node; a config with retries, a timeout or hooks makes it one task per item,
        as Python); other functions run one Python task per item, at most a few thousand queued
        at a time (a batch of millions never holds a node per item). A failed item raises its
        exception (with a note naming the item), or, with ``return_exceptions=True``, takes its
        place in the list. As ``concurrent.futures``: when ``map`` raises (a Python task's
        failure, reached in order; Ctrl-C) the items not started yet are cancelled.

        ``out``: None (a list of results), ``"array"`` (an ``array.array`` of the result type:
        'q' int64, 'd' float64, 'B' for bool results) or a writable, contiguous 1-D buffer of n
        items of the result type, filled and returned; the workers of a compiled task write the
        results there directly. ``out`` cannot be combined with ``return_exceptions``.
        """
        if not callable(func):
            raise TypeError(f"map() needs a callable as its first argument, got {type(func).__name__} {func!r}")
        if chunk_size is not None:
            # any integer type (a numpy integer too), not a bool
            if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
                raise ValueError(f"chunk_size: must be an integer >= 1 or None, got {chunk_size!r}")
            chunk_size = int(chunk_size)
        from . import mapping

        with mapping.MapInput(iterable_of_args, more_iterables) as inp:
            mapping.check_out(out, len(inp), return_exceptions)
            cfg = getattr(func, CONFIG_ATTR, None)
            native = _native_of(func)
            plain = cfg is not None and not cfg.max_retries and not cfg.timeout_ms and not any(cfg._hooks)
            if native is not None and plain and cfg is not None and cfg._native is native:
                res = mapping.map_native(self, native, inp, chunk_size, int(cfg.priority), return_exceptions, out=out)
                if res is not None:
                    return res
            if native is not None and native.require:  # never as Python: CompileError says why
                mapping.refuse_batch(native, inp, plain)
            method_of = _native_of(getattr(func, "__func__", None))
            if native is None and method_of is not None:
                method_of.refuse_method(func)
            items = inp.as_items()
            if cfg is not None and (cfg.delay_ms or cfg.isolation == "process" or cfg._routed):

                def submit(part: Any, handles: list[Any]) -> None:
                    for a in part:  # an item may fail (e.g. not picklable) after others were queued
                        handles.append(self._submit(func, a if isinstance(a, tuple) else (a,), None, None, -1.0))
            else:

                def submit(part: Any, handles: list[Any]) -> None:
                    handles.extend(self._submit_batch(func, part, None))

            results = mapping.map_python(submit, items, func, return_exceptions)
        return results if out is None else mapping.python_out(results, out)

    def _live_workers(self) -> int:
        """Worker threads running now."""
        return int(self._stats()["workers"])

    def join(self, timeout: float | None = None) -> None:
        """Block until nothing is queued or running (tasks added meanwhile count too)."""
        if self._in_own_task():
            raise RuntimeError(
                "join() inside a task of this engine would wait for that task itself, forever: wait "
                "for the tasks it needs with their TaskResult.wait() (or await them) instead"
            )
        remaining = timeout
        if self._queue_engines:  # the named queues too (see limits.py), within the one timeout
            if timeout is not None and timeout != timeout:
                raise ValueError("join(): timeout is NaN; give seconds >= 0, or None to wait without limit")
            deadline = None if timeout is None else time.monotonic() + timeout
            for sub in self._queue_engines.values():
                sub.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            self._drain_queues(deadline)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._drain(remaining):
            s = self._stats()
            raise TimeoutError(
                f"join(): {s['queued_total']} tasks still queued and {s['running']} running after {timeout} s"
            )

    def _drain_queues(self, deadline: float | None) -> bool:
        """Wait (until ``deadline``, monotonic s) until this engine and its named queues are all
        idle at once: a task of one queue may add tasks to another (the default one to "emails"
        and back), so each is drained in turn until a pass finds them all idle and nothing was
        submitted to any of them while it looked. False: the deadline passed first."""
        engines = [*self._queue_engines.values(), self]
        while True:
            for e in engines:
                if not e._drain(None if deadline is None else max(0.0, deadline - time.monotonic())):
                    return False
            before = [e._stats()["submitted"] for e in engines]
            if all(e._drain(0) for e in engines) and before == [e._stats()["submitted"] for e in engines]:
                return True

    def shutdown(self, wait_for_completion: bool = True, timeout: float | None = 30) -> None:
        """Stop accepting tasks, finish, and stop the workers.

        With ``wait_for_completion`` (the default) every task already queued runs before this
        returns; otherwise queued tasks are cancelled and only running ones finish. If that
        takes longer than ``timeout`` seconds, what is still queued is cancelled and
        ShutdownTimeout says how many tasks were cancelled and how many still run: the engine
        stops its threads by itself once those end, and calling shutdown() again waits up to
        its own ``timeout`` for that. Once the engine has stopped, calling it again does nothing.
        """
        if self._shutdown_done:
            return
        if timeout is not None and timeout != timeout:  # refused before anything stops
            raise ValueError("shutdown(): timeout is NaN; give seconds >= 0, or None to wait without limit")
        if self._in_own_task():
            raise RuntimeError(
                "shutdown() inside a task of this engine would wait for that task itself (it counts as "
                "running until it returns): call it from outside the engine's tasks, e.g. the thread "
                "that made the engine"
            )
        # Two threads stopping the same engine at once would both stop (and join) its workers;
        # the second caller waits, within its own timeout, for the first to finish instead.
        limit = -1 if timeout is None or timeout == float("inf") else max(0.0, min(timeout, threading.TIMEOUT_MAX))
        if not self._shutdown_lock.acquire(timeout=limit):
            running = self._stats()["running"]
            raise ShutdownTimeout(
                f"shutdown(): another shutdown() of this engine did not finish within {timeout} s",
                0,
                running,
            )
        try:
            self._shutdown(wait_for_completion, timeout)
        finally:
            self._shutdown_lock.release()

    def _shutdown(self, wait_for_completion: bool, timeout: float | None) -> None:
        if self._shutdown_done:
            return
        if self._forked:  # a forked child: this engine's threads are the parent's
            self._closing = self._shutdown_done = True
            return
        if self._finisher is not None:
            # an earlier shutdown timed out: its running tasks end, then the finisher stops all
            self._finisher.join(timeout)
            if self._finisher.is_alive():
                running = self._stats()["running"]
                raise ShutdownTimeout(
                    f"shutdown(): {running} tasks were still running after {timeout} s more (they finish "
                    "in the background; the engine stops when they end)",
                    0,
                    running,
                )
            return
        self._closing = True
        for p in self._periodic:
            p.cancel()
        self.autoscaler.disable()
        if wait_for_completion:
            # Work in flight finishes, with what it creates (a task adding tasks, workflow steps
            # released by finished ones): only work from outside is refused until it is done.
            self._close_to_outside()
            if self._queue_engines:  # what the tasks in flight add to the named queues runs too
                self._drain_queues(None if timeout is None else time.monotonic() + timeout)
        else:
            self._close()
            if self._limits is not None:
                self._limits.cancel_parked()
        for sub in self._queue_engines.values():
            sub.shutdown(wait_for_completion, timeout)
        self.resume()
        if not wait_for_completion:
            self._cancel_queued()
        done = self._drain(timeout)
        # Nothing is in flight once the drain ends (a completion counts as running until its
        # callbacks ran), so nothing can create work any more: refuse it from everywhere.
        self._close()
        if not done:
            cancelled = self._cancel_queued()
            running = self._stats()["running"]
            if self._pool is not None:
                self._pool.shutdown(wait=False)  # process tasks still running are killed
            _live.discard(self)
            # The workers, the timer and the event loop stop once the running tasks end.
            self._finisher = threading.Thread(target=self._finish_stop, name=f"{self.name}-shutdown", daemon=True)
            self._finisher.start()
            raise ShutdownTimeout(
                f"shutdown(): not finished within {timeout} s: {cancelled} queued tasks were cancelled, "
                f"{running} were still running (they finish in the background, then the engine stops)",
                cancelled,
                running,
            )
        self._stop_threads()
        _live.discard(self)

    def _finish_stop(self) -> None:
        self._drain(None)
        self._stop_threads()

    def _stop_threads(self) -> None:
        if self._runner is not None:
            self._runner.stop()
        self._stop_workers()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._shutdown_done = True

    @property
    def is_shutdown(self) -> bool:
        """True once shutdown() was called (the engine accepts no more tasks)."""
        return self._closing

    def __enter__(self) -> BackgroundTasks:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(wait_for_completion=True, timeout=self.exit_timeout)

    # -- figures ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Live counters of this engine (queued per priority, running, outcomes, workers)."""
        s = self._stats()
        s["queued"] = dict(zip((p.name for p in TaskPriority), s["queued"], strict=True))
        return s

    @staticmethod
    def memory_stats() -> dict[str, int]:
        """The node slab of this process (shared by all engines)."""
        return _engine.memory_stats()

    # -- internals ------------------------------------------------------------------------------
    def _loop_runner(self) -> _LoopRunner:
        runner = self._runner
        if runner is None:
            with self._runner_lock:
                if self._runner is None:
                    self._runner = _LoopRunner(self)
                runner = self._runner
        return runner

    def _process_pool(self) -> Any:
        pool = self._pool
        if pool is None:
            with self._runner_lock:
                if self._pool is None:
                    from . import isolation

                    self._pool = isolation.ProcessPool(self.process_workers, name=self.name)
                pool = self._pool
        return pool

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop async tasks run on (started on first use)."""
        return self._loop_runner().loop

    def __repr__(self) -> str:
        s = self._stats()
        state = "shut down" if self._shutdown_done else "shutting down" if self._closing else "running"
        return (
            f"<BackgroundTasks {self.name!r} {state} workers={s['workers']} queued={s['queued_total']} "
            f"running={s['running']}>"
        )
