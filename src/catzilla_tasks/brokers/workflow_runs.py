"""Workflow runs on the workers: the broker-side part of distributed workflows, in one place.

A workflow run (``TaskChain.execute()`` on a producer: ``Broker.run_workflow``) is stored by
the broker: every step's message, dependency counters and dependents, and the steps without
dependencies queued. Each step message carries ``w`` = [run id, step index, step id, workflow
name] and ``f`` = the arguments it takes from earlier steps ([argument position or keyword,
step index or list of indexes]) in its options (:mod:`.protocol`). A worker, through its
:class:`~.base.ConsumerSession`:

* before running fetched steps (:func:`prepare_steps`): reads each run's state and the values
  the step takes (``session.step_inputs``); a step of a run that ended is acknowledged unrun,
  the others get those values filled into their arguments;
* commits a step that succeeded as ``STEP_DONE`` (its value stored, the dependents whose
  dependencies are all done released, in the same commit: the producer may have exited), and
  one that failed for good as ``RUN_FAILED`` with the record :func:`failed_record` builds (the
  run ends with WorkflowError naming the step; steps not released never run).
"""

from __future__ import annotations

from typing import Any, cast

from ..config import TaskConfig
from ..errors import WorkflowError, wire_name
from .base import ConsumerSession, Outcome
from .protocol import (
    CONFIG_ATTR,
    DEFAULT_CONFIG,
    MSG_ARGS,
    MSG_KWARGS,
    MSG_OPTIONS,
    OPT_FILLS,
    OPT_WORKFLOW,
    message,
    task_name,
)
from .serialization import DecodeError, Serializer

__all__ = ["StepMessage", "done_op", "encode_steps", "failed_ops", "prepare_steps", "step_of", "step_sources"]


# -- the producer side: a plan as the broker stores it -------------------------------------------
class StepMessage:
    """One step of a run as a broker stores it: ``payload`` (its encoded message, options ``w``
    and ``f`` included), ``priority``, ``pending`` (dependencies not yet done), ``dependents``
    (indexes of the steps waiting for it), ``step_id`` and ``delay_ms`` (0: none)."""

    __slots__ = ("delay_ms", "dependents", "payload", "pending", "priority", "step_id")

    def __init__(
        self, payload: bytes, priority: int, pending: int, dependents: list[int], step_id: str, delay_ms: int
    ) -> None:
        self.payload = payload
        self.priority = priority
        self.pending = pending
        self.dependents = dependents
        self.step_id = step_id
        self.delay_ms = delay_ms


def encode_steps(plan: Any, run_id: str, ser: Serializer) -> list[StepMessage]:
    """The messages of a validated plan (``workflows._Plan``) for run ``run_id``: what
    ``Broker.run_workflow`` stores (the steps with ``pending == 0`` queued at once). A step's
    arguments taken from earlier steps are None in its message, filled in by the worker
    (:func:`prepare_steps`). A function that cannot travel raises TypeError naming the step."""
    n = len(plan.ids)
    out = []
    for j in range(n):
        func = plan.funcs[j]
        sid = plan.ids[j]
        try:
            name = task_name(func)
        except TypeError as exc:
            raise TypeError(f"workflow {plan.name!r}, step {sid!r}: {exc}") from None
        values = plan.values[j]
        kwnames = plan.kwnames[j] or ()
        nargs = len(values) - len(kwnames)
        args = list(values[:nargs])
        kwargs = dict(zip(kwnames, values[nargs:], strict=True))
        fills = []
        for idx, src in plan.fills[j] or ():
            where: Any = idx if idx < nargs else kwnames[idx - nargs]
            if isinstance(where, int):
                args[where] = None
            else:
                kwargs[where] = None
            fills.append([where, list(src) if isinstance(src, tuple) else src])
        cfg = getattr(func, CONFIG_ATTR, None)
        if not isinstance(cfg, TaskConfig):
            cfg = DEFAULT_CONFIG
        opts: dict[str, Any] = {OPT_WORKFLOW: [run_id, j, sid, plan.name]}
        if fills:
            opts[OPT_FILLS] = fills
        try:
            payload = ser.dumps(message(f"{run_id}.{j}", name, args, kwargs, opts))
        except TypeError as exc:
            raise TypeError(f"workflow {plan.name!r}, step {sid!r}: {exc}") from None
        delay = int(cfg.delay_ms) if cfg.delay_ms > 0 else 0
        deps = [d for d in plan.dependents[j] if d < n]
        out.append(StepMessage(payload, int(cfg.priority), plan.pending[j], deps, sid, delay))
    return out


# -- the worker side -------------------------------------------------------------------------


