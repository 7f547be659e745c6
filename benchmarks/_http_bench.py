"""HTTP benchmark: a route that enqueues one no-op task and returns its id, under wrk.

    python benchmarks/_http_bench.py [--quick] [--runs N] [--contenders a,b] [--duration S]

Contenders (each a real server in its own process, on a free 127.0.0.1 port):

- ``ours_catzilla``: Catzilla 0.2.3 + ``enable_background_tasks(app, workers=4)`` (our engine),
  the route calls ``app.add_task(noop)``;
- ``catzilla``: Catzilla 0.2.3 + its own ``app.enable_background_tasks(workers=4)``, same route;
- ``fastapi``: FastAPI on uvicorn with ``fastapi.BackgroundTasks`` (runs after the response,
  in the server's thread pool; the request ends when it has run);
- ``ours_fastapi``: FastAPI on uvicorn with our drop-in ``BackgroundTasks`` route parameter, the
  same route code (FastAPI's semantics: runs after the response, on our engine's workers=4; the
  request ends when it has run);
- ``ours_fastapi_detached``: FastAPI on uvicorn with our ``DetachedBackgroundTasks`` (queued into
  our engine, workers=4, at once; the route returns its id and does not wait).

Publishing to Redis from an ``async def`` route (FastAPI on uvicorn; a redis-server started
here, no worker: the route's cost is the publish, which returns once Redis holds the task):

- ``ours_redis``: ``await tasks.add_task_async(noop)`` on ``BackgroundTasks(broker=RedisBroker(...))``;
- ``ours_redis_blocking``: the same with the plain ``tasks.add_task(noop)`` (it blocks the event
  loop for its round trip: what ``add_task_async`` is for);
- ``arq_redis``: ``await pool.enqueue_job("noop")`` (arq 0.25, its pool made at startup);
- ``taskiq_redis``: ``await noop.kiq()`` (taskiq-redis ``ListQueueBroker``, started at startup).

Tasks come from ``_redis_bench.py`` (each library's no-op, as its worker would run it).

The load comes from wrk (Debian's ``wrk``) in a separate process: ``wrk -t1 -c32 -d<S>s
--latency``, after a 1 s warm-up run. Reported: requests/s and p99 latency (wrk's), and the
drain time: from the end of the load until every task enqueued has run (the server counts
tasks enqueued and tasks that ran; polled every 5 ms); ``lost`` is enqueued - ran when the
drain did not finish within 60 s (not for the Redis routes: no worker runs there). Medians over ``--runs`` runs, contenders interleaved in
each run. Prints a table, then one JSON line.
"""

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CONTENDERS = ("ours_catzilla", "catzilla", "fastapi", "ours_fastapi", "ours_fastapi_detached",
              "ours_redis", "ours_redis_blocking", "arq_redis", "taskiq_redis")
LABELS = {
    "ours_catzilla": "catzilla_tasks on Catzilla",
    "catzilla": "Catzilla 0.2.3 built-in tasks",
    "fastapi": "FastAPI BackgroundTasks (uvicorn)",
    "ours_fastapi": "catzilla_tasks drop-in on FastAPI (uvicorn)",
    "ours_fastapi_detached": "catzilla_tasks detached on FastAPI (uvicorn)",
    "ours_redis": "Redis: catzilla_tasks add_task_async (FastAPI)",
    "ours_redis_blocking": "Redis: catzilla_tasks add_task, blocking (FastAPI)",
    "arq_redis": "Redis: arq enqueue_job (FastAPI)",
    "taskiq_redis": "Redis: taskiq kiq (FastAPI)",
}
# the Redis routes: contender -> the library of _redis_bench.py whose no-op they publish
REDIS_LIBS = {"ours_redis": "ours", "ours_redis_blocking": "ours", "arq_redis": "arq", "taskiq_redis": "taskiq"}
CONNECTIONS = 32
DRAIN_LIMIT_S = 60.0
READY_LIMIT_S = 60.0


