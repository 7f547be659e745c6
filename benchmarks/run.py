"""Benchmarks: catzilla_tasks against ThreadPoolExecutor(4) and catzilla 0.2.3.

    python benchmarks/run.py [--quick] [--runs N] [--json PATH] [--contenders a,b,c]

Every measurement runs in a fresh subprocess (benchmarks/_contenders.py), in
alternating order: for each run, for each figure, ours, threadpool, catzilla.
The table shows the median over the runs (min-max beside it) and ratios of
medians; the JSON file keeps every raw run. See benchmarks/README.md.
"""
import argparse
import datetime
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

CONTENDERS = ("ours", "threadpool", "catzilla")
LABELS = {
    "ours": "catzilla_tasks",
    "threadpool": "ThreadPoolExecutor(4)",
    "catzilla": "catzilla 0.2.3",
}
FIGURES = ("throughput", "critical", "memory")

# (n, probes) per figure
SIZES = {
    "full": {"throughput": (200_000, 0), "critical": (100_000, 2_000), "memory": (100_000, 0)},
    "quick": {"throughput": (20_000, 0), "critical": (20_000, 200), "memory": (20_000, 0)},
}

GOALS = {
    "throughput_vs_threadpool": {"goal": 25.0, "floor": 15.0, "text": ">= 25x (floor 15x)"},
    "critical_p99_ms": {"goal": 1.0, "floor": None, "text": "p99 < 1 ms"},
    "bytes_per_task": {"goal": 128.0, "floor": 200.0, "text": "<= 128 B (floor 200)"},
}

SUBPROCESS_TIMEOUT_S = 1800


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


def run_all(contenders, runs, sizes):
    env = subprocess_env()
    raw = []
    unavailable = {}
    for run in range(1, runs + 1):
        for figure in FIGURES:
            n, probes = sizes[figure]
            for contender in contenders:
                if contender in unavailable:
                    continue
                result, wall = run_one(contender, figure, n, probes, env)
                status = "ok" if "error" not in result else "ERROR: " + result["error"]
                sys.stderr.write(f"[run {run}/{runs}] {figure:<10} {contender:<10} {wall:6.1f}s  {status}\n")
                if result.get("unavailable"):
                    unavailable[contender] = result["error"]
                raw.append({"run": run, "figure": figure, "contender": contender,
                            "wall_s": round(wall, 3), "result": result})
    return raw, unavailable


# --------------------------------------------------------------------------- summarising

def summarize(raw, contenders):
    """{figure: {contender: {metric: {median, min, max, values}}}} over successful runs."""
    summary = {}
    for figure in FIGURES:
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


def compute_ratios_and_goals(summary, raw):
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


def render(meta, summary, ratios, goals, contenders, unavailable):
    out = []
    sizes = meta["sizes"]
    out.append(f"catzilla_tasks benchmarks ({meta['mode']}): median of {meta['runs']} alternating runs "
               f"({', '.join(contenders)} in turn), each measurement in a fresh process")
    out.append(f"python {meta['python']} ({meta['executable']}), {meta['cpus']} CPUs, {meta['platform']}")
    out.append("")

    # 1. throughput
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

    out.append("Goals (ours)")
    rows = []
    names = {"throughput_vs_threadpool": "throughput, ours / ThreadPoolExecutor(4)",
             "critical_p99_ms": "CRITICAL queue wait p99 (ms)",
             "bytes_per_task": "bytes per queued task (RSS)"}
    for key, g in goals.items():
        v = g["value"]
        shown = "-" if v is None else fmt_x(v) if key == "throughput_vs_threadpool" else \
            fmt_ms(v) if key == "critical_p99_ms" else fmt_int(v)
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

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small sizes (20,000 tasks, 20,000 backlog, 200 probes) for a smoke test")
    p.add_argument("--runs", type=at_least_3, default=3, help="alternating runs per figure (>= 3, default 3)")
    p.add_argument("--json", default=DEFAULT_JSON, help="where to write results (default %(default)s)")
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help="comma-separated subset of: " + ", ".join(CONTENDERS))
    args = p.parse_args(argv)
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    bad = [c for c in args.contenders if c not in CONTENDERS]
    if bad or not args.contenders:
        p.error(f"unknown contender(s) {bad}; choose from {', '.join(CONTENDERS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    sizes = SIZES[mode]
    started = datetime.datetime.now(datetime.timezone.utc)
    raw, unavailable = run_all(args.contenders, args.runs, sizes)
    summary = summarize(raw, args.contenders)
    ratios, goals = compute_ratios_and_goals(summary, raw)
    meta = {
        "mode": mode,
        "runs": args.runs,
        "order": "for each run: for each figure: " + ", ".join(args.contenders),
        "sizes": {k: list(v) for k, v in sizes.items()},
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(__file__, REPO)] + (argv if argv is not None else sys.argv[1:])),
    }
    print(render(meta, summary, ratios, goals, args.contenders, unavailable))

    doc = {"meta": meta, "unavailable": unavailable, "goals": goals, "ratios": ratios,
           "summary": summary, "raw": raw}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\nJSON: {os.path.relpath(os.path.abspath(args.json), os.getcwd())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
