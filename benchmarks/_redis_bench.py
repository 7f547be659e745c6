"""Distributed mode on one local Redis: catzilla_tasks against Celery, Dramatiq, RQ, arq, Huey and taskiq.

    python benchmarks/_redis_bench.py [--quick] [--tasks N] [--runs N] [--contenders ours,celery,...]

``ours_off`` (only when named) is our worker with the cluster registry off (``--heartbeat 0``).

For each contender, each run (contenders interleaved run by run, median of ``--runs``):

1. **end to end**: one worker process (the library's own worker command, in its recommended
   fast configuration, see CONTENDERS) is started and proven ready (it ran a ping task); then
   one producer process enqueues N no-op tasks (20,000; 2,000 with ``--quick``). Time: from the
   producer's first enqueue to the worker finishing the N-th task (the task counts its runs and
   the N-th pushes its time to a Redis list the runner blocks on). Results are off for every
   contender (Celery ``ignore_result``, RQ ``result_ttl=0``, arq ``keep_result=0``, Huey
   ``results=False``, Dramatiq's default, ours ``result_ttl=0``).
2. **worker RSS**: peak RSS (VmHWM) of the worker's process tree at the end of (1); **worker
   CPU per task**: user + system CPU time of the worker process during (1) / N (less moved by
   other jobs on the machine than the wall-clock rate; a process pool's children not included).
3. **Redis memory per queued task**: with no worker running, the producer enqueues N tasks;
   (``used_memory`` after - before) / N. Then the database is flushed.

The Redis server is started here (free port, no persistence, temp dir) and shared by all.
Prints a table, then one JSON line (as the other suites of run.py).
"""

from __future__ import annotations

# Only what the tasks need at the top: every contender's worker imports this module, so the
# runner's own imports (argparse, statistics, subprocess, ...) are made inside the runner's
# functions and never weigh on a worker's RSS.
import itertools
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MOD = "_redis_bench"
LIB = os.environ.get("BENCH_LIB", "")
URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
N = int(os.environ.get("BENCH_N", "0") or 0)
DONE_KEY = "bench:done"
READY_KEY = "bench:ready"
CHUNK = 1000

# contender -> (worker command, what its fast configuration is)
CONTENDERS = {
    "ours": ([sys.executable, "-m", "catzilla_tasks.cli", "worker", f"{MOD}:tasks", "--concurrency", "1000"],
             "catzilla-tasks worker --concurrency 1000; producer: add_task inside tasks.batch() (sent every 1,000)"),
    # the same, but the task has rate_limit="1000000/s" (far above what is reached): what a limit
    # costs end to end when it never has to wait (one Lua call per fetched batch)
    "ours_ratelimited": ([sys.executable, "-m", "catzilla_tasks.cli", "worker", f"{MOD}:tasks", "--concurrency", "1000"],
                         "as ours, the task with rate_limit='1000000/s' (never reached)"),
    # ours with the cluster registry off (no heartbeat, no figures): the registry's cost is ours - ours_off
    "ours_off": ([sys.executable, "-m", "catzilla_tasks.cli", "worker", f"{MOD}:tasks", "--concurrency", "1000",
                  "--heartbeat", "0"],
                 "as ours, with --heartbeat 0 (not registered, no figures per task name)"),
    "celery": ([sys.executable, "-m", "celery", "-A", MOD, "worker", "-P", "solo", "--without-gossip",
                "--without-mingle", "--without-heartbeat", "-l", "WARNING", "--prefetch-multiplier", "1000"],
               "solo pool, no gossip/mingle/heartbeat, prefetch 1000, ignore_result; producer: delay()"),
    "dramatiq": ([sys.executable, "-m", "dramatiq", MOD, "--processes", "1", "--threads", "8"],
                 "1 process x 8 threads, RedisBroker; producer: send()"),
    "rq": ([sys.executable, "-m", "rq.cli", "worker", "-w", "rq.worker.SimpleWorker", "--url", "{url}", "-q", "bench"],
           "SimpleWorker (no fork per job), result_ttl=0; producer: enqueue_many() (1,000 per pipeline)"),
    "arq": ([sys.executable, "-m", "arq", f"{MOD}.WorkerSettings"],
            "max_jobs 1000, keep_result 0; producer: enqueue_job() 50 at a time with asyncio.gather"),
    "huey": ([sys.executable, "-m", "huey.bin.huey_consumer", f"{MOD}.huey", "-w", "8", "-k", "thread", "-q"],
             "RedisHuey(blocking=True, results=False), 8 worker threads; producer: call the task"),
    "taskiq": ([sys.executable, "-m", "taskiq", "worker", f"{MOD}:taskiq_broker", "--workers", "1",
                "--max-async-tasks", "1000", "--log-level", "WARNING"],
               "taskiq-redis ListQueueBroker, 1 worker process, max 1000 async tasks, no result backend; "
               "producer: kiq() 50 at a time with asyncio.gather"),
}

