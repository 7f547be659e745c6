"""Periodic tasks on a Redis engine fire once per tick across every process that declares them
(issue 19, part 1): one Lua claim per tick (brokers/schedules.py). Against a real redis-server,
with the declaring processes as subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from redis_helpers import prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)
from test_redis_broker import Cluster

from catzilla_tasks import BackgroundTasks
from catzilla_tasks.brokers import RedisBroker
from catzilla_tasks.brokers.schedules import list_schedules

TESTS = os.path.dirname(os.path.abspath(__file__))
NAME = "redis_periodic_tasks.beat"


def _env(url, prefix, **extra):
    env = dict(os.environ, CT_TEST_REDIS_URL=url, CT_TEST_PREFIX=prefix,
               PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def declarer(url, prefix, **extra) -> subprocess.Popen:
    """A process that only declares the schedule (a web process, say): imports the module, waits."""
    return subprocess.Popen([sys.executable, "-c", "import redis_periodic_tasks, time; time.sleep(120)"],
                            env=_env(url, prefix, **extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def cli(url, prefix, *args, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "catzilla_tasks.cli", *args], env=_env(url, prefix, **extra),
                          capture_output=True, text=True, timeout=60)


def schedule(r, prefix) -> dict:
    return {k.decode(): v.decode() for k, v in r.hgetall(f"{prefix}:default:sched:{NAME}").items()}


@pytest.fixture
def cluster(redis_url, prefix, monkeypatch):
    monkeypatch.setenv("CT_TEST_PREFIX", prefix)
    c = Cluster(redis_url, prefix, monkeypatch)
    yield c
    c.close()


def runner(cluster, concurrency=8):
    """A worker in this process that runs the schedule's runs (without declaring it here)."""
    from catzilla_tasks.brokers import schedules

    schedules._declaring = False
    try:
        import redis_periodic_tasks as m
    finally:
        schedules._declaring = True
    eng = cluster.engine()
    eng._registered[NAME] = m.beat
    return cluster.worker(concurrency=concurrency, engine=eng)


