"""Task chains and workflows: a DAG of steps that the engine runs, each step a task.

``TaskChain`` (``step``, ``add_task``, ``validate``, ``execute``, ``cancel``), ``Step``,
``result_of`` / ``results_of`` (a step's value as another's argument), ``WorkflowError``,
``@workflow`` and the Celery-style ``call``, ``chain``, ``group``, ``chord``. Each execution
becomes gates of the C engine (``Engine._gates``): a step's dependents are released by the
worker that ran it, in C; Python hears only of failures and of a full engine. The user's guide
is docs/workflows.md; the design is in docs/architecture.md (Workflows).
"""

from __future__ import annotations

import threading
import traceback
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from . import _engine
from ._engine import QueueFull, TaskCancelled
from .engine import BackgroundTasks, newest_running_engine
from .errors import WorkflowError
from .results import TaskFuture, TaskResult

__all__ = [
    "Call",
    "Group",
    "Step",
    "TaskChain",
    "Workflow",
    "WorkflowError",
    "call",
    "chain",
    "chain_for",
    "chord",
    "default_engine",
    "group",
    "result_of",
    "results_of",
    "workflow",
]


# -- references to results ------------------------------------------------------------------


class Step:
    """A step of a :class:`TaskChain` (returned by :meth:`TaskChain.step`).

    Pass it in ``depends_on=[...]``, or as an argument of a later step to receive its value.
    """

    __slots__ = ("chain", "index", "id")

    def __init__(self, chain: TaskChain, index: int, step_id: str) -> None:
        self.chain = chain
        self.index = index
        self.id = step_id

    def __repr__(self) -> str:
        return f"<Step {self.id!r} of workflow {self.chain.name!r}>"


class _ResultRef:
    """An argument replaced by step values when the step runs: one value (``many=False``) or
    a list of values in the order of ``ids``."""

    __slots__ = ("ids", "many")

    def __init__(self, ids: tuple[Any, ...], many: bool) -> None:  # str | Step; str once in a chain
        self.ids = ids
        self.many = many

    def __repr__(self) -> str:
        names = ", ".join(repr(i.id if isinstance(i, Step) else i) for i in self.ids)
        return f"results_of({names})" if self.many else f"result_of({names})"


def result_of(step: str | Step) -> Any:
    """An argument that becomes the value of ``step`` (a step id or a Step) when the step
    that receives it runs; that step then depends on ``step``."""
    if not isinstance(step, (str, Step)):
        raise TypeError(f"result_of() takes a step id (str) or a Step, got {type(step).__name__} {step!r}")
    return _ResultRef((step,), False)


def results_of(*steps: str | Step) -> Any:
    """An argument that becomes the list of these steps' values, in this order, when the step
    that receives it runs; that step then depends on each of them."""
    for s in steps:
        if not isinstance(s, (str, Step)):
            raise TypeError(f"results_of() takes step ids (str) or Steps, got {type(s).__name__} {s!r}")
    return _ResultRef(tuple(steps), True)


# -- the default engine ----------------------------------------------------------------------

_default_lock = threading.Lock()


def default_engine() -> BackgroundTasks:
    """The engine a workflow runs on when it was given none: the most recently created
    ``BackgroundTasks`` that is still running, else a new one (created once, on first use)."""
    with _default_lock:
        newest = newest_running_engine()
        if newest is not None:
            return newest
        return BackgroundTasks(name="catzilla-tasks-workflows")


# -- definition ------------------------------------------------------------------------------


class _StepDef:
    __slots__ = ("id", "func", "args", "kwargs", "depends_on", "refs")

    def __init__(
        self,
        step_id: str,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        depends_on: tuple[str, ...],
        refs: tuple[tuple[int | None, str | None, _ResultRef], ...],
    ) -> None:
        self.id = step_id
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.depends_on = depends_on
        self.refs = refs


