"""Benchmarks: catzilla_tasks against ThreadPoolExecutor(4), catzilla 0.2.3 and asyncio.

    python benchmarks/run.py [--quick] [--runs N] [--json PATH] [--contenders a,b] [--figures a,b]

Each figure declares its own contenders (FIGURES below). Every measurement runs in a
fresh subprocess (benchmarks/_contenders.py), in alternating order: for each run, for
each figure, each of its contenders in turn. The table shows the median over the runs
(min-max beside it) and ratios of medians; the JSON file keeps every raw run. See
benchmarks/README.md.
"""
import argparse
import datetime
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CONTENDERS_PY = os.path.join(HERE, "_contenders.py")
DEFAULT_JSON = os.path.join(HERE, "results", "latest.json")

# contender -> (label, family); --contenders accepts either a contender or a family
CONTENDER_TABLE = {
    "ours": ("catzilla_tasks", "ours"),
    "threadpool": ("ThreadPoolExecutor(4)", "threadpool"),
    "catzilla": ("catzilla 0.2.3", "catzilla"),
    "asyncio": ("asyncio call_later (loop thread)", "asyncio"),
    "ours_process": ('catzilla_tasks isolation="process"', "ours"),
    "ours_threads": ("catzilla_tasks thread tasks", "ours"),
    "ours_autoscale": ("catzilla_tasks, auto-scaling 2..64", "ours"),
    "ours_fixed": ("catzilla_tasks, fixed 2 workers", "ours"),
    "ours_native": ("catzilla_tasks compiled, native (map)", "ours"),
    "ours_python": ("catzilla_tasks Python tasks (map)", "ours"),
}
CONTENDERS = tuple(CONTENDER_TABLE)
LABELS = {c: label for c, (label, _family) in CONTENDER_TABLE.items()}
FAMILIES = {c: family for c, (_label, family) in CONTENDER_TABLE.items()}

# figure -> its contenders (in the order they alternate) and (n, param) per mode.
# param: probes (critical), spread of the delays in ms (lateness), target duration
# of one CPU task in ms (cpu_isolation; run.py calibrates it to an iteration count).
FIGURES = {
    "throughput": {"contenders": ("ours", "threadpool", "catzilla"),
                   "full": (200_000, 0), "quick": (20_000, 0)},
    "critical": {"contenders": ("ours", "threadpool", "catzilla"),
                 "full": (100_000, 2_000), "quick": (20_000, 200)},
    "memory": {"contenders": ("ours", "threadpool", "catzilla"),
               "full": (100_000, 0), "quick": (20_000, 0)},
    "lateness": {"contenders": ("ours", "asyncio"),
                 "full": (10_000, 2_000), "quick": (5_000, 1_000)},
    "cpu_isolation": {"contenders": ("ours_process", "ours_threads"),
                      "full": (4, 500), "quick": (4, 150)},
    # n tasks sleeping param ms each; then n no-op tasks (no regression from scaling)
    "autoscale": {"contenders": ("ours_autoscale", "ours_fixed"),
                  "full": (2_000, 20), "quick": (500, 20)},
    "autoscale_noop": {"contenders": ("ours_autoscale", "ours_fixed"),
                       "full": (200_000, 0), "quick": (20_000, 0)},
    # compiled tasks (benchmarks/_compile_bench.py): N items through map, 1 then 2 workers;
    # Python tasks and the thread pool get N/10
    "compile_add": {"contenders": ("ours_native", "ours_python", "threadpool"),
                    "full": (1_000_000, 0), "quick": (200_000, 0)},
    "compile_loop": {"contenders": ("ours_native", "ours_python", "threadpool"),
                     "full": (200_000, 0), "quick": (50_000, 0)},
}
SIZES = {mode: {f: spec[mode] for f, spec in FIGURES.items()} for mode in ("full", "quick")}

GOALS = {
    "throughput_vs_threadpool": {"goal": 25.0, "floor": 15.0, "text": ">= 25x (floor 15x)"},
    "critical_p99_ms": {"goal": 1.0, "floor": None, "text": "p99 < 1 ms"},
    "bytes_per_task": {"goal": 128.0, "floor": 200.0, "text": "<= 128 B (floor 200)"},
    # "a due task starts within 2 ms under light load": the tasks due after the submit loop
    # (while the loop runs, the submitting thread holds the GIL and every Python task waits)
    "lateness_p99_ms": {"goal": 2.0, "floor": None, "text": "p99 < 2 ms (light load)"},
    "cpu_isolation_speedup": {"goal": 1.7, "floor": None, "text": ">= 1.7x"},
    "autoscale_speedup": {"goal": 5.0, "floor": None, "text": ">= 5x fixed 2 workers"},
    "autoscale_back_to_min_s": {"goal": None, "floor": None, "text": "<= cooldown + 5 s"},
    "autoscale_noop_ratio": {"goal": 0.9, "floor": None, "text": ">= 0.9x fixed (no regression)"},
    "compile_native_add_per_s": {"goal": 5_000_000.0, "floor": 1_000_000.0, "text": ">= 5,000,000/s (floor 1,000,000)"},
    "compile_loop_scaling": {"goal": 1.8, "floor": None, "text": ">= 1.8x"},
}
GOAL_FIGURE = {"throughput_vs_threadpool": "throughput", "critical_p99_ms": "critical",
               "bytes_per_task": "memory", "lateness_p99_ms": "lateness",
               "cpu_isolation_speedup": "cpu_isolation", "autoscale_speedup": "autoscale",
               "autoscale_back_to_min_s": "autoscale", "autoscale_noop_ratio": "autoscale_noop",
               "compile_native_add_per_s": "compile_add", "compile_loop_scaling": "compile_loop"}

