"""``catzilla-tasks worker`` and ``catzilla-tasks dead-letters`` (wired into :mod:`catzilla_tasks.cli`).

catzilla-tasks worker MODULE:TASKS [--concurrency N] [--broker URL] [--queues Q[:W],...]
    [--heartbeat S] [--metrics-port P]
catzilla-tasks dead-letters list (--app MODULE:TASKS | --broker URL) [--queue Q] [--count N] [--json]
catzilla-tasks dead-letters redrive (--app MODULE:TASKS | --broker URL) [--queue Q] (--all | ID ...)
catzilla-tasks schedules (--app MODULE:TASKS | --broker URL) [--queue Q] [--json]
catzilla-tasks cancel TASK_ID ... (--app MODULE:TASKS | --broker URL) [--queue Q]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.util
import json
import logging
import os
import stat
import sys
from typing import Any, TextIO

__all__ = ["add_commands", "load_app"]


class UsageError(Exception):
    pass


def load_app(spec: str) -> Any:
    """Import ``module:attribute``.

    The module is looked up on the path as it is (installed packages, ``PYTHONPATH``); only
    when its top-level package is not found there is the current directory *appended* to
    ``sys.path``, after the standard library and the installed packages, so a file in the
    directory the worker starts from can never shadow a module imported later (``json.py``,
    ``redis.py``...). A directory other users may add files to (``/tmp``) is not added at all:
    a file there could stand for a module that is not installed. To import from a directory
    first, or from such a directory, set ``PYTHONPATH`` explicitly.
    """
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise UsageError(f"expected MODULE:TASKS (e.g. myapp.jobs:tasks), got {spec!r}")
    _add_cwd_if_needed(mod_name)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {mod_name!r}: {exc}") from None
    obj = mod
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"module {mod_name!r} has no attribute {attr!r}") from None
    return obj


def _add_cwd_if_needed(mod_name: str) -> None:
    top = mod_name.partition(".")[0]
    try:
        found = importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        found = False
    cwd = os.getcwd()
    if not found and cwd not in sys.path and "" not in sys.path:
        why = _others_add_files(cwd)
        if why:
            raise UsageError(
                f"{mod_name!r} is not installed, and the current directory is not put on the import path: {why}, "
                "so any module imported later that is not installed (an optional dependency) could be theirs. "
                f"Start the worker elsewhere, or name the directory explicitly: PYTHONPATH={cwd}"
            )
        sys.path.append(cwd)  # last: it adds the app's modules, it replaces none
        importlib.invalidate_caches()


def _others_add_files(d: str) -> str | None:
    """Why other users may create files in d while the app's own files stay out of their reach
    (a world-writable or a sticky group-writable directory: /tmp), else None. (Where they can
    also replace the app's files, a group-writable directory without the sticky bit, the path
    gives them nothing more.)"""
    try:
        st = os.stat(d)
    except OSError:
        return None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o002 or (mode & 0o020 and mode & stat.S_ISVTX):
        who = "every user" if mode & 0o002 else "its group"
        return f"{d} (mode {mode:o}) lets {who} add files"
    return None


def _broker(args: argparse.Namespace) -> Any:
    from .redis import RedisBroker

    if args.broker:
        kw = {"queue": args.queue} if args.queue else {}
        if args.prefix:
            kw["prefix"] = args.prefix
        return RedisBroker(args.broker, **kw)
    if not args.app:
        raise UsageError("give --app MODULE:TASKS (an engine created with broker=...) or --broker URL")
    tasks = load_app(args.app)
    broker = getattr(tasks, "broker", None)
    if not isinstance(broker, RedisBroker):
        raise UsageError(f"{args.app} has no Redis broker: create it with BackgroundTasks(broker='redis://...')")
    if args.queue and args.queue != broker.queue:
        broker = RedisBroker(
            broker.url,
            queue=args.queue,
            prefix=broker.prefix,
            serializer=broker.serializer.name,
            allow_pickle=broker.serializer.allow_pickle,
        )
    return broker


def cmd_worker(args: argparse.Namespace, out: TextIO) -> int:
    from .._redact import redact_url
    from ..engine import BackgroundTasks
    from .producer import DistributedTasks
    from .redis import RedisBroker
    from .worker import Worker

    if not (args.heartbeat == 0 or 0.01 <= args.heartbeat <= 3600):
        raise UsageError(f"--heartbeat: must be 0 (off) or from 0.01 to 3600 seconds, got {args.heartbeat!r}")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise UsageError(f"--metrics-port: must be between 0 and 65535, got {args.metrics_port}")
    if args.metrics_port is not None and args.heartbeat == 0:
        raise UsageError("--metrics-port needs the figures the heartbeat keeps: not with --heartbeat 0")
    tasks = load_app(args.app)
    if not isinstance(tasks, BackgroundTasks):
        raise UsageError(f"{args.app} is a {type(tasks).__name__}, not a BackgroundTasks engine")
    # --broker: the app's engine runs the tasks of that broker (the engine object itself is left
    # as it is: a task calling its add_task runs the call locally unless the app has a broker);
    # its periodic tasks are declared on a producer of that broker (cluster-wide schedules)
    b = RedisBroker(args.broker) if args.broker else getattr(tasks, "broker", None)
    if not isinstance(b, RedisBroker):
        raise UsageError(
            f"{args.app} has no broker: create it with BackgroundTasks(broker='redis://...') or pass --broker URL"
        )
    producer = None
    if args.broker and any(not p.cancelled for p in tasks.periodic_tasks):
        producer = DistributedTasks(workers=1, broker=b)
        producer.take_over_periodic(tasks)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    heartbeat = args.heartbeat or None
    queues = None
    if getattr(args, "queues", None):
        from .routing import MultiQueueWorker, parse_queues

        try:
            queues = parse_queues(args.queues)
            if len(queues) > 1 or next(iter(queues)) != b.queue:
                w: Any = MultiQueueWorker(
                    tasks, queues, broker=b, concurrency=args.concurrency, heartbeat_interval=heartbeat
                )
            else:
                queues = None
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if queues is None:
        w = Worker(tasks, b, concurrency=args.concurrency, heartbeat_interval=heartbeat)
    if args.metrics_port is not None:  # the worker's own figures for Prometheus, and its engine's
        from .. import prometheus

        collectors = prometheus.WorkerCollector(w), prometheus.TasksCollector(w.tasks)
        server, _ = prometheus.serve(*collectors, host=args.metrics_host, port=args.metrics_port)
        print(f"metrics on http://{args.metrics_host}:{server.server_port}/metrics", file=out, flush=True)
    print(
        f"catzilla-tasks worker {w.consumer}: {len(tasks.registered_tasks)} task(s), "
        + (
            f"queue {b.queue!r}"
            if queues is None
            else "queues " + ", ".join(f"{q!r} ({x.concurrency})" for q, x in w.workers.items())
        )
        + f" on {redact_url(b.url)}, concurrency {w.concurrency}",
        file=out,
        flush=True,
    )
    w.run(install_signals=True)
    if producer is not None:
        producer.shutdown(wait_for_completion=True)
    tasks.shutdown(wait_for_completion=True)
    s = w.stats()
    print(
        f"worker stopped: {s['succeeded']} succeeded, {s['failed']} failed, {s['retried']} retried, "
        f"{s['dead_lettered']} dead-lettered",
        file=out,
        flush=True,
    )
    return 0


def cmd_dead_list(args: argparse.Namespace, out: TextIO) -> int:
    broker = _broker(args)
    items = broker.dead_letters(count=args.count)
    total = broker.dead_letter_count()
    if args.json:
        for it in items:
            it = dict(it)
            it.pop("payload")
            print(json.dumps(it), file=out)
        return 0
    print(
        f"{total} dead-lettered task(s) in queue {broker.queue!r}"
        + (f", showing {len(items)}" if total > len(items) else ""),
        file=out,
    )
    for it in items:
        when = _dt.datetime.fromtimestamp(it["at"]).strftime("%Y-%m-%d %H:%M:%S")
        first = it["error"].splitlines()[0] if it["error"] else ""
        print(
            f"{it['id']}  {when}  {it['priority']:<8} {it['name'] or '?'} [{it['task_id'] or '?'}]  {first}", file=out
        )
    return 0


def cmd_dead_redrive(args: argparse.Namespace, out: TextIO) -> int:
    if not args.all and not args.ids:
        raise UsageError("redrive: give the dead letters' ids (from `dead-letters list`) or --all")
    if args.all and args.ids:
        raise UsageError("redrive: give ids or --all, not both")
    broker = _broker(args)
    n = broker.redrive(None if args.all else args.ids)
    print(f"re-driven: {n} task(s) back in queue {broker.queue!r}", file=out)
    return 0 if (args.all or n == len(set(args.ids))) else 1


def _when(t: float | None) -> str:
    return _dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if t is not None else "-"


def cmd_schedules(args: argparse.Namespace, out: TextIO) -> int:
    from . import schedules

    schedules._declaring = False  # importing the app must not make this command a declarer
    try:
        broker = _broker(args)
    finally:
        schedules._declaring = True
    items = schedules.list_schedules(broker)
    if args.json:
        for it in items:
            print(json.dumps(it), file=out)
        return 0
    print(f"{len(items)} schedule(s) in queue {broker.queue!r}", file=out)
    for it in items:
        print(
            f"{it['name']}  {it['spec']}  last {_when(it['last_run'])}  next {_when(it['next_run'])}  "
            f"runs {it['runs']}  skipped {it['skipped']}  missed {it['missed']}  "
            f"declarers {len(it['declarers'])}" + (f"  running {it['running']}" if it["running"] else ""),
            file=out,
        )
    return 0


def cmd_cancel(args: argparse.Namespace, out: TextIO) -> int:
    from . import schedules

    schedules._declaring = False
    try:
        broker = _broker(args)
    finally:
        schedules._declaring = True
    ok = True
    for task_id in args.task_ids:
        try:
            done = broker.cancel(task_id)
        except ValueError as exc:  # not an id that can be cancelled (a workflow step's, say)
            raise UsageError(str(exc)) from None
        if done:
            print(f"{task_id}: cancelled", file=out)
        else:
            print(f"{task_id}: not cancelled (it had already ended, or was cancelled before)", file=out)
            ok = False
    return 0 if ok else 1


def _run(func: Any) -> Any:
    def wrapped(args: argparse.Namespace, out: TextIO) -> int:
        try:
            return func(args, out)
        except UsageError as exc:
            print(f"catzilla-tasks {args.command}: {exc}", file=sys.stderr)
            return 2
        except ImportError as exc:
            print(f"catzilla-tasks {args.command}: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:
            if type(exc).__module__.startswith("redis"):
                print(f"catzilla-tasks {args.command}: redis: {exc}", file=sys.stderr)
                return 1
            raise

    return wrapped


def _broker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--app", metavar="MODULE:TASKS", help="the engine (created with broker=...) whose queue to use")
    p.add_argument("--broker", metavar="URL", help="redis://... instead of MODULE:TASKS")
    p.add_argument("--queue", help="queue name (default: the engine's, or 'default')")
    p.add_argument("--prefix", help="with --broker: the key prefix (default: 'catzilla')")


def add_commands(sub: Any) -> None:
    """Add ``worker``, ``dead-letters``, ``schedules`` and ``cancel`` to the CLI's subparsers."""
    p = sub.add_parser(
        "worker",
        help="run tasks from Redis on a local engine (distributed mode)",
        description="Run the tasks of MODULE:TASKS (a BackgroundTasks created with broker=...) "
        "from Redis. SIGTERM or Ctrl-C: stop fetching, finish and acknowledge "
        "what is in flight, exit.",
    )
    p.add_argument("app", metavar="MODULE:TASKS", help="e.g. myapp.jobs:tasks")
    p.add_argument(
        "--concurrency",
        "-c",
        type=int,
        default=16,
        help="most tasks held at once (fetched, not yet acknowledged); default 16",
    )
    p.add_argument("--broker", metavar="URL", help="redis://... to use instead of the engine's own broker")
    p.add_argument(
        "--queues",
        metavar="Q[:W],...",
        help="named queues to consume, e.g. emails,default or emails:1,default:3 (each gets its share of "
        "--concurrency by weight W, default 1; default: the broker's own queue)",
    )
    p.add_argument(
        "--heartbeat",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="seconds between the worker's beats in the cluster registry (default 2; 0: not registered, "
        "no figures kept)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve this worker's Prometheus metrics on http://HOST:PORT/metrics (default: not served; "
        "needs prometheus-client)",
    )
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of --metrics-port (default 127.0.0.1)")
    p.set_defaults(func=_run(cmd_worker))

    dl = sub.add_parser(
        "dead-letters",
        help="list or re-drive tasks in the dead-letter stream",
        description="Tasks that exhausted their retries, or could not be decoded or found.",
    )
    dsub = dl.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = dsub.add_parser("list", help="list dead-lettered tasks with their errors")
    _broker_args(p)
    p.add_argument("--count", type=int, default=100, help="most to show (default 100)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_run(cmd_dead_list))
    p = dsub.add_parser("redrive", help="put dead-lettered tasks back in their queue (fresh retries)")
    _broker_args(p)
    p.add_argument("ids", nargs="*", metavar="ID", default=[], help="dead-letter ids from `list`")
    p.add_argument("--all", action="store_true", help="re-drive every dead letter")
    p.set_defaults(func=_run(cmd_dead_redrive))

    p = sub.add_parser(
        "schedules",
        help="list the cluster-wide periodic tasks of a queue with their last and next run",
        description="The periodic tasks declared on a Redis engine (@tasks.periodic): spec, last and next "
        "run, counts of runs, skipped and missed ticks, and the processes declaring each now.",
    )
    _broker_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_run(cmd_schedules))

    p = sub.add_parser(
        "cancel",
        help="cancel remote tasks by id",
        description="Cancel tasks published to Redis: a queued or delayed one never runs, a running one is "
        "asked to stop (current_task().cancel_requested; an async task is cancelled); waiters get "
        "TaskCancelled. Exit status 1 if one of them had already ended.",
    )
    p.add_argument("task_ids", nargs="+", metavar="TASK_ID")
    _broker_args(p)
    p.set_defaults(func=_run(cmd_cancel))