class _Plan:
    """A validated workflow, flattened into arrays indexed by step (shared by executions), in
    the shape ``Engine._gates`` takes. Index ``n`` (one past the last step) is the *finish*
    step, released by the steps nothing depends on; its function is per execution."""

    __slots__ = ("name", "ids", "funcs", "values", "kwnames", "pending", "dependents", "fills", "roots")

    name: str
    ids: tuple[str, ...]
    funcs: tuple[Callable[..., Any], ...]
    # per step: the call's values (positional, then keyword values) and keyword names
    values: tuple[tuple[Any, ...], ...]
    kwnames: tuple[tuple[str, ...] | None, ...]
    pending: tuple[int, ...]  # dependencies to succeed before a step is queued
    dependents: tuple[tuple[int, ...], ...]  # steps counted down by a step's success
    # per step: None, or ((index into values, source), ...): a value to replace by a result,
    # the source being a step index or a tuple of them (results_of: a list)
    fills: tuple[tuple[tuple[int, Any], ...] | None, ...]
    roots: tuple[int, ...]


_NESTED = (list, tuple, set, frozenset, dict)
# the argument types _add looks at more closely (a step's result, or a container that must not hide one)
_SPECIAL: tuple[type, ...] = (Step, _ResultRef, *_NESTED)


def _check_nested(where: str, value: Any) -> None:
    items = value.values() if isinstance(value, dict) else value
    for v in items:
        if isinstance(v, (Step, _ResultRef)):
            raise TypeError(
                f"{where}: a step's result inside a {type(value).__name__} is not replaced (only top-level "
                f"arguments are); pass results_of(...) to get a list of results"
            )


def _names(ids: Iterable[str], limit: int = 10) -> str:
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids)} steps)" if len(ids) > limit else "")