def _kill(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        if p.stderr:
            p.stderr.close()


@pytest.mark.timeout(120)
def test_three_declarers_fire_a_0_2_s_schedule_25_times_in_5_s_not_75_and_survive_a_kill(cluster):
    r, prefix = cluster.r, cluster.prefix
    w = runner(cluster)
    # overlap=True: what is counted is the ticks, not how fast this process's worker ends each
    # run (with overlap=False a run still held when the next tick came, 0.2 s later on a loaded
    # machine, skipped that tick: runs + missed 15 with the worker's commits slowed by 0.35 s)
    procs = [declarer(cluster.url, prefix, CT_TEST_EVERY=0.2, CT_TEST_OVERLAP=1) for _ in range(3)]
    try:
        wait_until(lambda: r.exists(f"{prefix}:default:sched:{NAME}"), 30, "the schedule to be declared")
        t0 = time.monotonic()
        wait_until(lambda: len(schedule(r, prefix).get("next", "")) > 0, 5, "its first due time")
        wait_until(lambda: r.zcard(f"{prefix}:default:sched:{NAME}:who") == 3, 30, "three declarers")
        # the passage of time is what is tested: 2.5 s with three declarers, 2.5 s with two
        time.sleep(max(0.0, t0 + 2.5 - time.monotonic()))
        os.kill(procs[0].pid, signal.SIGKILL)
        half = int(schedule(r, prefix).get("runs", 0))
        time.sleep(max(0.0, t0 + 5.0 - time.monotonic()))
    finally:
        _kill(procs)
    # read once every declarer is gone: a claim (one Lua call: count and enqueue) is whole or absent
    s = schedule(r, prefix)
    runs, missed = int(s.get("runs", 0)), int(s.get("missed", 0))
    print(f"5 s, 3 declarers (one killed at 2.5 s): runs={runs} missed={missed} runs at the kill={half}")
    assert 23 <= runs + missed <= 27, s          # one run per tick: 25 ticks in 5 s, not 75
    assert runs >= 21, s                         # (a tick claimed more than 0.2 s late skips the missed one)
    assert runs - half >= 10, (half, s)          # two declarers left: it went on firing
    assert int(s.get("skipped", 0)) == 0
    # every run is queued once: the worker runs exactly those
    wait_until(lambda: w.counts["succeeded"] >= runs, 30, "the runs to be run")
    assert r.llen(f"{prefix}:beats") == runs
    assert w.counts["dead_lettered"] == 0


@pytest.mark.timeout(120)
def test_overlap_false_skips_ticks_while_the_last_run_is_running_cluster_wide(cluster):
    r, prefix = cluster.r, cluster.prefix
    os.environ["CT_TEST_SLEEP"] = "0.5"  # each run takes 0.5 s; a tick every 0.1 s
    try:
        procs = [declarer(cluster.url, prefix, CT_TEST_EVERY=0.1, CT_TEST_SLEEP=0.5) for _ in range(2)]
        try:
            w = runner(cluster)
            wait_until(lambda: r.llen(f"{prefix}:beats") >= 4, 30, "four runs")
        finally:
            _kill(procs)
        w.stop()
        wait_until(lambda: w.stats()["in_flight"] == 0, 30, "the last run to end")
    finally:
        os.environ.pop("CT_TEST_SLEEP", None)
    spans = sorted(tuple(map(float, x.decode().split(":")[:2])) for x in r.lrange(f"{prefix}:beats", 0, -1))
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end - 0.01, spans       # never two runs at once, though 8 could run
    s = schedule(r, prefix)
    assert int(s["skipped"]) >= 2 * len(spans) - 4, s   # ~4 ticks skipped per run
    assert not r.exists(f"{prefix}:default:sched:{NAME}:run")  # the last run's marker went with it


@pytest.mark.timeout(120)
def test_a_tick_claimed_late_fires_once_and_counts_the_missed_ones(cluster, monkeypatch):
    r, prefix = cluster.r, cluster.prefix
    monkeypatch.setenv("CT_TEST_PREFIX", prefix)

    def declare():
        eng = cluster.engine()

        def beat():
            pass

        beat.__module__, beat.__qualname__ = "redis_periodic_tasks", "beat"
        eng.periodic(every=0.2)(beat)
        return eng, beat.periodic

    runner(cluster)
    _, p = declare()
    wait_until(lambda: int(schedule(r, prefix).get("runs", 0)) >= 1, 20, "a first run")
    p.cancel()  # nobody declares it for 1.2 s: six due times pass
    # cancel() returns at once and a claim already waiting for Redis still lands: read the
    # state once the ticker has taken this declarer off the schedule (after any such claim)
    who = f"{prefix}:default:sched:{NAME}:who"
    wait_until(lambda: r.zscore(who, p.declarer) is None, 20, "the cancelled declarer to leave")
    before = schedule(r, prefix)
    time.sleep(1.2)
    _, p2 = declare()
    # p2 counts its run when its claim's reply is back, after Redis shows it: wait for p2's
    # count, and read its counters under the lock its tick holds (not between two of them)
    wait_until(lambda: p2.runs >= 1, 20, "the late run")
    with p2._lock:
        missed, runs = p2.missed, p2.runs
    after = schedule(r, prefix)
    assert int(after["missed"]) - int(before.get("missed", 0)) >= 4, (before, after)
    assert missed >= 4 and runs >= 1
    p2.cancel()


@pytest.mark.timeout(120)
def test_the_worker_registers_and_runs_a_periodic_task_and_its_banner_counts_it(cluster):
    r, prefix = cluster.r, cluster.prefix
    env = _env(cluster.url, prefix, CT_TEST_EVERY=0.2)
    w = subprocess.Popen([sys.executable, "-m", "catzilla_tasks.cli", "worker", "redis_periodic_tasks:tasks"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = w.stdout.readline()
        assert "1 task(s)" in banner, banner
        wait_until(lambda: r.llen(f"{prefix}:beats") >= 5, 30, "five runs")
        assert cluster.broker.dead_letter_count() == 0
    finally:
        w.send_signal(signal.SIGTERM)
        w.wait(30)
        w.stdout.close()


@pytest.mark.timeout(120)
def test_schedules_lists_them_with_last_and_next_run_without_declaring(cluster):
    r, prefix = cluster.r, cluster.prefix
    runner(cluster)
    procs = [declarer(cluster.url, prefix, CT_TEST_EVERY=0.3)]
    try:
        wait_until(lambda: int(schedule(r, prefix).get("runs", 0)) >= 2, 30, "two runs")
        got = cli(cluster.url, prefix, "schedules", "--app", "redis_periodic_tasks:tasks", "--json",
                  CT_TEST_EVERY=0.3)
        assert got.returncode == 0, got.stderr
        (item,) = [json.loads(line) for line in got.stdout.splitlines()]
        assert item["name"] == NAME and item["spec"] == "every=0.3"
        assert item["runs"] >= 2 and item["last_run"] < item["next_run"]
        assert len(item["declarers"]) == 1  # the command itself did not declare it
        text = cli(cluster.url, prefix, "schedules", "--broker", cluster.url, "--prefix", prefix)
        assert text.returncode == 0, text.stderr
        assert "1 schedule(s)" in text.stdout and NAME in text.stdout and "every=0.3" in text.stdout
    finally:
        _kill(procs)
    (listed,) = list_schedules(cluster.broker)
    assert listed["name"] == NAME


def test_a_periodic_task_of_an_in_process_engine_is_registered_and_stays_in_process(tasks):
    def job():
        pass

    tasks.periodic(every=3600)(job)
    assert f"{job.__module__}.{job.__qualname__}" in tasks.registered_tasks
    assert type(job.periodic).__name__ == "PeriodicTask"


def test_a_periodic_task_on_redis_must_be_importable_by_workers(redis_url, prefix):
    eng = BackgroundTasks(workers=1, broker=RedisBroker(redis_url, prefix=prefix))
    try:
        with pytest.raises(TypeError, match="importable name"):
            eng.periodic(every=1)(lambda: None)
    finally:
        eng.shutdown(wait_for_completion=False)
        eng.broker.close()


@pytest.mark.timeout(60)
def test_an_app_made_a_producer_by_worker_broker_turns_its_periodic_tasks_into_schedules(redis_url, prefix):
    from catzilla_tasks.brokers.producer import DistributedTasks
    from catzilla_tasks.brokers.schedules import ClusterPeriodicTask, _declaring

    assert _declaring
    eng = BackgroundTasks(workers=1)

    def beat():
        pass

    beat.__module__, beat.__qualname__ = "redis_periodic_tasks", "beat"
    eng.periodic(every=3600)(beat)
    old = beat.periodic
    prod = DistributedTasks(workers=1, broker=RedisBroker(redis_url, prefix=prefix))
    prod.take_over_periodic(eng)
    try:
        assert type(eng) is BackgroundTasks  # the app's engine stays an ordinary engine
        assert old.cancelled and isinstance(beat.periodic, ClusterPeriodicTask)
        assert prod.periodic_tasks == [beat.periodic]
        wait_until(lambda: list_schedules(prod.broker), 20, "the schedule to be declared")
    finally:
        prod.shutdown(wait_for_completion=False)
        eng.shutdown(wait_for_completion=False)
        prod.broker.close()