SUBPROCESS_TIMEOUT_S = 1800

# Suites: standalone benchmark scripts with their own side-by-side tables (each runs its own
# contenders in one process, interleaved, median of --runs). run.py runs each in a subprocess
# after the figures, prints its table and keeps its last JSON line under "suites" in the JSON.
# suite -> (script in benchmarks/, what it compares)
SUITES = {
    "workflows": ("_workflows_bench.py",
                  "10,000-step random DAG vs plain tasks; 1,000-step chain vs ThreadPoolExecutor chaining"),
    "http": ("_http_bench.py",
             "a route enqueueing one task under wrk: ours on Catzilla vs Catzilla's built-in tasks vs FastAPI's "
             "BackgroundTasks (and ours on FastAPI): req/s, p99, time until all tasks ran"),
    "producer": ("_producer_bench.py",
                 "the producer path on one local Redis, one publish per call: add_task from 1-128 threads and "
                 "add_task_async from 1-1,000 coroutines vs arq, taskiq (coroutines), Celery, Huey (threads): "
                 "publish and end-to-end rates; lone-caller latency vs the path before group commit"),
    "redis": ("_redis_bench.py",
              "distributed mode on one local Redis: 20,000 no-op tasks end to end (a producer process, one worker "
              "process) vs Celery, Dramatiq, RQ, arq, Huey; Redis memory per queued task; worker RSS"),
}


# --------------------------------------------------------------------------- running

def subprocess_env():
    """Let the subprocess import catzilla_tasks from src/ if it is built in place."""
    env = dict(os.environ)
    src = os.path.join(REPO, "src")
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if src not in parts:
        parts.append(src)
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def run_one(contender, figure, n, probes, env):
    cmd = [sys.executable, CONTENDERS_PY, contender, figure, str(n)]
    if probes:
        cmd.append(str(probes))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO,
                              timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {SUBPROCESS_TIMEOUT_S} s"}, time.perf_counter() - t0
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {proc.returncode}, no result: {tail}"}, wall
    result = json.loads(lines[-1])
    if "error" in result and not result.get("unavailable"):
        tail = proc.stderr.strip().splitlines()[-12:]
        if tail:
            sys.stderr.write("    " + "\n    ".join(tail) + "\n")
    return result, wall


def run_suites(names, runs, quick):
    """Run each suite script; returns {suite: its JSON line (or an error)} and prints its output."""
    out = {}
    for name in names:
        script, what = SUITES[name]
        cmd = [sys.executable, os.path.join(HERE, script), "--runs", str(runs)] + (["--quick"] if quick else [])
        sys.stderr.write(f"suite {name}: {' '.join(cmd[1:])}\n")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO,
                                  timeout=SUBPROCESS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            out[name] = {"error": f"timed out after {SUBPROCESS_TIMEOUT_S} s"}
            continue
        lines = proc.stdout.splitlines()
        js = [ln for ln in lines if ln.startswith("{")]
        print(f"\n## suite: {name} ({what})\n")
        print("\n".join(ln for ln in lines if not ln.startswith("{")))
        if proc.returncode != 0 or not js:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            out[name] = {"error": f"exit {proc.returncode}: {tail}"}
            print(f"suite {name} FAILED: {out[name]['error']}")
        else:
            out[name] = json.loads(js[-1])
    return out