# --------------------------------------------------------------------------- servers

class Counter:
    """Tasks enqueued by the route and tasks that ran (a lock: tasks run on several threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.enqueued = 0
        self.ran = 0

    def noop(self) -> None:
        with self.lock:
            self.ran += 1

    def next_id(self) -> int:
        with self.lock:
            self.enqueued += 1
            return self.enqueued

    def as_dict(self) -> dict[str, int]:
        with self.lock:
            return {"enqueued": self.enqueued, "ran": self.ran}


def serve(contender: str, port: int) -> None:
    count = Counter()
    if contender in ("ours_catzilla", "catzilla"):
        from catzilla import Catzilla, Request

        app = Catzilla(production=True, show_banner=False, log_requests=False)
        if contender == "ours_catzilla":
            from catzilla_tasks.integrations.catzilla import enable_background_tasks

            enable_background_tasks(app, workers=4, prefix=None)
        else:
            app.enable_background_tasks(workers=4)

        @app.get("/enqueue")
        def enqueue(request: Request):
            count.next_id()
            return {"task_id": app.add_task(count.noop).task_id}

        @app.get("/count")
        def counts(request: Request):
            return count.as_dict()

        app.listen(port, "127.0.0.1")
        return

    import uvicorn
    from fastapi import FastAPI

    if contender in REDIS_LIBS:
        serve_redis(contender, port, count)
        return
    if contender in ("fastapi", "ours_fastapi"):
        # the same route for both: only the import differs
        if contender == "fastapi":
            from fastapi import BackgroundTasks

            app = FastAPI()
        else:
            from catzilla_tasks.integrations.fastapi import BackgroundTasks, lifespan

            app = FastAPI(lifespan=lifespan(workers=4))

        @app.get("/enqueue")
        async def enqueue(background_tasks: BackgroundTasks):
            n = count.next_id()
            background_tasks.add_task(count.noop)
            return {"task_id": n}
    else:
        from catzilla_tasks.integrations.fastapi import DetachedBackgroundTasks, lifespan

        app = FastAPI(lifespan=lifespan(workers=4))

        @app.get("/enqueue")
        async def enqueue(background_tasks: DetachedBackgroundTasks):
            count.next_id()
            return {"task_id": background_tasks.add_task(count.noop).task_id}

    @app.get("/count")
    async def counts():
        return count.as_dict()

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def serve_redis(contender: str, port: int, count: Counter) -> None:
    """An async route publishing one task to Redis (BENCH_REDIS_URL), returning its id."""
    import contextlib

    import uvicorn
    from fastapi import FastAPI

    import _redis_bench as m  # its tasks, for the library in BENCH_LIB

    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if contender == "arq_redis":
            from arq import create_pool
            from arq.connections import RedisSettings

            state["pool"] = await create_pool(RedisSettings.from_dsn(m.URL))
        elif contender == "taskiq_redis":
            await m.taskiq_broker.startup()
        yield
        if contender == "arq_redis":
            await state["pool"].aclose()
        elif contender == "taskiq_redis":
            await m.taskiq_broker.shutdown()

    app = FastAPI(lifespan=lifespan)
    if contender == "ours_redis":
        @app.get("/enqueue")
        async def enqueue():
            count.next_id()
            return {"task_id": (await m.tasks.add_task_async(m.noop)).task_id}
    elif contender == "ours_redis_blocking":
        @app.get("/enqueue")
        async def enqueue():
            count.next_id()
            return {"task_id": m.tasks.add_task(m.noop).task_id}
    elif contender == "arq_redis":
        @app.get("/enqueue")
        async def enqueue():
            count.next_id()
            return {"task_id": (await state["pool"].enqueue_job("noop")).job_id}
    else:
        @app.get("/enqueue")
        async def enqueue():
            count.next_id()
            return {"task_id": (await m.noop.kiq()).task_id}

    @app.get("/count")
    async def counts():
        return {**count.as_dict(), "redis": True}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


class RedisServer:
    """A private redis-server (free port, no persistence) for the Redis routes."""

    def __init__(self) -> None:
        import tempfile

        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed")
        self.dir = tempfile.mkdtemp(prefix="http-bench-redis-")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                                      "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(b"FLUSHALL\r\n")
            s.recv(64)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


REDIS: RedisServer | None = None


# --------------------------------------------------------------------------- measuring

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    env = dict(os.environ)
    src = os.path.join(REPO, "src")
    env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def wait_listening(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + READY_LIMIT_S
    while True:
        if proc.poll() is not None:
            tail = (proc.stderr.read() if proc.stderr else "").strip().splitlines()[-5:]
            raise RuntimeError(f"server exited with {proc.returncode} before listening: {' | '.join(tail)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not listening after {READY_LIMIT_S} s") from None
            time.sleep(0.02)


def get_counts(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=30) as r:
        return json.loads(r.read())


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"cannot read wrk's latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(port: int, seconds: float) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # wrk is not Python
    cmd = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--latency",
           f"http://127.0.0.1:{port}/enqueue"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 60).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    total = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if not (rps and p99 and p50 and total):
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    return {"requests_per_s": float(rps.group(1)), "p50_ms": _ms(p50.group(1)), "p99_ms": _ms(p99.group(1)),
            "requests": int(total.group(1)), "non_2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": sum(int(x) for x in sock.groups()) if sock else 0}


def measure(contender: str, seconds: float) -> dict[str, float | None]:
    port = free_port()
    env = clean_env()
    if contender in REDIS_LIBS:
        global REDIS
        if REDIS is None:
            REDIS = RedisServer()
        REDIS.flush()
        env.update(BENCH_LIB=REDIS_LIBS[contender], BENCH_REDIS_URL=REDIS.url, BENCH_N="1")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve", contender, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        wait_listening(proc, port)
        run_wrk(port, 1)  # warm-up (imports, caches, thread pools)
        before = get_counts(port)
        res = run_wrk(port, seconds)
        t_end = time.perf_counter()
        if res["non_2xx"] or res["socket_errors"] or not res["requests"]:
            raise RuntimeError(f"the load did not go through: {res}")
        while True:
            c = get_counts(port)
            if c.get("redis"):  # published to Redis (each request returned once Redis held it); no worker
                res["drain_s"] = res["lost"] = None
                c["ran"] = c["enqueued"]
                break
            if c["ran"] >= c["enqueued"]:
                res["drain_s"] = time.perf_counter() - t_end
                res["lost"] = 0
                break
            if time.perf_counter() - t_end > DRAIN_LIMIT_S:
                res["drain_s"] = None
                res["lost"] = c["enqueued"] - c["ran"]
                break
            time.sleep(0.005)
        res["enqueued"] = c["enqueued"] - before["enqueued"]
        res["tasks_ran"] = c["ran"] - before["ran"]
        return res
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- main

def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        serve(argv[1], int(argv[2]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 s of load per measurement (default 10 s)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=float, default=None, help="seconds of load per measurement")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    args = p.parse_args(argv)
    chosen = [c.strip() for c in args.contenders.split(",") if c.strip()]
    bad = [c for c in chosen if c not in CONTENDERS]
    if bad:
        p.error(f"unknown contender(s) {bad}; choose from {', '.join(CONTENDERS)}")
    if shutil.which("wrk") is None:
        p.error("wrk not found: install Debian's package (apt-get install wrk); .ci/run installs it")
    seconds = args.duration or (3.0 if args.quick else 10.0)
    raw: dict[str, list[dict[str, float | None]]] = {c: [] for c in chosen}
    errors: dict[str, str] = {}
    try:
        run_all(chosen, args.runs, seconds, raw, errors)
    finally:
        if REDIS is not None:
            REDIS.stop()
    return report(chosen, args.runs, seconds, raw, errors)


def run_all(chosen: list[str], runs: int, seconds: float, raw: dict, errors: dict) -> None:
    for run in range(1, runs + 1):
        for c in chosen:
            try:
                r = measure(c, seconds)
            except Exception as exc:  # a contender that cannot run is reported, the rest go on
                errors[c] = f"{type(exc).__name__}: {exc}"
                sys.stderr.write(f"[http run {run}] {c}: ERROR {errors[c]}\n")
                continue
            r["run"] = run
            raw[c].append(r)
            sys.stderr.write(f"[http run {run}] {c}: {r['requests_per_s']:,.0f} req/s, p99 {r['p99_ms']:.2f} ms, "
                             f"drain {fmt(r['drain_s'], '.3f')} s\n")


def report(chosen: list[str], runs: int, seconds: float, raw: dict, errors: dict) -> int:
    def median(c: str, key: str) -> float | None:
        vals = [r[key] for r in raw[c] if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    summary = {c: {k: median(c, k) for k in ("requests_per_s", "p50_ms", "p99_ms", "drain_s", "lost", "enqueued",
                                             "tasks_ran", "non_2xx", "socket_errors")} for c in chosen}
    base = summary.get("ours_catzilla", {}).get("requests_per_s")
    # this contender's req/s over FastAPI's own in the same run (they ran back to back), then the median:
    # steadier than a ratio of medians on a loaded machine
    fastapi_rps = {r["run"]: r["requests_per_s"] for r in raw.get("fastapi", [])}

    def vs_fastapi(c: str) -> float | None:
        vals = [r["requests_per_s"] / fastapi_rps[r["run"]] for r in raw[c] if fastapi_rps.get(r["run"])]
        return statistics.median(vals) if vals else None

    for c in chosen:
        summary[c]["vs_fastapi"] = vs_fastapi(c)
    print(f"HTTP: GET /enqueue queues one no-op task and returns its id; wrk -t1 -c{CONNECTIONS} -d{seconds:g}s "
          f"--latency after a 1 s warm-up; median of {runs} runs, contenders interleaved")
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs; server and wrk share the machine")
    rows = [["contender", "req/s", "p50 ms", "p99 ms", "drain s", "lost", "tasks/run", "req/s ours_catzilla / this",
             "req/s this / FastAPI's"]]
    for c in chosen:
        s = summary[c]
        if c in errors and not raw[c]:
            rows.append([LABELS[c], "failed: " + errors[c]] + [""] * 7)
            continue
        ratio = base / s["requests_per_s"] if base and s["requests_per_s"] else None
        rows.append([LABELS[c], fmt(s["requests_per_s"], ",.0f"), fmt(s["p50_ms"], ".2f"), fmt(s["p99_ms"], ".2f"),
                     fmt(s["drain_s"], ".3f"), fmt(s["lost"], ".0f"), fmt(s["enqueued"], ",.0f"),
                     "" if c == "ours_catzilla" else fmt(ratio, ".2f") + "x",
                     "" if c == "fastapi" else fmt(s["vs_fastapi"], ".2f") + "x"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))))
    print("drain s: from the end of the load until every enqueued task had run (FastAPI's own and our drop-in run "
          "after each response, before the request ends); lost: never ran within 60 s; this / FastAPI's: median over "
          "runs of the ratio within one run.")
    ours_r = summary.get("ours_redis", {}).get("requests_per_s")
    for peer in ("arq_redis", "taskiq_redis", "ours_redis_blocking"):
        pr = summary.get(peer, {}).get("requests_per_s")
        if ours_r and pr:
            print(f"Redis route: add_task_async {ours_r / pr:.2f}x the req/s of {LABELS[peer]} (p99 "
                  f"{fmt(summary['ours_redis']['p99_ms'], '.2f')} ms vs {fmt(summary[peer]['p99_ms'], '.2f')} ms)")
    print(json.dumps({"suite": "http", "seconds": seconds, "connections": CONNECTIONS, "runs": runs,
                      "summary": summary, "raw": raw, "errors": errors}, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