VARIANT_OF = {"ours_off": "ours"}  # contenders that are another's worker with other options
NOT_DEFAULT = ("ours_off",)  # run only when named in --contenders

# ----------------------------------------------------------------------------- the tasks

_count = itertools.count(1)
_r = None


def _done_client():
    """The harness's own client (every contender's tasks report through it). No CLIENT SETINFO
    (``driver_info=None``): otherwise redis-py looks its version up in the installed packages'
    metadata (importlib.metadata, ~0.4 MiB) when it connects, which would weigh on the worker
    measured, and more on some than on others (a library whose own clients already did the
    lookup pays nothing more)."""
    global _r
    if _r is None:
        import redis

        kw = {"driver_info": None} if hasattr(redis, "DriverInfo") else {}
        _r = redis.Redis.from_url(URL, **kw)
    return _r


def _tick() -> None:
    """A no-op task's only work: count; every N-th run reports the time (the producer suite runs
    several rounds of N tasks through one worker)."""
    if next(_count) % N == 0:
        _done_client().rpush(DONE_KEY, repr(time.time()))


def _ready() -> None:
    _done_client().rpush(READY_KEY, b"1")


if LIB in ("ours", "ours_ratelimited"):
    from catzilla_tasks import BackgroundTasks
    from catzilla_tasks.brokers import RedisBroker

    tasks = BackgroundTasks(broker=RedisBroker(URL, result_ttl=0, prefix="bench"))
    _limit = {"rate_limit": "1000000/s"} if LIB == "ours_ratelimited" else {}

    @tasks.task(**_limit)
    def noop() -> None:
        _tick()

    @tasks.task
    def ping() -> None:
        _ready()

elif LIB == "celery":
    from celery import Celery

    app = Celery(MOD, broker=URL)
    app.conf.update(task_ignore_result=True, worker_prefetch_multiplier=1000, broker_pool_limit=10,
                    worker_hijack_root_logger=False, task_serializer="json", accept_content=["json"])

    @app.task(name="noop", ignore_result=True)
    def noop() -> None:
        _tick()

    @app.task(name="ping", ignore_result=True)
    def ping() -> None:
        _ready()

elif LIB == "dramatiq":
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker as _DBroker

    dramatiq.set_broker(_DBroker(url=URL))

    @dramatiq.actor(max_retries=0)
    def noop() -> None:
        _tick()

    @dramatiq.actor(max_retries=0)
    def ping() -> None:
        _ready()

elif LIB == "rq":
    def noop() -> None:
        _tick()

    def ping() -> None:
        _ready()

elif LIB == "arq":
    from arq.connections import RedisSettings

    async def noop(ctx) -> None:
        _tick()

    async def ping(ctx) -> None:
        _ready()

    class WorkerSettings:
        functions = [noop, ping]
        redis_settings = RedisSettings.from_dsn(URL)
        max_jobs = 1000
        keep_result = 0
        handle_signals = True

elif LIB == "taskiq":
    from taskiq_redis import ListQueueBroker

    taskiq_broker = ListQueueBroker(URL, queue_name="bench")

    @taskiq_broker.task(task_name="noop")
    async def noop() -> None:
        _tick()

    @taskiq_broker.task(task_name="ping")
    async def ping() -> None:
        _ready()