def source_state():
    """Which engine was measured: git HEAD, uncommitted changes under src/, and when the
    extension was built (another build during a run makes its figures mixed)."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    engine_dir = os.path.join(REPO, "src", "catzilla_tasks")
    builds = sorted(f for f in os.listdir(engine_dir) if f.startswith("_engine") and f.endswith(".so")) \
        if os.path.isdir(engine_dir) else []
    mtimes = {f: datetime.datetime.fromtimestamp(os.path.getmtime(os.path.join(engine_dir, f)),
                                                  datetime.timezone.utc).isoformat(timespec="seconds")
              for f in builds}
    dirty = git("status", "--porcelain", "--", "src")
    return {"git_head": git("rev-parse", "--short", "HEAD"),
            "src_uncommitted": dirty.splitlines() if dirty else [],
            "extension_built_utc": mtimes}


def calibrate_cpu_task(target_ms):
    """Iterations of _cpu_task.spin that take about target_ms here (measured once, in
    this process, before any run), so both cpu_isolation contenders do the same work."""
    sys.path.insert(0, HERE)
    try:
        cpu = importlib.import_module("_cpu_task")
    finally:
        sys.path.remove(HERE)
    iterations, per_iteration = cpu.calibrate(target_ms / 1000.0)
    return {"target_ms": target_ms, "iterations": iterations, "ns_per_iteration": per_iteration * 1e9}


def run_all(plan, runs, sizes, params):
    """plan: [(figure, [contenders])]; params: figure -> the PARAM actually passed."""
    env = subprocess_env()
    raw = []
    unavailable = {}
    for run in range(1, runs + 1):
        for figure, contenders in plan:
            n = sizes[figure][0]
            param = params[figure]
            for contender in contenders:
                if contender in unavailable:
                    continue
                result, wall = run_one(contender, figure, n, param, env)
                status = "ok" if "error" not in result else "ERROR: " + result["error"]
                sys.stderr.write(f"[run {run}/{runs}] {figure:<13} {contender:<12} {wall:6.1f}s  {status}\n")
                if result.get("unavailable"):
                    unavailable[contender] = result["error"]
                raw.append({"run": run, "figure": figure, "contender": contender,
                            "wall_s": round(wall, 3), "result": result})
    return raw, unavailable


# --------------------------------------------------------------------------- summarising

def summarize(raw, plan):
    """{figure: {contender: {metric: {median, min, max, values}}}} over successful runs."""
    summary = {}
    for figure, contenders in plan:
        summary[figure] = {}
        for contender in contenders:
            results = [r["result"] for r in raw
                       if r["figure"] == figure and r["contender"] == contender
                       and "error" not in r["result"]]
            errors = [r["result"]["error"] for r in raw
                      if r["figure"] == figure and r["contender"] == contender
                      and "error" in r["result"]]
            metrics = {}
            keys = sorted({k for res in results for k, v in res.items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)})
            for key in keys:
                values = [res[key] for res in results
                          if isinstance(res.get(key), (int, float)) and not isinstance(res.get(key), bool)]
                if values:
                    metrics[key] = {"median": statistics.median(values), "min": min(values),
                                    "max": max(values), "values": values}
            summary[figure][contender] = {"runs_ok": len(results), "errors": errors, "metrics": metrics}
    return summary


def med(summary, figure, contender, key):
    try:
        return summary[figure][contender]["metrics"][key]["median"]
    except KeyError:
        return None


def paired_ratios(raw, figure, key, num, den):
    """Per-run ratios num/den (both from the same run), to show the spread."""
    by_run = {}
    for r in raw:
        if r["figure"] == figure and "error" not in r["result"]:
            v = r["result"].get(key)
            if isinstance(v, (int, float)):
                by_run.setdefault(r["run"], {})[r["contender"]] = v
    out = []
    for vals in by_run.values():
        if vals.get(num) and vals.get(den):
            out.append(vals[num] / vals[den])
    return out


def ratio(a, b):
    return a / b if a is not None and b else None


def goal_status(value, goal, floor, higher_is_better):
    if value is None:
        return "n/a"
    meets = (lambda t: value >= t) if higher_is_better else (lambda t: value <= t)
    if meets(goal):
        return "MET"
    if floor is not None and meets(floor):
        return "FLOOR ONLY"
    return "MISSED"


def compute_ratios_and_goals(summary, raw, figures):
    ours_tps = med(summary, "throughput", "ours", "tasks_per_s")
    ratios = {}
    for other in ("threadpool", "catzilla"):
        ratios[f"throughput_ours_over_{other}"] = {
            "ratio_of_medians": ratio(ours_tps, med(summary, "throughput", other, "tasks_per_s")),
            "per_run": paired_ratios(raw, "throughput", "tasks_per_s", "ours", other),
        }
        ratios[f"critical_p99_{other}_over_ours"] = {
            "ratio_of_medians": ratio(med(summary, "critical", other, "p99_ms"),
                                      med(summary, "critical", "ours", "p99_ms")),
        }
        ratios[f"bytes_per_task_{other}_over_ours"] = {
            "ratio_of_medians": ratio(med(summary, "memory", other, "bytes_per_task_rss"),
                                      med(summary, "memory", "ours", "bytes_per_task_rss")),
        }

    ratios["lateness_p99_asyncio_over_ours"] = {
        "ratio_of_medians": ratio(med(summary, "lateness", "asyncio", "p99_ms"),
                                  med(summary, "lateness", "ours", "p99_ms")),
        "per_run": paired_ratios(raw, "lateness", "p99_ms", "asyncio", "ours"),
    }
    ratios["cpu_isolation_threads_over_process"] = {
        "ratio_of_medians": ratio(med(summary, "cpu_isolation", "ours_threads", "seconds"),
                                  med(summary, "cpu_isolation", "ours_process", "seconds")),
        "per_run": paired_ratios(raw, "cpu_isolation", "seconds", "ours_threads", "ours_process"),
    }

    t = ratios["throughput_ours_over_threadpool"]["ratio_of_medians"]
    p99 = med(summary, "critical", "ours", "p99_ms")
    bpt = med(summary, "memory", "ours", "bytes_per_task_rss")
    g = GOALS
    goals = {
        "throughput_vs_threadpool": dict(g["throughput_vs_threadpool"], value=t, status=goal_status(
            t, g["throughput_vs_threadpool"]["goal"], g["throughput_vs_threadpool"]["floor"], True)),
        "critical_p99_ms": dict(g["critical_p99_ms"], value=p99, status=(
            "n/a" if p99 is None else "MET" if p99 < g["critical_p99_ms"]["goal"] else "MISSED")),
        "bytes_per_task": dict(g["bytes_per_task"], value=bpt, status=goal_status(
            bpt, g["bytes_per_task"]["goal"], g["bytes_per_task"]["floor"], False)),
    }
    late = med(summary, "lateness", "ours", "p99_ms_due_after_submit")
    goals["lateness_p99_ms"] = dict(g["lateness_p99_ms"], value=late, status=(
        "n/a" if late is None else "MET" if late < g["lateness_p99_ms"]["goal"] else "MISSED"))
    speedup = ratios["cpu_isolation_threads_over_process"]["ratio_of_medians"]
    goals["cpu_isolation_speedup"] = dict(g["cpu_isolation_speedup"], value=speedup, status=goal_status(
        speedup, g["cpu_isolation_speedup"]["goal"], g["cpu_isolation_speedup"]["floor"], True))
    sp = ratio(med(summary, "autoscale", "ours_fixed", "seconds"), med(summary, "autoscale", "ours_autoscale", "seconds"))
    ratios["autoscale_fixed_over_auto"] = {"ratio_of_medians": sp}
    goals["autoscale_speedup"] = dict(g["autoscale_speedup"], value=sp, status=(
        "n/a" if sp is None else "MET" if sp >= g["autoscale_speedup"]["goal"] else "MISSED"))
    back = med(summary, "autoscale", "ours_autoscale", "back_to_min_s")
    cool = med(summary, "autoscale", "ours_autoscale", "cooldown_s")
    goals["autoscale_back_to_min_s"] = dict(g["autoscale_back_to_min_s"], value=back, status=(
        "n/a" if back is None else "MET" if back <= cool + 5 else "MISSED"))
    nr = ratio(med(summary, "autoscale_noop", "ours_autoscale", "tasks_per_s"),
               med(summary, "autoscale_noop", "ours_fixed", "tasks_per_s"))
    ratios["autoscale_noop_auto_over_fixed"] = {"ratio_of_medians": nr}
    goals["autoscale_noop_ratio"] = dict(g["autoscale_noop_ratio"], value=nr, status=(
        "n/a" if nr is None else "MET" if nr >= g["autoscale_noop_ratio"]["goal"] else "MISSED"))
    for figure in ("compile_add", "compile_loop"):
        for other in ("ours_python", "threadpool"):
            ratios[f"{figure}_native_over_{other}"] = {
                "ratio_of_medians": ratio(med(summary, figure, "ours_native", "tasks_per_s"),
                                          med(summary, figure, other, "tasks_per_s")),
                "per_run": paired_ratios(raw, figure, "tasks_per_s", "ours_native", other),
            }
    v = med(summary, "compile_add", "ours_native", "tasks_per_s")
    goals["compile_native_add_per_s"] = dict(g["compile_native_add_per_s"], value=v, status=goal_status(
        v, g["compile_native_add_per_s"]["goal"], g["compile_native_add_per_s"]["floor"], True))
    v = med(summary, "compile_loop", "ours_native", "scaling_w2_over_w1")
    goals["compile_loop_scaling"] = dict(g["compile_loop_scaling"], value=v, status=goal_status(
        v, g["compile_loop_scaling"]["goal"], None, True))
    goals = {k: v for k, v in goals.items() if GOAL_FIGURE[k] in figures}
    return ratios, goals


# --------------------------------------------------------------------------- table

def fmt_int(v):
    return "-" if v is None else f"{v:,.0f}"


def fmt_ms(v):
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:,.1f}"


def fmt_x(v):
    return "-" if v is None else f"{v:,.1f}x" if v >= 10 else f"{v:.2f}x"


def fmt_s(v):
    return "-" if v is None else f"{v:.2f}"


def fmt_mib(v):
    return "-" if v is None else f"{v / 2**20:,.1f}"


def spread(summary, figure, contender, key, fmt):
    m = summary[figure].get(contender, {}).get("metrics", {}).get(key)
    if not m:
        return "-"
    return f"{fmt(m['min'])}..{fmt(m['max'])}"


def table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def missing_row(summary, figure, contender, unavailable, ncols, notes):
    """A short placeholder row for a contender without results; the reason goes to notes."""
    entry = summary[figure].get(contender)
    if contender in unavailable:
        short, why = "n/a", unavailable[contender]
    elif entry is None or entry["runs_ok"] == 0:
        short, why = "failed", ((entry or {}).get("errors") or ["not run"])[-1]
    else:
        return None
    notes.append(f"   {LABELS[contender]}: {short}: {why}")
    return [LABELS[contender], short] + [""] * (ncols - 2)


def render(meta, summary, ratios, goals, plan, unavailable):
    """plan: {figure: [contenders]} of the figures that ran."""
    out = []
    sizes = meta["sizes"]
    out.append(f"catzilla_tasks benchmarks ({meta['mode']}): median of {meta['runs']} alternating runs "
               "(each figure's contenders in turn), each measurement in a fresh process")
    out.append(f"python {meta['python']} ({meta['executable']}), {meta['cpus']} CPUs, {meta['platform']}")
    src = meta.get("source") or {}
    dirty = len(src.get("src_uncommitted") or [])
    out.append(f"engine: git {src.get('git_head') or '?'}"
               + (f" + {dirty} uncommitted file(s) under src/" if dirty else "")
               + "".join(f", {f} built {t}" for f, t in (src.get("extension_built_utc") or {}).items()))
    if meta.get("source_changed_during_run"):
        out.append("WARNING: src/ or the extension changed during the run: the figures mix builds; run again")
    out.append("")

    # 1. throughput
    if "throughput" in plan:
        contenders = plan["throughput"]
        n = sizes["throughput"][0]
        out.append(f"1. End-to-end throughput: {n:,} no-op tasks, submit -> executed -> result available, 4 workers")
        headers = ["contender", "tasks/s", "min..max", "submit/s", "peak RSS MiB", "ours / this", "goal", "status"]
        rows, notes = [], []
        for c in contenders:
            miss = missing_row(summary, "throughput", c, unavailable, len(headers), notes)
            if miss:
                rows.append(miss)
                continue
            r = None if c == "ours" else ratios[f"throughput_ours_over_{c}"]["ratio_of_medians"]
            goal = goals["throughput_vs_threadpool"] if c == "threadpool" else None
            rows.append([LABELS[c], fmt_int(med(summary, "throughput", c, "tasks_per_s")),
                         spread(summary, "throughput", c, "tasks_per_s", fmt_int),
                         fmt_int(med(summary, "throughput", c, "submit_tasks_per_s")),
                         fmt_mib(med(summary, "throughput", c, "peak_rss_bytes")),
                         "" if c == "ours" else fmt_x(r),
                         goal["text"] if goal else "", goal["status"] if goal else ""])
        out.append(table(headers, rows))
        out.extend(notes)
        for other in ("threadpool", "catzilla"):
            pr = ratios[f"throughput_ours_over_{other}"]["per_run"]
            if pr:
                out.append(f"   per-run ours/{other}: {', '.join(fmt_x(x) for x in pr)}")
        if med(summary, "throughput", "catzilla", "tasks_per_s") is not None:
            out.append("   catzilla: completion counted through side effects (its TaskResult.wait()/is_ready() never "
                       "report completion)")
        out.append("")

    # 2. critical
    if "critical" in plan:
        contenders = plan["critical"]
        backlog, probes = sizes["critical"]
        out.append(f"2. Queue wait of a high-priority task while NORMAL no-ops are queued: {backlog:,} queued, then "
                   f"{probes:,} probes one at a time (submit, wait, next)")
        out.append(f"   while NORMAL tasks remain; when the backlog is drained it is refilled to {backlog:,} (a round)")
        headers = ["contender", "probe", "p50 ms", "p99 ms", "max ms", "probes", "rounds",
                   "NORMAL ahead (median/min)", "NORMAL left at end", "this / ours p99", "goal", "status"]
        rows, notes = [], []
        for c in contenders:
            miss = missing_row(summary, "critical", c, unavailable, len(headers), notes)
            if miss:
                rows.append(miss)
                continue
            r = None if c == "ours" else ratios[f"critical_p99_{c}_over_ours"]["ratio_of_medians"]
            goal = goals["critical_p99_ms"] if c == "ours" else None
            m = lambda key: med(summary, "critical", c, key)  # noqa: E731
            rows.append([LABELS[c], "FIFO (no priorities)" if c == "threadpool" else "CRITICAL",
                         fmt_ms(m("p50_ms")), fmt_ms(m("p99_ms")), fmt_ms(m("max_ms")),
                         fmt_int(m("probes")), fmt_int(m("rounds")),
                         f"{fmt_int(m('median_backlog_at_submit'))}/{fmt_int(m('min_backlog_at_submit'))}",
                         fmt_int(m("normal_remaining_at_last_probe")),
                         "" if c == "ours" else fmt_x(r),
                         goal["text"] if goal else "", goal["status"] if goal else ""])
        out.append(table(headers, rows))
        out.extend(notes)
        out.append("   ours: TaskResult.get_stats()['queue_wait_ms']; baselines: harness clock, submit call -> task "
                   "started. NORMAL ahead: queued NORMAL tasks when each probe was submitted.")
        h50, h99 = med(summary, "critical", "ours", "p50_ms_harness"), med(summary, "critical", "ours", "p99_ms_harness")
        if h99 is not None:
            out.append(f"   ours on the harness clock (same as the baselines): p50 {fmt_ms(h50)} ms, p99 {fmt_ms(h99)} ms")
        if med(summary, "critical", "threadpool", "p99_ms") is not None:
            out.append("   ThreadPoolExecutor is FIFO: each probe waits behind the whole backlog and the next one finds "
                       "the queue empty, so it gets one probe per round (3 rounds).")
        out.append("")

    # 3. memory
    if "memory" in plan:
        contenders = plan["memory"]
        n = sizes["memory"][0]
        out.append(f"3. Memory per queued no-op task: {n:,} tasks queued (workers stopped), their result handles held")
        headers = ["contender", "B/task RSS", "min..max", "B/task tracemalloc", "B/task engine slab",
                   "B/task all-in", "peak RSS MiB (queued)", "this / ours", "goal", "status"]
        rows, notes = [], []
        for c in contenders:
            miss = missing_row(summary, "memory", c, unavailable, len(headers), notes)
            if miss:
                rows.append(miss)
                continue
            r = None if c == "ours" else ratios[f"bytes_per_task_{c}_over_ours"]["ratio_of_medians"]
            goal = goals["bytes_per_task"] if c == "ours" else None
            rows.append([LABELS[c], fmt_int(med(summary, "memory", c, "bytes_per_task_rss")),
                         spread(summary, "memory", c, "bytes_per_task_rss", fmt_int),
                         fmt_int(med(summary, "memory", c, "bytes_per_task_tracemalloc")),
                         fmt_int(med(summary, "memory", c, "slab_bytes_per_task")),
                         fmt_int(med(summary, "memory", c, "bytes_per_task_rss_all_in")),
                         fmt_mib(med(summary, "memory", c, "peak_rss_queued_bytes")),
                         "" if c == "ours" else fmt_x(r),
                         goal["text"] if goal else "", goal["status"] if goal else ""])
        out.append(table(headers, rows))
        out.extend(notes)
        out.append("   B/task RSS: RSS growth from queueing, engine already running (the goal's figure); all-in also "
                   "counts creating the engine. tracemalloc sees the Python heap only, not C malloc/mmap.")
        out.append("")

    # 4. lateness
    if "lateness" in plan:
        contenders = plan["lateness"]
        n, spread_ms = sizes["lateness"]
        out.append(f"4. Lateness of {n:,} delayed tasks, delays spread evenly over 0..{spread_ms:,} ms, submitted at once "
                   "in random order; lateness = task start - (submit + delay)")
        headers = ["contender", "p50 ms", "p99 ms", "min..max p99", "max ms", "early", "> 2 ms",
                   "submit us/task", "p99 due after submit", "this / ours p99", "goal", "status"]
        rows, notes = [], []
        for c in contenders:
            miss = missing_row(summary, "lateness", c, unavailable, len(headers), notes)
            if miss:
                rows.append(miss)
                continue
            m = lambda key: med(summary, "lateness", c, key)  # noqa: E731
            r = None if c == "ours" else ratios[f"lateness_p99_{c}_over_ours"]["ratio_of_medians"]
            goal = goals["lateness_p99_ms"] if c == "ours" else None
            rows.append([LABELS[c], fmt_ms(m("p50_ms")), fmt_ms(m("p99_ms")),
                         spread(summary, "lateness", c, "p99_ms", fmt_ms), fmt_ms(m("max_ms")),
                         fmt_int(m("early")), fmt_int(m("over_2ms")), fmt_ms(m("submit_us_per_task")),
                         fmt_ms(m("p99_ms_due_after_submit")),
                         "" if c == "ours" else fmt_x(r),
                         goal["text"] if goal else "", goal["status"] if goal else ""])
        out.append(table(headers, rows))
        out.extend(notes)
        out.append("   ours: tasks.options(delay_ms=d).add_task(task, i); asyncio: loop.call_soon_threadsafe("
                   "loop.call_later, d, task, i) to a loop running in a thread.")
        out.append("   Each task stores time.monotonic() when it starts; submit = time.monotonic() just before its "
                   "call. early: tasks started before due (should be 0).")
        out.append("   p99 due after submit: only tasks due after the submit loop ended (the loop holds the GIL, "
                   "so tasks due during it also wait for the GIL).")
        due_after = med(summary, "lateness", "ours", "due_after_submit")
        in_timer = med(summary, "lateness", "ours", "scheduled_after_submit")
        if in_timer is not None:
            out.append(f"   ours: stats()['scheduled'] right after the submit loop: {fmt_int(in_timer)} tasks in the "
                       f"C timer (tasks due after the loop: {fmt_int(due_after)})")
        pr = ratios["lateness_p99_asyncio_over_ours"]["per_run"]
        if pr:
            out.append(f"   per-run asyncio/ours p99: {', '.join(fmt_x(x) for x in pr)}")
        out.append("")

    # 5. cpu_isolation
    if "cpu_isolation" in plan:
        contenders = plan["cpu_isolation"]
        n = sizes["cpu_isolation"][0]
        cal = meta.get("cpu_task") or {}
        out.append(f"5. CPU isolation: {n} CPU-bound pure-Python tasks (about {cal.get('target_ms', '?')} ms each alone), "
                   "first submit -> all results (wait()), engine workers=4")
        its = cal.get("iterations")
        out.append(f"   _cpu_task.spin({'?' if its is None else f'{its:,}'}) (calibrated once in run.py); "
                   "the process pool is warmed by 2 overlapping tiny process tasks, so child start-up is not measured")
        headers = ["contender", "wall s", "min..max", "one task alone s", "wall / one task", "pids",
                   "threads / this", "goal", "status"]
        rows, notes = [], []
        for c in contenders:
            miss = missing_row(summary, "cpu_isolation", c, unavailable, len(headers), notes)
            if miss:
                rows.append(miss)
                continue
            m = lambda key: med(summary, "cpu_isolation", c, key)  # noqa: E731
            is_proc = c == "ours_process"
            r = ratios["cpu_isolation_threads_over_process"]["ratio_of_medians"] if is_proc else None
            goal = goals["cpu_isolation_speedup"] if is_proc else None
            rows.append([LABELS[c], fmt_s(m("seconds")), spread(summary, "cpu_isolation", c, "seconds", fmt_s),
                         fmt_s(m("one_task_alone_s")), fmt_x(m("seconds_over_one_task")),
                         fmt_int(m("distinct_pids")), fmt_x(r) if is_proc else "",
                         goal["text"] if goal else "", goal["status"] if goal else ""])
        out.append(table(headers, rows))
        out.extend(notes)
        out.append("   pids: distinct processes the tasks ran in (thread tasks: the parent). On 2 cores the ideal is "
                   "threads ~4x one task (the GIL), process ~2x (2 children).")
        pr = ratios["cpu_isolation_threads_over_process"]["per_run"]
        if pr:
            out.append(f"   per-run threads/process: {', '.join(fmt_x(x) for x in pr)}")
        out.append("")

    # 6. auto-scaling
    if "autoscale" in plan or "autoscale_noop" in plan:
        out.append("6. Auto-scaling: tasks sleeping 20 ms each, pool starting at 2 workers (max 64); then no-op "
                   "tasks (CPU-bound: scaling must not add threads that slow them down)")
        headers = ["contender", "figure", "wall s", "tasks/s", "peak workers", "back at min after s", "workers after"]
        rows = []
        for figure in ("autoscale", "autoscale_noop"):
            if figure not in plan:
                continue
            for c in plan[figure]:
                m = lambda key: med(summary, figure, c, key)  # noqa: E731
                rows.append([LABELS[c], figure, fmt_s(m("seconds")), fmt_int(m("tasks_per_s")),
                             fmt_int(m("peak_workers")) if figure == "autoscale" else "",
                             fmt_s(m("back_to_min_s")) if figure == "autoscale" and c == "ours_autoscale" else "",
                             fmt_int(m("workers_after"))])
        out.append(table(headers, rows))
        out.append("")

    # 7. compiled tasks
    if "compile_add" in plan or "compile_loop" in plan:
        out.append("7. Compiled tasks: tasks.map(f, items) with f compiled to native code (numba; several items per "
                   "engine node, no GIL) vs the same f as Python tasks (one task per item) vs "
                   "ThreadPoolExecutor(w).map; w = 1 then 2 workers/threads")
        out.append("   add(a, b) -> a + b; loop: 100 iterations of x = (x*x + b + i) % 1000003. Timed from the call "
                   "to the results. Native: int64 array.array columns in, out='array' (the workers read and write "
                   "the buffers, no Python object per item); Python tasks and threads: argument tuples in, a list out.")
        headers = ["contender", "figure", "N", "tasks/s w=1", "tasks/s w=2", "min..max w=2", "w2/w1",
                   "native / this", "items per node"]
        rows, notes = [], []
        for figure in ("compile_add", "compile_loop"):
            if figure not in plan:
                continue
            for c in plan[figure]:
                miss = missing_row(summary, figure, c, unavailable, len(headers), notes)
                if miss:
                    rows.append(miss)
                    continue
                m = lambda key: med(summary, figure, c, key)  # noqa: E731
                r = None if c == "ours_native" else ratios[f"{figure}_native_over_{c}"]["ratio_of_medians"]
                rows.append([LABELS[c] if c != "threadpool" else "ThreadPoolExecutor(w)", figure, fmt_int(m("n")),
                             fmt_int(m("tasks_per_s_w1")), fmt_int(m("tasks_per_s_w2")),
                             spread(summary, figure, c, "tasks_per_s_w2", fmt_int), fmt_x(m("scaling_w2_over_w1")),
                             "" if r is None else fmt_x(r),
                             fmt_int(m("items_per_node")) if c == "ours_native" else "1"])
        out.append(table(headers, rows))
        out.extend(notes)
        for figure in ("compile_add", "compile_loop"):
            lw1 = med(summary, figure, "ours_native", "list_tasks_per_s_w1")
            lw2 = med(summary, figure, "ours_native", "list_tasks_per_s_w2")
            if lw1 is not None and lw2 is not None:
                out.append(f"   {figure}, native through lists of argument tuples (a list of results) instead: "
                           f"{fmt_int(lw1)} / {fmt_int(lw2)} tasks/s at w=1 / w=2 ({fmt_x(lw2 / lw1)})")
        single = med(summary, "compile_add", "ours_native", "add_task_per_s_w2")
        if single is not None:
            out.append(f"   compiled add through single add_task calls (one native task and TaskResult each, "
                       f"w=2): {fmt_int(single)} tasks/s")
        raw_s = med(summary, "compile_loop", "ours_native", "raw_scaling_t2_over_t1")
        if raw_s is not None:
            out.append(f"   the machine's own ceiling in the same runs: the compiled loop from 1 vs 2 plain threads, "
                       f"no engine: {fmt_x(raw_s)} (median)")
            per = summary["compile_loop"]["ours_native"]["metrics"]
            out.append("   per run, loop w2/w1 through the engine: "
                       + ", ".join(fmt_x(v) for v in per["scaling_w2_over_w1"]["values"])
                       + "; plain threads: " + ", ".join(fmt_x(v) for v in per["raw_scaling_t2_over_t1"]["values"]))
        load = med(summary, "compile_add", "ours_native", "compile_or_load_s")
        if load is not None:
            out.append(f"   compile or load from the disk cache at decoration (numba import included): {fmt_s(load)} s")
        out.append("")

    acted = []
    for figure, per in summary.items():
        for c, entry in per.items():
            m = entry.get("metrics", {}).get("scaler_decisions")
            if m and m["max"] > 0:
                top = entry["metrics"].get("scaler_max_workers")
                acted.append(f"{figure}/{c} (decisions per run {m['min']:.0f}..{m['max']:.0f}"
                             + (f", up to {top['max']:.0f} workers" if top else "") + ")")
    if any("scaler_decisions" in e.get("metrics", {}) for per in summary.values() for e in per.values()):
        out.append("Auto-scaling (on by default in ours' engines): "
                   + ("resized the pool in " + "; ".join(acted) if acted else "resized no pool in any run"))
        out.append("")

    out.append("Goals (ours)")
    rows = []
    names = {"throughput_vs_threadpool": "throughput, ours / ThreadPoolExecutor(4)",
             "critical_p99_ms": "CRITICAL queue wait p99 (ms)",
             "bytes_per_task": "bytes per queued task (RSS)",
             "lateness_p99_ms": "delayed task lateness p99, light load (ms)",
             "cpu_isolation_speedup": "CPU tasks, threads / isolation=process",
             "autoscale_speedup": "2,000 x 20 ms sleeps: fixed 2 / auto-scaling",
             "autoscale_back_to_min_s": "back at min_workers after the load (s)",
             "autoscale_noop_ratio": "no-op tasks/s: auto-scaling / fixed",
             "compile_native_add_per_s": "compiled add through map, 2 workers (tasks/s)",
             "compile_loop_scaling": "compiled loop through map, 2 / 1 workers"}
    for key, g in goals.items():
        v = g["value"]
        shown = "-" if v is None else fmt_x(v) if key in ("throughput_vs_threadpool", "cpu_isolation_speedup",
                                                         "autoscale_speedup", "autoscale_noop_ratio",
                                                         "compile_loop_scaling") \
            else fmt_s(v) if key == "autoscale_back_to_min_s" \
            else fmt_ms(v) if key in ("critical_p99_ms", "lateness_p99_ms") else fmt_int(v)
        rows.append([names[key], shown, g["text"], g["status"]])
    out.append(table(["figure", "ours", "goal", "status"], rows))
    return "\n".join(out)


# --------------------------------------------------------------------------- main

def parse_args(argv):
    def at_least_3(text):
        value = int(text)
        if value < 3:
            raise argparse.ArgumentTypeError("need at least 3 runs for a median")
        return value

    def names(text):
        return [x.strip() for x in text.split(",") if x.strip()]

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small sizes (20,000 tasks, 20,000 backlog, 200 probes, 5,000 delayed tasks over 1 s, "
                        "0.15 s CPU tasks) for a smoke test")
    p.add_argument("--runs", type=at_least_3, default=3, help="alternating runs per figure (>= 3, default 3)")
    p.add_argument("--json", default=DEFAULT_JSON, help="where to write results (default %(default)s)")
    p.add_argument("--contenders", type=names, default=list(CONTENDERS),
                   help="comma-separated subset of: " + ", ".join(CONTENDERS)
                        + " ('ours' also selects ours_process and ours_threads)")
    p.add_argument("--figures", type=names, default=list(FIGURES) + list(SUITES),
                   help="comma-separated subset of: " + ", ".join(list(FIGURES) + list(SUITES)))
    args = p.parse_args(argv)
    args.suites = [f for f in args.figures if f in SUITES]
    args.figures = [f for f in args.figures if f not in SUITES]
    if args.suites and not args.figures:
        args.plan = []
        return args
    bad = [c for c in args.contenders if c not in CONTENDERS]
    if bad or not args.contenders:
        p.error(f"unknown contender(s) {bad}; choose from {', '.join(CONTENDERS)}")
    bad = [f for f in args.figures if f not in FIGURES]
    if bad or not (args.figures or args.suites):
        p.error(f"unknown figure(s) {bad}; choose from {', '.join(FIGURES)}")
    chosen = set(args.contenders)
    # figures in table order, each with its own contenders that were chosen (by name or family)
    args.plan = [(f, [c for c in FIGURES[f]["contenders"] if c in chosen or FAMILIES[c] in chosen])
                 for f in FIGURES if f in args.figures]
    args.plan = [(f, cs) for f, cs in args.plan if cs]
    if not args.plan:
        p.error("none of the chosen figures has any of the chosen contenders")
    return args


def main(argv=None):
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    plan = args.plan
    figures = [f for f, _cs in plan]
    sizes = {f: SIZES[mode][f] for f in figures}
    started = datetime.datetime.now(datetime.timezone.utc)
    source_before = source_state()
    params = {f: sizes[f][1] for f in figures}
    cpu_task = None
    if "cpu_isolation" in sizes:
        cpu_task = calibrate_cpu_task(sizes["cpu_isolation"][1])
        params["cpu_isolation"] = cpu_task["iterations"]
        sys.stderr.write(f"cpu_isolation: _cpu_task.spin({cpu_task['iterations']:,}) takes about "
                         f"{cpu_task['target_ms']} ms here\n")
    raw, unavailable = run_all(plan, args.runs, sizes, params)
    summary = summarize(raw, plan)
    ratios, goals = compute_ratios_and_goals(summary, raw, figures)
    meta = {
        "mode": mode,
        "runs": args.runs,
        "order": "for each run: for each figure: its contenders in turn",
        "plan": {f: cs for f, cs in plan},
        "sizes": {k: list(v) for k, v in sizes.items()},
        "params_passed": params,
        "cpu_task": cpu_task,
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source_before,
        "source_changed_during_run": source_state() != source_before,
        "command": " ".join([os.path.relpath(__file__, REPO)] + (argv if argv is not None else sys.argv[1:])),
    }
    if plan:
        print(render(meta, summary, ratios, goals, dict(plan), unavailable))
    suites = run_suites(args.suites, args.runs, args.quick)

    doc = {"meta": meta, "unavailable": unavailable, "goals": goals, "ratios": ratios,
           "summary": summary, "raw": raw, "suites": suites}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\nJSON: {os.path.relpath(os.path.abspath(args.json), os.getcwd())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
