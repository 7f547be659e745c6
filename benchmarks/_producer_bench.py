"""The producer path on one local Redis: one publish per call, from many threads or coroutines.

    python benchmarks/_producer_bench.py [--quick] [--runs N] [--contenders ours,arq,taskiq,celery,huey]

What a web app does: one ``add_task`` per request, from many threads (a WSGI server, a thread
pool) or coroutines (an ASGI server) at once. For each contender and each concurrency, ``N``
no-op tasks (10,000; 2,000 with ``--quick``) are published by a fresh producer process split
over C threads or coroutines, each call waiting for its own publish (no batching by the caller):

* ours: ``add_task`` from 1, 8, 32 and 128 threads; ``add_task_async`` from 1, 100 and 1,000
  coroutines (group commit shares round trips among concurrent callers); ``batch()`` from one
  thread for reference (the caller batches);
* arq ``enqueue_job`` and taskiq ``kiq`` from 1, 100 and 1,000 coroutines;
* the coroutine rows again on uvloop (100 and 1,000 coroutines; when the ``uvloop`` extra is
  installed), the loop uvicorn runs on when it can;
* Celery ``delay()`` and Huey's call from 1, 8, 32 and 128 threads.

**publish/s**: N / (time from the start until the last call returned). **end to end/s**:
N / (time from the start until the library's worker, one process in its fast configuration
from ``_redis_bench.py``, ran the N-th task). One worker per contender and run serves all its
concurrencies in turn; contenders alternate run by run; medians of ``--runs``.

**lone caller latency** (no worker running): one thread calling ``add_task`` back to back,
p50 and p99 per call, beside today's path as it was before group commit (the same encoding,
then one ``XADD`` through the client: what ``RedisBroker.submit`` did), interleaved in blocks
of 500 in one process; and one coroutine calling ``add_task_async``.

**coordination ceiling** (no worker, no Redis, no encoding): what the group commit's own
hand-offs allow, beside ``threading.Condition.notify_all`` (see ``child_ceiling``). Threads
waking from a lock each take the GIL back in turn; that hand-off, not Redis, bounds the thread
rows.

The Redis server is started here (free port, no persistence). Prints a table, then one JSON line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

THREADS = (1, 8, 32, 128)
COROUTINES = (1, 100, 1000)
UVLOOP = (100, 1000)  # the same coroutines on uvloop (uvicorn's loop when it is installed)
# contender -> [(mode, concurrency)]
PLAN = {
    "ours": [("threads", c) for c in THREADS]
    + [("coroutines", c) for c in COROUTINES]
    + [("uvloop", c) for c in UVLOOP]
    + [("batch", 1)],
    "arq": [("coroutines", c) for c in COROUTINES] + [("uvloop", c) for c in UVLOOP],
    "taskiq": [("coroutines", c) for c in COROUTINES] + [("uvloop", c) for c in UVLOOP],
    "celery": [("threads", c) for c in THREADS],
    "huey": [("threads", c) for c in THREADS],
}
CALL = {
    ("ours", "threads"): "add_task",
    ("ours", "coroutines"): "add_task_async",
    ("ours", "uvloop"): "add_task_async",
    ("arq", "uvloop"): "enqueue_job",
    ("taskiq", "uvloop"): "kiq",
    ("ours", "batch"): "add_task in batch()",
    ("arq", "coroutines"): "enqueue_job",
    ("taskiq", "coroutines"): "kiq",
    ("celery", "threads"): "delay",
    ("huey", "threads"): "call",
}


# ----------------------------------------------------------------------------- the producer (child)

def _split(n: int, c: int) -> list[int]:
    return [n // c + (1 if i < n % c else 0) for i in range(c)]


def child_threads(lib: str, n: int, c: int) -> dict:
    import threading

    import _redis_bench as m

    if lib == "ours":
        call = lambda: m.tasks.add_task(m.noop)  # noqa: E731
        call_warm = lambda: m.tasks.add_task(m.ping)  # noqa: E731
    elif lib == "celery":
        call = m.noop.delay
        call_warm = m.ping.delay
    elif lib == "huey":
        call = m.noop
        call_warm = m.ping
        # its pool refuses more than 100 connections (MaxConnectionsError): room for every thread
        pool = m.huey.storage.pool
        pool.max_connections = max(pool.max_connections, c)
    else:
        raise SystemExit(f"{lib}: no thread producer")
    call_warm()  # connections made, modules loaded: not timed
    go = threading.Event()
    ends: list[float] = []
    failed: list[BaseException] = []

    def work(k: int) -> None:
        go.wait()
        try:
            for _ in range(k):
                call()
        except BaseException as exc:  # a lost call would leave the worker short of N: say so
            failed.append(exc)
        ends.append(time.time())

    ts = [threading.Thread(target=work, args=(k,)) for k in _split(n, c)]
    for t in ts:
        t.start()
    t0 = time.time()
    go.set()
    for t in ts:
        t.join()
    if failed:
        raise SystemExit(f"{len(failed)} of {c} threads failed: {failed[0]!r}")
    return {"t0": t0, "published": max(ends)}


def child_batch(lib: str, n: int) -> dict:
    import _redis_bench as m

    m.tasks.add_task(m.ping)
    t0 = time.time()
    for i in range(0, n, 1000):
        with m.tasks.batch():
            for _ in range(min(1000, n - i)):
                m.tasks.add_task(m.noop)
    return {"t0": t0, "published": time.time()}


def child_coroutines(lib: str, n: int, c: int, loop: str = "asyncio") -> dict:
    import asyncio

    import _redis_bench as m

    async def main() -> dict:
        closing = None
        if lib == "ours":
            async def call() -> None:
                await m.tasks.add_task_async(m.noop)

            await m.tasks.add_task_async(m.ping)
        elif lib == "arq":
            from arq import create_pool
            from arq.connections import RedisSettings

            pool = await create_pool(RedisSettings.from_dsn(m.URL))
            # its client's pool refuses more connections than its max (MaxConnectionsError):
            # room for one per coroutine, the most it can use
            cp = pool.connection_pool
            cp.max_connections = max(cp.max_connections, c)

            async def call() -> None:
                await pool.enqueue_job("noop")

            await pool.enqueue_job("ping")
            closing = pool.aclose
        elif lib == "taskiq":
            await m.taskiq_broker.startup()

            async def call() -> None:
                await m.noop.kiq()

            await m.ping.kiq()
            closing = m.taskiq_broker.shutdown
        else:
            raise SystemExit(f"{lib}: no coroutine producer")
        ends: list[float] = []

        async def work(k: int) -> None:
            for _ in range(k):
                await call()
            ends.append(time.time())

        t0 = time.time()
        await asyncio.gather(*(work(k) for k in _split(n, c)))
        out = {"t0": t0, "published": max(ends)}
        if closing is not None:
            await closing()
        return out

    if loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main())
    return asyncio.run(main())


def child_ceiling(n: int) -> dict:
    """What the coordination itself allows, with no Redis and no encoding: ``n`` calls of
    ``GroupCommit.publish`` from 32 and 128 threads whose flush is a 50 us stand-in round trip
    (``time.sleep``, which lets go of the GIL as a socket read does); the same threads
    woken by Python's own ``threading.Condition.notify_all`` every 50 us (no group commit code at
    all); and ``AsyncGroupCommit`` from 1,000 coroutines with a flush that yields once. Rates
    per second, start to last return, as in the rows above."""
    import asyncio
    import threading

    from catzilla_tasks.brokers.group_commit import AsyncGroupCommit, GroupCommit

    def threads(c: int, one_call: Callable[[], None]) -> float:
        go = threading.Event()
        ends: list[float] = []

        def work(k: int) -> None:
            go.wait()
            for _ in range(k):
                one_call()
            ends.append(time.perf_counter())

        ts = [threading.Thread(target=work, args=(k,)) for k in _split(n, c)]
        for t in ts:
            t.start()
        t0 = time.perf_counter()
        go.set()
        for t in ts:
            t.join()
        return n / (max(ends) - t0)

    out: dict[str, float] = {}
    for c in (32, 128):
        gc = GroupCommit(lambda items: None, lambda token: time.sleep(50e-6))
        out[f"group_commit_threads:{c}"] = threads(c, lambda gc=gc: gc.publish(None))

    cond = threading.Condition()
    tick = [0]
    stop = threading.Event()

    def ticker() -> None:
        while not stop.is_set():
            time.sleep(50e-6)
            with cond:
                tick[0] += 1
                cond.notify_all()

    def wait_tick() -> None:
        with cond:
            seen = tick[0]
            while tick[0] == seen:
                cond.wait()

    tk = threading.Thread(target=ticker)
    tk.start()
    try:
        out["condition_threads:32"] = threads(32, wait_tick)
    finally:
        stop.set()
        tk.join()

    async def coroutines(c: int) -> float:
        async def send(items: list) -> None:
            await asyncio.sleep(0)

        agc = AsyncGroupCommit(send)
        ends: list[float] = []

        async def work(k: int) -> None:
            for _ in range(k):
                await agc.publish(None)
            ends.append(time.perf_counter())

        t0 = time.perf_counter()
        await asyncio.gather(*(work(k) for k in _split(n, c)))
        return n / (max(ends) - t0)

    out["group_commit_coroutines:1000"] = asyncio.run(coroutines(1000))
    return out


def child_latency(lib: str, n: int) -> dict:
    """ours only: per-call latency of add_task, of today's path (encode + one XADD through the
    client, what submit did before group commit), and of add_task_async."""
    import asyncio

    import _redis_bench as m
    from catzilla_tasks.brokers.redis import RemoteResult

    tasks, broker = m.tasks, m.tasks.broker

    def old_path() -> None:  # RedisBroker.submit before group commit
        tid, (prio, delay_ms, payload), _queue = broker._prepare(m.noop, (), {}, None, None)
        broker.redis.xadd(broker.streams[prio], {"m": payload})
        RemoteResult(tid, broker)

    new_path = lambda: tasks.add_task(m.noop)  # noqa: E731
    pc = time.perf_counter
    lat: dict[str, list[float]] = {"add_task": [], "before": [], "add_task_async": []}
    for f in (new_path, old_path):
        for _ in range(200):
            f()
    for block in range(max(1, n // 500)):
        for name, f in (("add_task", new_path), ("before", old_path)) if block % 2 == 0 else (
                ("before", old_path), ("add_task", new_path)):
            out = lat[name]
            for _ in range(500):
                a = pc()
                f()
                out.append(pc() - a)

    async def coro() -> None:
        for _ in range(200):
            await tasks.add_task_async(m.noop)
        out = lat["add_task_async"]
        for _ in range(max(500, n // 2)):
            a = pc()
            await tasks.add_task_async(m.noop)
            out.append(pc() - a)

    asyncio.run(coro())

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e6

    return {k: {"p50_us": pct(v, 0.5), "p99_us": pct(v, 0.99), "calls": len(v)} for k, v in lat.items()}


# ----------------------------------------------------------------------------- the runner

def run_child(lib: str, url: str, n: int, mode: str, c: int) -> dict:
    import subprocess

    import _redis_bench as rb

    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", lib, mode, str(c), str(n)],
                         env=rb.env_for(lib, url, n), cwd=HERE, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{lib} {mode} x{c} producer failed: {out.stderr.strip().splitlines()[-3:]}")
    return json.loads(lines[-1])


def one_run(lib: str, url: str, n: int, r) -> dict:
    """One worker of ``lib``; each of its (mode, concurrency) in turn: publish and end-to-end rates."""
    import subprocess
    import tempfile

    import _redis_bench as rb

    r.flushall()
    cmd = [x.replace("{url}", url) for x in rb.CONTENDERS[lib][0]]
    log = tempfile.TemporaryFile()
    w = subprocess.Popen(cmd, env=rb.env_for(lib, url, n), cwd=HERE, stdout=log, stderr=subprocess.STDOUT)
    out = {}
    try:
        rb.run_producer(lib, url, 1, ping=True)
        if not r.blpop(rb.READY_KEY, timeout=60):
            log.seek(0)
            raise RuntimeError(f"{lib} worker not ready in 60 s: {log.read().decode(errors='replace')[-300:]}")
        for mode, c in PLAN[lib]:
            if mode == "uvloop" and importlib.util.find_spec("uvloop") is None:
                continue  # (the [uvloop] extra: these rows are left out)
            r.delete(rb.DONE_KEY)
            res = run_child(lib, url, n, mode, c)
            got = r.blpop(rb.DONE_KEY, timeout=300)
            if not got:
                raise RuntimeError(f"{lib} {mode} x{c}: {n} tasks not done in 300 s")
            out[f"{mode}:{c}"] = {"publish_per_s": n / (res["published"] - res["t0"]),
                                  "end_to_end_per_s": n / (float(got[1]) - res["t0"])}
            r.delete(rb.READY_KEY)
    finally:
        w.terminate()
        try:
            w.wait(30)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()
        log.close()
    return out




def main() -> None:
    import argparse
    import platform
    import shutil
    import statistics
    import subprocess
    import tempfile

    import _redis_bench as rb

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2,000 tasks per measurement instead of 10,000")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--contenders", default=",".join(PLAN))
    a = p.parse_args()
    n = 2_000 if a.quick else 10_000
    libs = [c for c in a.contenders.split(",") if c]
    bad = [c for c in libs if c not in PLAN]
    if bad:
        p.error(f"unknown contenders {bad}; known: {', '.join(PLAN)}")
    import redis

    rb.compile_bytecode()
    exe = shutil.which("redis-server")
    if exe is None:
        sys.exit("redis-server is not installed")
    d = tempfile.mkdtemp(prefix="bench-redis-")
    port = rb.free_port()
    srv = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", d, "--save", "",
                            "--appendonly", "no"], env=rb.env_for("", "", 0), stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    r = redis.Redis.from_url(url, socket_timeout=None)
    for _ in range(500):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    raw: dict[str, list[dict]] = {c: [] for c in libs}
    latency: list[dict] = []
    ceiling: list[dict] = []
    errors: dict[str, str] = {}
    try:
        for run in range(a.runs):
            if "ours" in libs and "ours" not in errors:
                r.flushall()
                try:
                    latency.append(run_child("ours", url, n, "latency", 1))
                except Exception as exc:
                    errors["ours latency"] = f"{type(exc).__name__}: {exc}"
                try:
                    ceiling.append(run_child("ours", url, n, "ceiling", 1))
                except Exception as exc:
                    errors["ours ceiling"] = f"{type(exc).__name__}: {exc}"
            for lib in libs:
                if lib in errors:
                    continue
                why = rb.available(lib)
                if why:
                    errors[lib] = f"not installed: {why}"
                    continue
                t = time.perf_counter()
                try:
                    res = one_run(lib, url, n, r)
                except Exception as exc:
                    errors[lib] = f"{type(exc).__name__}: {exc}"
                    sys.stderr.write(f"[run {run + 1}/{a.runs}] {lib:<7} FAILED {errors[lib]}\n")
                    continue
                raw[lib].append(res)
                sys.stderr.write(f"[run {run + 1}/{a.runs}] {lib:<7} {time.perf_counter() - t:6.1f}s  " + "  ".join(
                    f"{k} {v['publish_per_s']:.0f}/{v['end_to_end_per_s']:.0f}" for k, v in res.items()) + "\n")
    finally:
        srv.terminate()
        srv.wait()
        shutil.rmtree(d, ignore_errors=True)

    def med(vals: list[float]) -> float | None:
        return statistics.median(vals) if vals else None

    summary: dict[str, dict[str, dict[str, float | None]]] = {}
    for lib in libs:
        for mode, c in PLAN[lib]:
            key = f"{mode}:{c}"
            runs = [x[key] for x in raw[lib] if key in x]
            if runs:
                summary.setdefault(lib, {})[key] = {
                    "publish_per_s": med([x["publish_per_s"] for x in runs]),
                    "end_to_end_per_s": med([x["end_to_end_per_s"] for x in runs])}
    lat = {k: {q: med([x[k][q] for x in latency]) for q in ("p50_us", "p99_us")} for k in (latency[0] if latency else {})}

    print(f"producer path - {n:,} no-op tasks per measurement, each call waits for its own publish; one worker "
          f"process per contender; one local Redis; Python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"median of {a.runs}")
    print(f"{'contender':<10} {'call':<20} {'callers':>13} {'publish/s':>10} {'end to end/s':>13}")
    for lib in libs:
        if lib not in summary:
            print(f"{lib:<10} n/a  {errors.get(lib, 'no result')}")
            continue
        for mode, c in PLAN[lib]:
            s = summary[lib].get(f"{mode}:{c}")
            if s is None:
                continue
            who = "1 thread" if mode == "batch" else f"{c:,} {'thread' if mode == 'threads' else 'coroutine'}" + (
                "s" if c > 1 else "") + (" (uvloop)" if mode == "uvloop" else "")
            print(f"{lib:<10} {CALL[(lib, mode)]:<20} {who:>13} {s['publish_per_s']:>10,.0f} "
                  f"{s['end_to_end_per_s']:>13,.0f}")
    ceil = {k: med([x[k] for x in ceiling]) for k in (ceiling[0] if ceiling else {})}
    if ceil:
        print("coordination ceiling, no Redis and no encoding (see child_ceiling), calls/s:")
        for k, label in (("group_commit_threads:32", "GroupCommit, 32 threads, 50 us stand-in flush"),
                         ("group_commit_threads:128", "GroupCommit, 128 threads, 50 us stand-in flush"),
                         ("condition_threads:32", "threading.Condition.notify_all every 50 us, 32 threads"),
                         ("group_commit_coroutines:1000", "AsyncGroupCommit, 1,000 coroutines, flush yields once")):
            if k in ceil:
                print(f"  {label:<56} {ceil[k]:>10,.0f}")
    goals: dict[str, float] = {}
    if lat:
        print("lone caller latency, one thread back to back (no worker running), microseconds:")
        for k, label in (("add_task", "add_task (group commit)"), ("before", "before (encode + XADD)"),
                         ("add_task_async", "add_task_async (1 coroutine)")):
            if k in lat:
                print(f"  {label:<30} p50 {lat[k]['p50_us']:7.1f}  p99 {lat[k]['p99_us']:7.1f}")
        goals["lone_p50_vs_before"] = lat["add_task"]["p50_us"] / lat["before"]["p50_us"]
        goals["lone_p99_vs_before"] = lat["add_task"]["p99_us"] / lat["before"]["p99_us"]
    ours = summary.get("ours", {})

    def rate(lib: str, key: str) -> float | None:
        s = summary.get(lib, {}).get(key)
        return s["publish_per_s"] if s else None

    t32, c1000 = rate("ours", "threads:32"), rate("ours", "coroutines:1000")
    u1000 = rate("ours", "uvloop:1000")
    if u1000:
        goals["uvloop1000_publish_per_s"] = u1000
        for peer in ("arq", "taskiq"):
            pr = rate(peer, "uvloop:1000")
            if pr:
                goals[f"uvloop1000_vs_{peer}"] = u1000 / pr
    if t32:
        goals["threads32_publish_per_s"] = t32
    if c1000:
        goals["coroutines1000_publish_per_s"] = c1000
        for peer in ("arq", "taskiq"):
            pr = rate(peer, "coroutines:1000")
            if pr:
                goals[f"coroutines1000_vs_{peer}"] = c1000 / pr

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    if ours:
        parts = []
        if "threads32_publish_per_s" in goals:
            parts.append(f"32 threads {goals['threads32_publish_per_s']:,.0f}/s (goal >= 100,000: "
                         f"{verdict(goals['threads32_publish_per_s'] >= 100_000)})")
        if "coroutines1000_publish_per_s" in goals:
            parts.append(f"1,000 coroutines {goals['coroutines1000_publish_per_s']:,.0f}/s (goal >= 100,000: "
                         f"{verdict(goals['coroutines1000_publish_per_s'] >= 100_000)})")
        for peer in ("arq", "taskiq"):
            k = f"coroutines1000_vs_{peer}"
            if k in goals:
                parts.append(f"{goals[k]:.1f}x {peer} (goal >= 10x: {verdict(goals[k] >= 10)})")
        if "uvloop1000_publish_per_s" in goals:
            parts.append(f"1,000 coroutines on uvloop {goals['uvloop1000_publish_per_s']:,.0f}/s (goal >= 100,000: "
                         f"{verdict(goals['uvloop1000_publish_per_s'] >= 100_000)})")
            for peer in ("arq", "taskiq"):
                k = f"uvloop1000_vs_{peer}"
                if k in goals:
                    parts.append(f"{goals[k]:.1f}x {peer} on uvloop")
        if "lone_p50_vs_before" in goals:
            parts.append(f"lone caller p50 {goals['lone_p50_vs_before']:.2f}x / p99 {goals['lone_p99_vs_before']:.2f}x "
                         f"before (goal <= 1.10x: {verdict(max(goals['lone_p50_vs_before'], goals['lone_p99_vs_before']) <= 1.10)})")
        print("goals: " + "; ".join(parts))
    if errors:
        print("errors: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    print(json.dumps({"bench": "producer", "python": platform.python_version(), "cpus": os.cpu_count(), "tasks": n,
                      "runs": a.runs, "summary": summary, "latency": lat, "ceiling": ceil, "goals": goals,
                      "errors": errors, "raw": raw, "raw_latency": latency, "raw_ceiling": ceiling}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        lib, mode, c, n = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        if mode == "threads":
            res = child_threads(lib, n, c)
        elif mode in ("coroutines", "uvloop"):
            res = child_coroutines(lib, n, c, "uvloop" if mode == "uvloop" else "asyncio")
        elif mode == "ceiling":
            res = child_ceiling(max(n, 40_000))  # (fewer calls would time the start-up of 1,000 coroutines)
        elif mode == "batch":
            res = child_batch(lib, n)
        else:
            res = child_latency(lib, n)
        print(json.dumps(res))
    else:
        main()