elif LIB == "huey":
    from huey import RedisHuey

    huey = RedisHuey("bench", url=URL, results=False, blocking=True)

    @huey.task()
    def noop() -> None:
        _tick()

    @huey.task()
    def ping() -> None:
        _ready()


# ----------------------------------------------------------------------------- producers

def produce(n: int, ping_only: bool = False) -> float:
    """Enqueue n no-op tasks (or one ping); returns the time of the first enqueue."""
    mod = sys.modules[__name__]
    t0 = time.time()
    if LIB in ("ours", "ours_ratelimited"):
        if ping_only:
            tasks.add_task(mod.ping)
            return t0
        for i in range(0, n, CHUNK):
            with tasks.batch():
                for _ in range(min(CHUNK, n - i)):
                    tasks.add_task(mod.noop)
    elif LIB in ("celery", "dramatiq"):
        send = (mod.ping if ping_only else mod.noop)
        call = send.delay if LIB == "celery" else send.send
        for _ in range(1 if ping_only else n):
            call()
    elif LIB == "rq":
        import redis
        from rq import Queue

        q = Queue("bench", connection=redis.Redis.from_url(URL))
        if ping_only:
            q.enqueue(mod.ping, result_ttl=0)
            return t0
        for i in range(0, n, CHUNK):
            q.enqueue_many([Queue.prepare_data(mod.noop, result_ttl=0) for _ in range(min(CHUNK, n - i))])
    elif LIB == "arq":
        import asyncio

        from arq import create_pool
        from arq.connections import RedisSettings

        async def main() -> None:
            pool = await create_pool(RedisSettings.from_dsn(URL))
            if ping_only:
                await pool.enqueue_job("ping")
            else:
                for i in range(0, n, 50):  # 50 at once: its connection pool holds 100
                    await asyncio.gather(*(pool.enqueue_job("noop") for _ in range(min(50, n - i))))
            await pool.aclose()

        asyncio.run(main())
    elif LIB == "taskiq":
        import asyncio

        async def kiq_all() -> None:
            await taskiq_broker.startup()
            if ping_only:
                await mod.ping.kiq()
            else:
                for i in range(0, n, 50):
                    await asyncio.gather(*(mod.noop.kiq() for _ in range(min(50, n - i))))
            await taskiq_broker.shutdown()

        asyncio.run(kiq_all())
    elif LIB == "huey":
        f = mod.ping if ping_only else mod.noop
        for _ in range(1 if ping_only else n):
            f()
    return t0


# ----------------------------------------------------------------------------- the runner