class TaskChain:
    """A workflow: steps (tasks) and the dependencies between them. See the module docstring.

    ``TaskChain(name)`` runs on the default engine; ``TaskChain(name, tasks=engine)`` on
    ``engine``. A chain can be executed many times; each ``execute()`` is independent.
    """

    def __init__(self, name: str, *, tasks: BackgroundTasks | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"TaskChain(): name must be a non-empty string, got {name!r}")
        if tasks is not None and not isinstance(tasks, _engine.Engine):
            raise TypeError(f"TaskChain(): tasks must be a BackgroundTasks engine, got {type(tasks).__name__}")
        self.name = name
        self.tasks = tasks
        self._steps: list[_StepDef] = []
        self._index: dict[str, int] = {}
        self._plan: _Plan | None = None
        self._runs: set[_Run] = set()
        # runs started on a broker engine from this process, for cancel()
        self._remote_runs: weakref.WeakSet[Any] = weakref.WeakSet()

    # -- building ----------------------------------------------------------------------------
    def add_task(
        self,
        func: Callable[..., Any],
        /,
        *args: Any,
        depends_on: str | Step | Sequence[str | Step] | None = None,
        step_name: str | None = None,
        **kwargs: Any,
    ) -> TaskChain:
        """Add the step ``func(*args, **kwargs)``; return the chain (its id is
        ``f"{name}_{index}"`` unless ``step_name`` is given)."""
        self._add(func, args, kwargs, depends_on, step_name)
        return self

    def step(
        self,
        func: Callable[..., Any],
        /,
        *args: Any,
        depends_on: str | Step | Sequence[str | Step] | None = None,
        step_name: str | None = None,
        **kwargs: Any,
    ) -> Step:
        """Add the step ``func(*args, **kwargs)``; return its :class:`Step` handle, which a
        later step can take as an argument (it receives this step's value)."""
        return self._add(func, args, kwargs, depends_on, step_name)

    def _add(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], depends_on: Any, step_name: Any) -> Step:
        index = len(self._steps)
        if not callable(func):
            raise TypeError(
                f"workflow {self.name!r}: step {index} needs a callable, got {type(func).__name__} {func!r}; pass "
                "the function itself, e.g. add_task(send, user_id), not add_task(send(user_id))"
            )
        if step_name is None:
            step_id = f"{self.name}_{index}"
        elif isinstance(step_name, str) and step_name:
            step_id = step_name
        else:
            raise ValueError(f"workflow {self.name!r}: step_name must be a non-empty string, got {step_name!r}")
        if step_id in self._index:
            raise ValueError(
                f"workflow {self.name!r}: duplicate step name {step_id!r}: step {self._index[step_id]} and step "
                f"{index} both have it; give one of them another step_name"
            )
        deps = self._dep_ids(step_id, depends_on)
        refs: list[tuple[int | None, str | None, _ResultRef]] = []
        for pos, value in enumerate(args):
            if isinstance(value, _SPECIAL) and (ref := self._as_ref(step_id, value)) is not None:
                refs.append((pos, None, ref))
        for key, value in kwargs.items():
            if isinstance(value, _SPECIAL) and (ref := self._as_ref(step_id, value)) is not None:
                refs.append((None, key, ref))
        self._steps.append(_StepDef(step_id, func, args, kwargs or None, deps, tuple(refs) if refs else ()))
        self._index[step_id] = index
        self._plan = None
        return Step(self, index, step_id)

    def _own_id(self, step_id: str, dep: Any, what: str) -> str:
        if isinstance(dep, Step):
            if dep.chain is not self:
                raise ValueError(
                    f"workflow {self.name!r}: step {step_id!r} {what} step {dep.id!r} of another workflow "
                    f"({dep.chain.name!r}); steps can only use steps of their own workflow"
                )
            return dep.id
        if isinstance(dep, str):
            return dep
        raise TypeError(f"workflow {self.name!r}: step {step_id!r} {what} {dep!r}; expected a step id (str) or a Step")

    def _dep_ids(self, step_id: str, depends_on: Any) -> tuple[str, ...]:
        if depends_on is None:
            return ()
        if isinstance(depends_on, (str, Step)):
            depends_on = (depends_on,)
        try:
            items = list(depends_on)
        except TypeError:
            raise TypeError(
                f"workflow {self.name!r}: depends_on of step {step_id!r} must be a list of step ids or Steps, got "
                f"{type(depends_on).__name__}"
            ) from None
        own = self._own_id
        return tuple(
            [
                d.id if type(d) is Step and d.chain is self else d if type(d) is str else own(step_id, d, "depends on")
                for d in items
            ]
        )

    def _as_ref(self, step_id: str, value: Any) -> _ResultRef | None:
        """The step results an argument stands for, or None (a container is checked not to hide
        any: only top-level arguments are replaced)."""
        if isinstance(value, Step):
            return _ResultRef((self._own_id(step_id, value, "takes the result of"),), False)
        if isinstance(value, _ResultRef):
            return _ResultRef(tuple(self._own_id(step_id, v, "takes the result of") for v in value.ids), value.many)
        if isinstance(value, _NESTED):
            _check_nested(f"workflow {self.name!r}, step {step_id!r}", value)
        return None

    # -- checking ------------------------------------------------------------------------------
    @property
    def step_ids(self) -> list[str]:
        """The ids of the steps, in the order they were added."""
        return [s.id for s in self._steps]

    def __len__(self) -> int:
        return len(self._steps)

    def validate(self) -> TaskChain:
        """Check the dependencies (ValueError naming the steps: an unknown step, a cycle);
        return the chain. ``execute()`` does it too."""
        self._compile()
        return self

    def _compile(self) -> _Plan:
        plan = self._plan
        if plan is not None:
            return plan
        steps, index = self._steps, self._index
        n = len(steps)
        deps: list[list[int]] = []
        subs: list[Any] = []
        for s in steps:
            names = s.depends_on
            if s.refs:
                names = names + tuple(i for _, _, ref in s.refs for i in ref.ids)
            try:
                ks = [index[d] for d in names]
            except KeyError:
                unknown = next(d for d in names if d not in index)
                raise ValueError(
                    f"workflow {self.name!r}: step {s.id!r} depends on unknown step {unknown!r}; the steps are "
                    f"{_names(index)}"
                ) from None
            deps.append(list(dict.fromkeys(ks)) if len(ks) > 1 else ks)
            if s.refs:
                pos_subs = tuple(
                    (pos, tuple(index[i] for i in ref.ids) if ref.many else index[ref.ids[0]])
                    for pos, key, ref in s.refs
                    if key is None
                )
                kw_subs = tuple(
                    (key, tuple(index[i] for i in ref.ids) if ref.many else index[ref.ids[0]])
                    for pos, key, ref in s.refs
                    if key is not None
                )
                subs.append((pos_subs, kw_subs))
            else:
                subs.append(None)
        dependents: list[list[int]] = [[] for _ in range(n)]
        for j, ds in enumerate(deps):
            for d in ds:
                dependents[d].append(j)
        # Kahn's algorithm: what is left once every step without pending dependencies is
        # removed lies on, or behind, a cycle.
        left = [len(ds) for ds in deps]
        ready = [j for j in range(n) if not left[j]]
        roots = tuple(ready)
        seen = 0
        while ready:
            d = ready.pop()
            seen += 1
            for j in dependents[d]:
                left[j] -= 1
                if not left[j]:
                    ready.append(j)
        if seen < n:
            raise ValueError(
                f"workflow {self.name!r}: dependency cycle: {self._cycle(deps, left)} (each step depends on the next)"
            )
        plan = _Plan()
        plan.name = self.name
        plan.ids = tuple(s.id for s in steps)
        plan.funcs = tuple(s.func for s in steps)
        values: list[tuple[Any, ...]] = []
        kwnames: list[tuple[str, ...] | None] = []
        fills: list[Any] = []
        for s, sub in zip(steps, subs, strict=True):
            kw = s.kwargs or {}
            names = tuple(kw)
            values.append((*s.args, *kw.values()) if kw else s.args)
            kwnames.append(names or None)
            if sub is None:
                fills.append(None)
            else:
                pos_subs, kw_subs = sub
                at_kw = {k: len(s.args) + i for i, k in enumerate(names)}
                fills.append(tuple(pos_subs) + tuple((at_kw[k], src) for k, src in kw_subs))
        sinks = tuple(j for j in range(n) if not dependents[j])
        plan.values = (*values, ())
        plan.kwnames = (*kwnames, None)
        plan.pending = (*(len(ds) for ds in deps), len(sinks))
        plan.dependents = (*(tuple(ds) if ds else (n,) for ds in dependents), ())
        plan.fills = (*fills, None)
        plan.roots = roots
        self._plan = plan
        return plan

    def _cycle(self, deps: list[list[int]], left: list[int]) -> str:
        # Every step still blocked has a blocked dependency: walking them must come back.
        start = next(j for j, k in enumerate(left) if k)
        path: list[int] = []
        at: dict[int, int] = {}
        j = start
        while j not in at:
            at[j] = len(path)
            path.append(j)
            j = next(d for d in deps[j] if left[d])
        loop = path[at[j] :] + [j]
        return " -> ".join(repr(self._steps[k].id) for k in loop)

    # -- running -------------------------------------------------------------------------------
    def execute(self) -> TaskResult[Any]:
        """Start the workflow; return its TaskResult at once (value: each step's value by id).
        On an engine with a broker the workers run it (see :meth:`Broker.run_workflow`) and this
        returns the broker's result handle (a RemoteResult on Redis)."""
        plan = self._compile()
        engine = self.tasks if self.tasks is not None else default_engine()
        accepts = getattr(engine, "_accepts_here", None)
        # (a step of a workflow in flight may start another while its engine shuts down)
        refused = (not accepts()) if accepts is not None else getattr(engine, "is_shutdown", False)
        if refused:
            raise RuntimeError(
                f"cannot execute workflow {self.name!r}: its BackgroundTasks engine has been shut down; "
                "create a new one"
            )
        broker = getattr(engine, "broker", None)
        if broker is not None:
            # distributed mode: the workers run the steps and release the dependents
            remote: TaskResult[Any] = broker.run_workflow(plan)
            self._remote_runs.add(remote)
            return remote
        result = _engine.detached()
        if not plan.ids:
            result._settle(value={})
            return result
        run = _Run(plan, engine, result, self)
        self._runs.add(run)
        result._on_done(run._ended)
        run.start()
        return result

    def execute_async(self) -> TaskFuture:
        """``execute()`` as a TaskFuture (awaitable, with then/catch)."""
        engine = self.tasks if self.tasks is not None else default_engine()
        if getattr(engine, "broker", None) is not None:
            raise NotImplementedError(
                f"workflow {self.name!r}: in distributed mode execute() returns a RemoteResult, which is "
                "awaitable itself (await chain.execute()); TaskFuture chaining is for local tasks"
            )
        return TaskFuture(self.execute())

    def cancel(self) -> bool:
        """Cancel every execution of this chain still running (see the module docstring); on a
        broker engine, the runs this process started whose RemoteResult it still holds. True if
        there was one."""
        cancelled = False
        for run in list(self._runs):
            cancelled = run.result.cancel() or cancelled
        for remote in list(self._remote_runs):
            cancelled = remote.cancel() or cancelled
        return cancelled

    def __repr__(self) -> str:
        return f"<TaskChain {self.name!r} steps={len(self._steps)} running={len(self._runs)}>"


