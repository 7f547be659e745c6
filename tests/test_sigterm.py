"""SIGTERM in a plain program: the engine stops accepting, runs what is queued, then exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# One worker held by a task that runs until the engine's shutdown begins, then 5 queued tasks:
# at SIGTERM they are still queued (the worker is busy), so the output shows whether they ran.
PROGRAM = textwrap.dedent("""
    import os, signal, sys, threading
    from catzilla_tasks import BackgroundTasks

    out = sys.argv[1]
    mode = sys.argv[2]

    def record(i):
        with open(out, "a") as f:
            f.write(f"{i}\\n")

    if mode == "chain":
        def previous(signum, frame):
            record("previous handler")
            raise SystemExit(7)
        signal.signal(signal.SIGTERM, previous)
    kw = {"handle_sigterm": False} if mode == "flag_off" else {}
    if mode == "thread":  # created off the main thread: no handler can be installed there
        box = []
        t = threading.Thread(target=lambda: box.append(BackgroundTasks(workers=1, min_workers=1,
                                                                        enable_auto_scaling=False)))
        t.start(); t.join()
        tasks = box[0]
    else:
        tasks = BackgroundTasks(workers=1, min_workers=1, enable_auto_scaling=False, **kw)
    gate = threading.Event()
    started = threading.Event()
    def blocker():  # runs until the engine stops accepting (shutdown began), at most 30 s
        started.set()
        for _ in range(6000):
            if gate.wait(0.005) or not tasks.stats()["accepting"]:
                break
    tasks.add_task(blocker)
    started.wait()
    for i in range(5):
        tasks.add_task(record, i)
    try:  # the readiness line comes from inside the try: SIGTERM may arrive right after it
        print("handler:", repr(signal.getsignal(signal.SIGTERM)), "queued:", tasks.stats()["queued_total"], flush=True)
        threading.Event().wait()
    finally:
        record("finally")
""")


def run(tmp_path: Path, mode: str, env: dict[str, str] | None = None) -> tuple[int, list[str], str]:
    out = tmp_path / "out.txt"
    e = dict(os.environ, PYTHONPATH=str(REPO / "src"), **(env or {}))
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM, str(out), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=e)
    first = proc.stdout.readline()  # the readiness line: 5 tasks queued behind the blocker
    assert "queued: 5" in first, (first, proc.stderr.read() if proc.poll() is not None else "")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    lines = out.read_text().splitlines() if out.exists() else []
    return proc.returncode, lines, first + stdout + stderr


def test_sigterm_runs_queued_tasks_then_exits_143(tmp_path):
    rc, lines, output = run(tmp_path, "default")
    assert "_on_sigterm" in output
    assert lines == ["0", "1", "2", "3", "4", "finally"], output
    assert rc == 128 + signal.SIGTERM, output
    assert "finishing 6 unfinished task(s) of 1 engine(s)" in output


def test_sigterm_chains_the_previous_python_handler(tmp_path):
    rc, lines, output = run(tmp_path, "chain")
    assert lines == ["0", "1", "2", "3", "4", "previous handler", "finally"], output
    assert rc == 7, output


def test_opt_out_by_flag_and_env_leaves_the_default(tmp_path):
    for mode, env in (("flag_off", None), ("default", {"CATZILLA_TASKS_SIGTERM": "0"})):
        rc, lines, output = run(tmp_path, mode, env)
        assert "SIG_DFL" in output
        assert rc == -signal.SIGTERM, output  # killed at once: the queued tasks are lost
        assert lines == [], output


def test_not_installed_off_the_main_thread(tmp_path):
    rc, lines, output = run(tmp_path, "thread")
    assert "SIG_DFL" in output and rc == -signal.SIGTERM, output