def compile_bytecode() -> None:
    """Peers run from the bytecode pip compiled when it installed them; our package (a source
    checkout, where PYTHONDONTWRITEBYTECODE=1 may keep Python from caching it) and this module
    get theirs here, so no worker compiles source at start-up (that costs RSS, ~1.5 MiB)."""
    import compileall
    import py_compile

    compileall.compile_dir(os.path.join(REPO, "src", "catzilla_tasks"), quiet=1)
    py_compile.compile(os.path.join(HERE, f"{MOD}.py"), doraise=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(lib: str, url: str, n: int) -> dict[str, str]:
    env = dict(os.environ, BENCH_LIB=VARIANT_OF.get(lib, lib), BENCH_REDIS_URL=url, BENCH_N=str(n))
    env.pop("LD_PRELOAD", None)
    parts = [HERE, os.path.join(REPO, "src")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def tree_peak_rss(pid: int) -> int:
    """Sum of VmHWM (peak RSS) over the process and its descendants, bytes."""
    def children(p: int) -> list[int]:
        out = []
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    out += [int(x) for x in f.read().split()]
        except OSError:
            pass
        return out

    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
        todo += children(p)
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (its threads included) so far, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_producer(lib: str, url: str, n: int, ping: bool = False) -> float:
    import subprocess

    code = f"import {MOD} as m; print(repr(m.produce({n}, {ping})))"
    out = subprocess.run([sys.executable, "-c", code], env=env_for(lib, url, n), cwd=HERE,
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{lib} producer failed: {out.stderr.strip().splitlines()[-3:]}")
    return float(out.stdout.strip().splitlines()[-1])


def one_run(lib: str, url: str, n: int, r) -> dict:
    import subprocess
    import tempfile

    r.flushall()
    # Redis memory per queued task (no worker running)
    before = r.info("memory")["used_memory"]
    run_producer(lib, url, n)
    after = r.info("memory")["used_memory"]
    mem_per_task = (after - before) / n
    r.flushall()
    # end to end with a ready worker
    cmd = [c.replace("{url}", url) for c in CONTENDERS[lib][0]]
    log = tempfile.TemporaryFile()  # not a pipe: a chatty worker (arq logs every job) must never block on it
    w = subprocess.Popen(cmd, env=env_for(lib, url, n), cwd=HERE, stdout=log, stderr=subprocess.STDOUT)
    try:
        run_producer(lib, url, 1, ping=True)
        if not r.blpop(READY_KEY, timeout=60):
            log.seek(0)
            tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{lib} worker not ready in 60 s: {tail}")
        cpu0 = cpu_seconds(w.pid)
        t0 = run_producer(lib, url, n)
        got = r.blpop(DONE_KEY, timeout=600)
        if not got:
            raise RuntimeError(f"{lib}: {n} tasks not done in 600 s")
        seconds = float(got[1]) - t0
        cpu = cpu_seconds(w.pid) - cpu0  # (the worker process only; a pool's children are not in it)
        rss = tree_peak_rss(w.pid)
    finally:
        w.terminate()
        try:
            w.wait(30)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()
        log.close()
    return {"seconds": seconds, "tasks_per_s": n / seconds, "redis_bytes_per_task": mem_per_task, "worker_rss": rss,
            "worker_cpu_us_per_task": cpu / n * 1e6}


def available(lib: str) -> str | None:
    lib = VARIANT_OF.get(lib, lib)
    mod = {"ours": "redis", "ours_ratelimited": "redis", "celery": "celery", "dramatiq": "dramatiq", "rq": "rq",
           "arq": "arq", "huey": "huey", "taskiq": "taskiq_redis"}[lib]
    try:
        __import__(mod)
    except ImportError as exc:
        return str(exc)
    return None


def main() -> None:
    import argparse
    import json
    import platform
    import shutil
    import statistics
    import subprocess
    import tempfile

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2,000 tasks instead of 20,000")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--contenders", default=",".join(c for c in CONTENDERS if c not in NOT_DEFAULT))
    p.add_argument("--tasks", type=int, help="tasks per run (default 20,000; 2,000 with --quick)")
    a = p.parse_args()
    n = a.tasks or (2_000 if a.quick else 20_000)
    libs = [c for c in a.contenders.split(",") if c]
    bad = [c for c in libs if c not in CONTENDERS]
    if bad:
        p.error(f"unknown contenders {bad}; known: {', '.join(CONTENDERS)}")
    import redis

    compile_bytecode()
    exe = shutil.which("redis-server")
    if exe is None:
        sys.exit("redis-server is not installed")
    d = tempfile.mkdtemp(prefix="bench-redis-")
    port = free_port()
    srv = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", d, "--save", "",
                            "--appendonly", "no"], env=env_for("", "", 0), stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    r = redis.Redis.from_url(url, socket_timeout=None)  # it blocks up to 600 s for the workers
    for _ in range(500):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    results: dict[str, list[dict]] = {c: [] for c in libs}
    errors: dict[str, str] = {}
    try:
        for run in range(a.runs):
            for lib in libs:
                if lib in errors:
                    continue
                why = available(lib)
                if why:
                    errors[lib] = f"not installed: {why}"
                    continue
                t = time.perf_counter()
                try:
                    res = one_run(lib, url, n, r)
                except Exception as exc:
                    errors[lib] = f"{type(exc).__name__}: {exc}"
                    sys.stderr.write(f"[run {run + 1}/{a.runs}] {lib:<9} FAILED {errors[lib]}\n")
                    continue
                results[lib].append(res)
                sys.stderr.write(f"[run {run + 1}/{a.runs}] {lib:<9} {time.perf_counter() - t:6.1f}s  "
                                 f"{res['tasks_per_s']:8.0f} tasks/s  {res['redis_bytes_per_task']:6.0f} B/task  "
                                 f"RSS {res['worker_rss'] / 2**20:5.1f} MiB  "
                                 f"CPU {res['worker_cpu_us_per_task']:5.1f} us/task\n")
    finally:
        srv.terminate()
        srv.wait()
        shutil.rmtree(d, ignore_errors=True)

    def med(lib: str, key: str) -> float | None:
        vals = [x[key] for x in results.get(lib, [])]
        return statistics.median(vals) if vals else None

    keys = ("seconds", "tasks_per_s", "redis_bytes_per_task", "worker_rss", "worker_cpu_us_per_task")
    summary = {lib: {k: med(lib, k) for k in keys}
               for lib in libs if results.get(lib)}
    peers = [lib for lib in summary if not lib.startswith("ours")]  # (ours and its variants)
    fastest = max(peers, key=lambda x: summary[x]["tasks_per_s"]) if peers else None
    leanest = min(peers, key=lambda x: summary[x]["redis_bytes_per_task"]) if peers else None
    print(f"catzilla_tasks distributed mode vs peers - {n:,} no-op tasks, one producer + one worker process, "
          f"one local Redis, Python {platform.python_version()}, {os.cpu_count()} CPUs, median of {a.runs}")
    print(f"{'contender':<10} {'tasks/s':>9} {'seconds':>8} {'Redis B/task':>13} {'worker RSS MiB':>15} {'CPU us/task':>12}  configuration")
    for lib in libs:
        if lib not in summary:
            print(f"{lib:<10} {'n/a':>9}  {errors.get(lib, 'no result')}")
            continue
        s = summary[lib]
        print(f"{lib:<10} {s['tasks_per_s']:>9.0f} {s['seconds']:>8.2f} {s['redis_bytes_per_task']:>13.0f} "
              f"{s['worker_rss'] / 2**20:>15.1f} {s['worker_cpu_us_per_task']:>12.1f}  {CONTENDERS[lib][1]}")
    goals = {}
    if "ours" in summary and fastest:
        o = summary["ours"]
        goals["throughput_vs_fastest"] = o["tasks_per_s"] / summary[fastest]["tasks_per_s"]
        goals["bytes_vs_leanest"] = o["redis_bytes_per_task"] / summary[leanest]["redis_bytes_per_task"]
        if "celery" in summary:
            goals["rss_vs_celery"] = o["worker_rss"] / summary["celery"]["worker_rss"]
        tp = goals["throughput_vs_fastest"]
        print(f"ours vs the fastest peer ({fastest}): {tp:.1f}x tasks/s (goal >= 10x, floor 3x: "
              f"{'met' if tp >= 10 else 'floor met' if tp >= 3 else 'not met'}); Redis memory per queued task "
              f"{goals['bytes_vs_leanest']:.2f}x the leanest ({leanest}) (goal <= 1x: "
              f"{'met' if goals['bytes_vs_leanest'] <= 1 else 'not met'})"
              + (f"; worker RSS {goals['rss_vs_celery']:.2f}x Celery's (goal < 0.6x: "
                 f"{'met' if goals['rss_vs_celery'] < 0.6 else 'not met'})" if "rss_vs_celery" in goals else ""))
    if "ours" in summary and "ours_ratelimited" in summary:
        goals["ratelimited_vs_unlimited"] = summary["ours_ratelimited"]["tasks_per_s"] / summary["ours"]["tasks_per_s"]
        print(f"a task with rate_limit='1000000/s' (never reached): {goals['ratelimited_vs_unlimited']:.2f}x the "
              "unlimited task's tasks/s end to end (goal >= 0.5x)")
    print(json.dumps({"bench": "redis", "python": platform.python_version(), "cpus": os.cpu_count(), "tasks": n,
                      "runs": a.runs, "summary": summary, "errors": errors, "ratios": goals,
                      "raw": results}))


if __name__ == "__main__":
    main()