def chain_for(tasks: BackgroundTasks, name: str) -> TaskChain:
    """A new workflow that runs on ``tasks`` (what ``tasks.chain(name)`` gives)."""
    return TaskChain(name, tasks=tasks)


# -- execution --------------------------------------------------------------------------------

_PENDING: Any = object()
_RETRY_FIRST_S = 0.001
_RETRY_MAX_S = 0.05


class _Run:
    """One execution of a plan: a Gate per step (``Engine._gates``, one C call), plus the
    finish gate. The engine does the scheduling: a gate's task that succeeds counts down its
    dependents in C and queues those it completes, in the worker that ran it; the finish gate,
    released by the last sink, runs :meth:`_finish` as a task. Python hears only of failures
    and of a full engine (:meth:`_on_fail`, called by the gate's C code), and of the end.

    Concurrency: gates change state only with the GIL held (C completion paths, these
    methods). ``done`` turns True once (success, failure, cancel); whoever sets it settles
    the result, whose done-callback (:meth:`_ended`) cancels every gate not finished, so a
    step released concurrently is cancelled either as a waiting gate or as a queued task.
    The lock guards only the queue-full overflow list.
    """

    __slots__ = (
        "plan",
        "engine",
        "result",
        "chain",
        "gates",
        "done",
        "lock",
        "overflow",
        "retry_armed",
        "retry_s",
        "__weakref__",
    )

    def __init__(self, plan: _Plan, engine: BackgroundTasks, result: TaskResult[Any], chain: TaskChain) -> None:
        self.plan = plan
        self.engine = engine
        self.result = result
        self.chain = chain
        self.done = False
        self.lock = threading.Lock()
        self.overflow: list[Any] = []
        self.retry_armed = False
        self.retry_s = _RETRY_FIRST_S
        self.gates: list[Any] = engine._gates(
            (*plan.funcs, self._finish),
            plan.values,
            plan.kwnames,
            plan.pending,
            plan.dependents,
            plan.fills,
            self._on_fail,
        )

    def start(self) -> None:
        """Queue the steps without dependencies (in the caller of execute())."""
        gates = self.gates
        for j in self.plan.roots:
            if self.done:
                break
            self._start(gates[j])

    def _start(self, g: Any) -> bool:
        """Queue gate g now; park it if the engine is full. False once the run is over."""
        try:
            if not g._fire():
                self._defer([g])
        except BaseException as exc:  # shut down, a process task that does not pickle, ...
            self._fail(g.step, exc, "could not be queued")
            return False
        return True

    def _on_fail(self, g: Any, exc: BaseException | None) -> None:
        """From C: g's task ended unsuccessfully (exc None), or g was released and could not be
        queued (exc: the error)."""
        if self.done:
            return
        if exc is None:
            try:
                g.result.wait()  # raises: the task ended unsuccessfully
            except BaseException as e:  # noqa: BLE001 - the step's own error
                self._fail(g.step, e, "was cancelled" if isinstance(e, TaskCancelled) else "failed")
        elif isinstance(exc, QueueFull):
            self._defer([g])
        else:
            self._fail(g.step, exc, "could not be queued")

    def _finish(self) -> None:
        """The finish gate's task: every step has succeeded."""
        if self.done:
            return
        self.done = True
        gates = self.gates
        # gates has one more entry than ids: the finish gate, which is no step
        self.result._settle(value={sid: g.value for sid, g in zip(self.plan.ids, gates, strict=False)})

    # -- a full engine -----------------------------------------------------------------------
    def _defer(self, gates: list[Any]) -> None:
        with self.lock:
            self.overflow[:0] = gates
            if self.retry_armed:
                return
            self.retry_armed = True
            delay = self.retry_s
        if not self.done and not self.engine._call_later(delay, self._retry):
            self._fail(gates[0].step, RuntimeError("the engine was shut down"), "could not be queued")

    def _retry(self) -> None:
        """A timer callback of the engine: queue the parked steps that now fit."""
        with self.lock:
            gates, self.overflow = self.overflow, []
            self.retry_armed = False
        for n, g in enumerate(gates):
            if self.done:
                return
            if g.state != 0:  # cancelled meanwhile
                continue
            try:
                queued = g._fire()
            except BaseException as exc:
                self._fail(g.step, exc, "could not be queued")
                return
            if not queued:
                self.retry_s = min(self.retry_s * 2, _RETRY_MAX_S)
                self._defer(gates[n:])
                return
        self.retry_s = _RETRY_FIRST_S

    # -- the end -----------------------------------------------------------------------------
    def _fail(self, j: int, exc: BaseException, how: str) -> None:
        if self.done:
            return
        self.done = True
        plan = self.plan
        step = plan.ids[j] if j < len(plan.ids) else "(the workflow's end)"
        results = {
            plan.ids[i]: g.value
            for i, g in enumerate(self.gates[: len(plan.ids)])
            if g.result is not None and g.result.status.value == _SUCCEEDED
        }
        exc = _without_own_frames(exc, keep=how != "could not be queued")
        detail = f": {type(exc).__name__}: {exc}" if how != "was cancelled" else ""
        err = WorkflowError(
            f"workflow {plan.name!r}: step {step!r} {how}{detail}", workflow=plan.name, step=step, results=results
        )
        err.__cause__ = exc
        self.result._settle(exc=err)

    def _ended(self, result: TaskResult[Any]) -> None:
        """Done-callback of the workflow's own result: however it ended (success, failure, or
        someone's cancel()), stop queueing and, unless it succeeded, cancel the steps that
        have not finished."""
        self.done = True
        self.chain._runs.discard(self)
        status = result.status.value
        if status != _SUCCEEDED:
            # someone's cancel() stops running steps too; a failure lets them finish
            self._cancel_unfinished(running=status == _CANCELLED)
        # The finish gate's task holds self._finish, and the engine's nodes are invisible to
        # the cycle collector: drop the gates here, or run -> gates -> node -> run would leak.
        self.gates = []

    def _cancel_unfinished(self, running: bool) -> None:
        """Cancel the steps not finished: those waiting or queued, and with ``running`` those
        running too (async ones cancelled, isolated ones killed, sync ones asked)."""
        for g in self.gates:
            r = None if running else g.result  # None: the gate has not fired its task yet
            if r is None:
                g.cancel()
            else:
                r._cancel_queued()