def step_sources(opts: dict) -> list[int] | str:
    """The earlier steps whose values a step message takes, in order, or what is wrong with its
    options (a string)."""
    wf = opts.get(OPT_WORKFLOW)
    fills = opts.get(OPT_FILLS) or []
    if not (isinstance(wf, list) and len(wf) == 4):
        return "'w' is not [run, index, step, name]"
    if not isinstance(fills, list):
        return "'f' is not a list"
    srcs: list[int] = []
    for fill in fills:
        if not (isinstance(fill, list) and len(fill) == 2 and isinstance(fill[0], (int, str))):
            return "an item of 'f' is not [position, source]"
        src = fill[1]
        for x in src if isinstance(src, list) else [src]:
            if isinstance(x, bool) or not isinstance(x, int):
                return "a source in 'f' is not a step index"
            srcs.append(x)
    return list(dict.fromkeys(srcs))


def step_of(msg: Any) -> list | None:
    """The ``w`` option of a decoded message if it is a well-formed workflow step, else None."""
    opts = msg[MSG_OPTIONS] if msg and len(msg) > MSG_OPTIONS and isinstance(msg[MSG_OPTIONS], dict) else None
    wf = opts.get(OPT_WORKFLOW) if opts else None
    return wf if isinstance(wf, list) and len(wf) == 4 else None


def prepare_steps(session: ConsumerSession, serializer: Serializer, steps: list[Any]) -> None:
    """Fetched workflow steps (worker jobs: ``msg``, ``wf``, ``error``, ``skip``, ``first``,
    ``call``): skip those whose run already ended (a step failed), and fill in the values of
    earlier steps that a step takes (one ``step_inputs`` call). A step whose options or stored
    values are not what they should be gets an ``error``; a connection error propagates (every
    step is left to the caller)."""
    wanted = []
    for j in steps:
        srcs = step_sources(j.msg[MSG_OPTIONS])
        if isinstance(srcs, str):
            j.error = f"DecodeError: bad workflow step options ({srcs}): {j.msg[MSG_OPTIONS]!r:.200}"
            continue
        j.wf = wf = j.msg[MSG_OPTIONS][OPT_WORKFLOW]
        wanted.append((j, wf, srcs))
    if not wanted:
        return
    replies = session.step_inputs([(str(wf[0]), srcs) for _, wf, srcs in wanted])
    for (j, wf, srcs), reply in zip(wanted, replies, strict=True):
        if isinstance(reply, BaseException):  # e.g. the run's key is not a hash
            j.error = f"LookupError: workflow step {wf[2]!r}: cannot read its run: {reply}"
            continue
        running, vals = reply
        if not running:
            j.skip = True  # the run failed (or is gone): acknowledged, not run
            j.first = ""
            continue
        try:
            _fill_step(serializer, j, dict(zip(srcs, vals, strict=True)))
        except Exception as exc:  # anything else odd about this one step
            j.error = f"DecodeError: workflow step {wf[2]!r}: {exc}"


def _fill_step(serializer: Serializer, j: Any, raw: dict[int, bytes | None]) -> None:
    fills = j.msg[MSG_OPTIONS].get(OPT_FILLS) or []
    if not fills:
        return
    wf = cast("list[Any]", j.wf)
    got = {}
    for s_, v in raw.items():
        if v is None:
            j.error = f"LookupError: workflow step {wf[2]!r}: the value of step {s_} is not in the broker"
            return
        try:
            got[s_] = serializer.loads(v)
        except DecodeError as exc:
            j.error = f"DecodeError: workflow step {wf[2]!r}: the value of step {s_}: {exc}"
            return
    args = list(j.msg[MSG_ARGS])
    kwargs = dict(j.msg[MSG_KWARGS])
    for where, src in fills:
        value = [got[x] for x in src] if isinstance(src, list) else got[src]
        if isinstance(where, int) and 0 <= where < len(args):
            args[where] = value
        elif isinstance(where, str):
            kwargs[where] = value
        else:
            j.error = f"DecodeError: workflow step {wf[2]!r}: bad argument position {where!r}"
            return
    j.call = (tuple(args), kwargs)


def done_op(wf: list, value: bytes) -> tuple:
    """The commit operation of a step that succeeded with the encoded ``value``."""
    return (Outcome.STEP_DONE, str(wf[0]), wf[1], value)


def failed_ops(ser: Serializer, wf: list, cause: list) -> tuple:
    """The commit operation of a step that failed for good with ``cause`` ([type name, message,
    traceback]): the run fails with WorkflowError naming it (first failure only)."""
    run_id, _, step, name = (str(x) for x in wf)
    message = f"workflow {name!r}: step {step!r} failed: {cause[0]}: {cause[1]}"
    rec = ser.dumps(
        [
            1,
            [
                wire_name(WorkflowError),
                message,
                cause[2] if len(cause) > 2 else "",
                {"workflow": name, "step": step, "cause": cause},
            ],
        ]
    )
    return (Outcome.RUN_FAILED, run_id, rec)