_SUCCEEDED = 3  # TaskStatus.SUCCEEDED.value
_CANCELLED = 5  # TaskStatus.CANCELLED.value


def _without_own_frames(exc: BaseException, keep: bool) -> BaseException:
    """exc without the frames of this run in its traceback: the frame that caught it
    (_on_fail, _start, _retry) holds the run and a gate, so the plan, every gate and every
    step's arguments would live as long as anyone holds the workflow's error.

    keep: exc is the step's own error, raised in a worker; its traceback minus the catching
    frame at its head is where the step raised. Otherwise exc was raised while queueing a
    step, by code this run called (its frames lead back to ours through f_back): the
    traceback is kept as text, in a note, and the frames are let go."""
    if not keep:
        seen: set[int] = set()
        e: BaseException | None = exc
        while e is not None and id(e) not in seen:  # its causes were raised in those frames too
            seen.add(id(e))
            if e.__traceback__ is not None:
                e.add_note("".join(traceback.format_tb(e.__traceback__)).rstrip())
                e.with_traceback(None)
            e = e.__cause__ or e.__context__
        return exc
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return exc.with_traceback(tb)


# -- @workflow ---------------------------------------------------------------------------------


class Workflow:
    """A workflow defined by a function (see :func:`workflow`).

    ``build(*args, **kwargs)`` calls the function with a new TaskChain and those arguments
    and returns the chain, validated; ``execute(*args, **kwargs)`` builds and starts it (each
    call builds anew: to run one shape many times, keep ``build()``'s chain and execute it);
    ``on(tasks)`` is the same workflow on another engine. Nothing runs at decoration, so the
    function may use names defined later in its module.
    """

    def __init__(self, name: str, fn: Callable[..., Any], tasks: BackgroundTasks | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"@workflow decorates a function, got {type(fn).__name__} {fn!r}")
        self.name = name
        self.fn = fn
        self.tasks = tasks
        self.__doc__ = getattr(fn, "__doc__", None)
        self.__wrapped__ = fn

    def build(self, *args: Any, **kwargs: Any) -> TaskChain:
        c = TaskChain(self.name, tasks=self.tasks)
        self.fn(c, *args, **kwargs)
        return c.validate()

    def execute(self, *args: Any, **kwargs: Any) -> TaskResult[Any]:
        return self.build(*args, **kwargs).execute()

    def execute_async(self, *args: Any, **kwargs: Any) -> TaskFuture:
        return self.build(*args, **kwargs).execute_async()

    def on(self, tasks: BackgroundTasks) -> Workflow:
        return Workflow(self.name, self.fn, tasks)

    def __repr__(self) -> str:
        return f"<Workflow {self.name!r} ({getattr(self.fn, '__qualname__', self.fn)!r})>"


def workflow(name: str | Callable[..., Any] | None = None, *, tasks: BackgroundTasks | None = None) -> Any:
    """Decorator: ``@workflow("name")`` turns ``def f(wf, *args)``, which declares steps on the
    builder ``wf`` (a TaskChain), into a :class:`Workflow`. ``@workflow`` alone names it after
    the function."""
    if callable(name):
        return Workflow(getattr(name, "__name__", "workflow"), name, tasks)

    def decorate(fn: Callable[..., Any]) -> Workflow:
        return Workflow(name if name is not None else getattr(fn, "__name__", "workflow"), fn, tasks)

    return decorate


# -- Celery-style helpers ---------------------------------------------------------------------


class Call:
    """A call to make later: ``call(func, *args, **kwargs)`` (Celery's "signature")."""

    __slots__ = ("func", "args", "kwargs")

    def __init__(
        self, func: Callable[..., Any], args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> None:
        if not callable(func):
            raise TypeError(f"call() needs a callable first, got {type(func).__name__} {func!r}")
        self.func = func
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})

    def __repr__(self) -> str:
        inner = [getattr(self.func, "__qualname__", repr(self.func))]
        inner += [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"call({', '.join(inner)})"


def call(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Call:
    """The call ``func(*args, **kwargs)``, for chain(), group() and chord()."""
    return Call(func, args, kwargs)


CallLike = Call | tuple[Any, ...] | Callable[..., Any]


def _as_call(c: Any) -> Call:
    if isinstance(c, Call):
        return c
    if isinstance(c, tuple) and c and callable(c[0]):
        return Call(c[0], c[1:])
    if callable(c):
        return Call(c)
    raise TypeError(f"expected call(func, *args, **kwargs), a (func, *args) tuple or a function, got {c!r}")


def chain(*calls: CallLike, name: str = "chain", tasks: BackgroundTasks | None = None) -> TaskChain:
    """Run the calls one after the other; each call after the first gets the previous call's
    value as its first argument. The last value is ``result[c.step_ids[-1]]``."""
    c = TaskChain(name, tasks=tasks)
    prev: Step | None = None
    for x in calls:
        k = _as_call(x)
        args = k.args if prev is None else (prev, *k.args)
        prev = c._add(k.func, args, k.kwargs, None, None)
    return c


class Group(TaskChain):
    """A TaskChain of independent steps, made by :func:`group`; it remembers its calls so a
    :func:`chord` can take it as its header."""

    def __init__(self, calls: Sequence[Call], name: str, tasks: BackgroundTasks | None) -> None:
        super().__init__(name, tasks=tasks)
        self.calls = tuple(calls)
        for k in self.calls:
            self._add(k.func, k.args, k.kwargs, None, None)


def group(*calls: CallLike, name: str = "group", tasks: BackgroundTasks | None = None) -> Group:
    """Run the calls in parallel; the workflow's value has each one's value by step id."""
    return Group([_as_call(x) for x in calls], name, tasks)


def chord(
    header: Group | Iterable[CallLike], callback: CallLike, *, name: str = "chord", tasks: BackgroundTasks | None = None
) -> TaskChain:
    """Run the header's calls in parallel, then ``callback`` with the list of their values
    (in the header's order) as its first argument; its id is ``c.step_ids[-1]``."""
    calls = header.calls if isinstance(header, Group) else tuple(_as_call(x) for x in header)
    if tasks is None and isinstance(header, Group):
        tasks = header.tasks
    c = TaskChain(name, tasks=tasks)
    members = [c._add(k.func, k.args, k.kwargs, None, None) for k in calls]
    cb = _as_call(callback)
    c._add(cb.func, (results_of(*members), *cb.args), cb.kwargs, None, None)
    return c
