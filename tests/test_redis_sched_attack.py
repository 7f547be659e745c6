"""Adversarial tests of issue 19 (cluster-wide schedules, submit-time dedup, remote cancel):
bad schedule input, schedules that collide or change spec, cancels that must let go of what
refers to the cancelled task. Against a real redis-server (fixtures in redis_helpers)."""

from __future__ import annotations

import datetime
import time

import pytest
import redis_tasks as rt
from redis_helpers import prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)
from test_redis_broker import Cluster

from catzilla_tasks import BackgroundTasks, TaskCancelled, TaskChain, TaskStatus
from catzilla_tasks.brokers.schedules import list_schedules


@pytest.fixture
def cluster(redis_url, prefix, monkeypatch):
    monkeypatch.setenv("CT_TEST_PREFIX", prefix)
    c = Cluster(redis_url, prefix, monkeypatch)
    yield c
    c.close()


def _fn(name="beat"):
    def beat(*args, **kwargs):
        return None

    beat.__module__, beat.__qualname__ = "redis_periodic_tasks", name
    return beat


def _state(c, name):
    return {k.decode(): v.decode() for k, v in c.r.hgetall(c.broker.schedule_key(name)).items()}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 0, datetime.timedelta(0), 1e300, "5", True])
@pytest.mark.parametrize("on_redis", [False, True])
@pytest.mark.timeout(60)
def test_every_nan_inf_zero_negative_or_huge_is_refused_at_the_call_site(cluster, bad, on_redis):
    eng = cluster.engine() if on_redis else BackgroundTasks(workers=1)
    try:
        with pytest.raises(ValueError, match="every"):
            eng.periodic(every=bad)(_fn())
        assert eng.periodic_tasks == []
    finally:
        if not on_redis:
            eng.shutdown(wait_for_completion=False, timeout=5)


@pytest.mark.timeout(60)
def test_two_specs_of_one_schedule_during_a_rolling_deploy_still_fire(cluster, monkeypatch):
    # the old and the new version of a deploy declare the schedule with different intervals,
    # each calling at least every heartbeat: each call used to reset the due time to its own
    # spec's first one, so with heartbeats shorter than the interval it never came due
    from catzilla_tasks.brokers import schedules

    monkeypatch.setattr(schedules, "HEARTBEAT", 0.2)  # (the heartbeat is 10 s, the interval an hour)
    old, new = cluster.engine(), cluster.engine()
    old.periodic(every=1.0, overlap=True)(_fn())
    new.periodic(every=1.5, overlap=True)(_fn())
    name = "redis_periodic_tasks.beat"
    wait_until(lambda: int(_state(cluster, name).get("runs", 0)) >= 2, 30, "two runs while both specs live")


@pytest.mark.timeout(60)
def test_one_function_scheduled_with_two_argument_sets_is_two_schedules(cluster):
    eng = cluster.engine()
    f = _fn("per_region")
    eng.periodic(every=0.2, overlap=True, args=("eu",))(f)
    eng.periodic(every=0.2, overlap=True, args=("us",))(f)
    wait_until(lambda: len(list_schedules(cluster.broker)) == 2, 30, "two schedules")
    wait_until(lambda: all(s["runs"] >= 3 for s in list_schedules(cluster.broker)), 30, "both to fire")
    names = [s["name"] for s in list_schedules(cluster.broker)]
    assert all(n.startswith("redis_periodic_tasks.per_region") for n in names), names


@pytest.mark.timeout(60)
def test_cancelling_a_delayed_run_of_an_overlap_false_schedule_does_not_stall_it(cluster):
    eng = cluster.engine()
    eng.periodic(every=0.2, delay_ms=60_000)(_fn("slow_start"))
    name = "redis_periodic_tasks.slow_start"
    wait_until(lambda: int(_state(cluster, name).get("runs", 0)) == 1, 10, "the first run")
    first = _state(cluster, name)["last_id"]
    assert cluster.r.get(cluster.broker.schedule_key(name) + ":run").decode() == first
    assert eng.result(first).cancel() is True  # it waits in the delayed set: it never runs
    # its marker must go with it, else the schedule skips every tick for MARKER_TTL (a day)
    wait_until(lambda: int(_state(cluster, name).get("runs", 0)) >= 2, 30, "the next run after the cancel")


@pytest.mark.timeout(60)
def test_a_cancelled_delayed_keyed_task_is_remembered_no_longer_than_its_outcome(cluster):
    p = cluster.engine(result_ttl=1, idempotency_ttl=3600)
    key = f"{cluster.prefix}-cancelled"
    first = p.options(idempotency_key=key, delay_ms=60_000).add_task(rt.add, 1, 1)
    assert first.cancel() is True
    with pytest.raises(TaskCancelled):
        first.wait(5)
    # the CANCELLED outcome is kept result_ttl (1 s): the key must not give its handle out longer
    wait_until(lambda: 0 < cluster.r.pttl(p.broker.dedup_key(key)) <= 1000 or not cluster.r.exists(
        p.broker.dedup_key(key)), 5, "the key's TTL to be the outcome's")
    time.sleep(1.2)
    again = p.options(idempotency_key=key).add_task(rt.add, 2, 2)
    assert again.task_id != first.task_id


@pytest.mark.timeout(60)
def test_cancel_of_a_workflow_step_id_is_refused_not_a_hung_run(cluster):
    cluster.worker()
    p = cluster.producer
    wf = TaskChain("two", tasks=p)
    a = wf.step(rt.add, 1, 2)
    wf.step(rt.add, a, 10)
    run = wf.execute()
    with pytest.raises(ValueError, match="step"):
        p.result(f"{run.task_id}.0").cancel()
    assert run.wait(20) == {"two_0": 3, "two_1": 13}
    assert run.status is TaskStatus.SUCCEEDED


@pytest.mark.timeout(60)
def test_the_cancel_command_refuses_a_step_id_or_a_blank_one_with_a_message(cluster):
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    for bad in ("AAAAAAAA1.0", " x"):
        got = subprocess.run([sys.executable, "-m", "catzilla_tasks.cli", "cancel", bad, "--broker", cluster.url,
                              "--prefix", cluster.prefix], env=env, capture_output=True, text=True, timeout=60)
        assert got.returncode == 2, (got.stdout, got.stderr)
        assert "Traceback" not in got.stderr and "task" in got.stderr, got.stderr


@pytest.mark.timeout(60)
def test_arguments_workers_cannot_receive_are_refused_at_the_declaration(cluster):
    eng = cluster.engine()
    with pytest.raises(TypeError, match="args"):
        eng.periodic(every=0.2, args=(object(),))(_fn("unsendable"))
    assert eng.periodic_tasks == [] and list_schedules(cluster.broker) == []


@pytest.mark.timeout(60)
def test_a_cron_declarer_whose_clock_is_an_hour_behind_does_not_fire_every_second(cluster, monkeypatch):
    # cron due times are computed in the declaring process; with its clock more than 8 periods
    # behind the server's they were all in the past and the script fell back to now + 1 s
    from catzilla_tasks.brokers import schedules

    monkeypatch.setattr(schedules, "_wall", lambda: time.time() - 3600)
    eng = cluster.engine()
    eng.periodic(cron="* * * * *", overlap=True)(_fn("minutely"))
    name = "redis_periodic_tasks.minutely"
    wait_until(lambda: "next" in _state(cluster, name), 10, "the schedule to be declared")
    time.sleep(3.0)  # the passage of time is what is tested
    s = _state(cluster, name)
    assert int(s.get("runs", 0)) <= 1, s  # (one if a minute begins meanwhile)
    sec, usec = cluster.r.time()
    assert int(s["next"]) > sec * 1000 + 1000, s  # the next minute by the server's clock


@pytest.mark.timeout(60)
def test_an_engine_s_idempotency_ttl_is_the_broker_s_or_refused_never_ignored(redis_url, prefix):
    from catzilla_tasks.brokers import MemoryBroker, RedisBroker

    eng = BackgroundTasks(workers=1, broker=redis_url, idempotency_ttl=5)
    try:
        assert eng.broker.idempotency_ttl == 5.0     # the broker made from the URL takes it
    finally:
        eng.shutdown(wait_for_completion=False, timeout=5)
        eng.broker.close()
    b = RedisBroker(redis_url, prefix=prefix, idempotency_ttl=5)
    try:
        with pytest.raises(ValueError, match="idempotency_ttl"):
            BackgroundTasks(workers=1, broker=RedisBroker(redis_url, prefix=prefix), idempotency_ttl=5)
        same = BackgroundTasks(workers=1, broker=b, idempotency_ttl=5)  # (the same: fine)
        same.shutdown(wait_for_completion=False, timeout=5)
    finally:
        b.close()
    with pytest.raises(ValueError, match="idempotency_ttl"):
        BackgroundTasks(workers=1, broker=MemoryBroker(), idempotency_ttl=5)


@pytest.mark.timeout(60)
def test_a_child_forked_while_the_ticker_holds_its_locks_can_declare_and_cancel(cluster):
    # the ticker thread takes _Ticker._lock at every tick: a fork at that moment gave the child a
    # lock nobody would release, and its first schedule hung in _Ticker.get()
    import os

    from catzilla_tasks.brokers import schedules

    f = _fn("parent_side")
    cluster.engine().periodic(every=0.2, overlap=True)(f)
    # (as the ticker thread holds them at each tick: the schedule's for its whole Redis call)
    with schedules._Ticker._lock, f.periodic._lock:
        pid = os.fork()
        if pid == 0:  # the child: at most 5 s to get a ticker of its own
            import signal

            signal.signal(signal.SIGALRM, lambda *_: os._exit(5))  # 5: it hung
            signal.alarm(5)
            try:
                t = schedules._Ticker.get(f.periodic.broker)
                f.periodic.cancel()  # (an engine's shutdown in the child cancels its schedules)
                os._exit(0 if t._pid == os.getpid() else 3)
            except BaseException as exc:
                os.write(2, repr(exc).encode())
                os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


@pytest.mark.timeout(60)
def test_a_memory_broker_deduplicates_at_submit_as_redis_does():
    import threading

    from catzilla_tasks.brokers import Consumer, MemoryBroker

    b = MemoryBroker(result_ttl=1)
    p = BackgroundTasks(workers=2, broker=b)
    rt.register(p)
    try:
        handles, go = [], threading.Event()

        def submit():
            go.wait(10)
            handles.append(p.options(idempotency_key="one").add_task(rt.add, 1, 2))

        threads = [threading.Thread(target=submit) for _ in range(20)]
        for t in threads:
            t.start()
        go.set()
        for t in threads:
            t.join(10)
        with p.batch():
            inside = p.options(idempotency_key="one").add_task(rt.add, 5, 5)
        assert len({h.task_id for h in [*handles, inside]}) == 1   # one task, one id
        q = b.queued()
        assert sum(q.values()) - q["dead"] == 1, q
        w = BackgroundTasks(workers=2)
        rt.register(w)
        c = Consumer(w, b, concurrency=2).start()
        try:
            assert handles[0].wait(20) == 3
            # ended: the key is kept no longer than the result (1 s), then a new task is queued
            wait_until(lambda: p.options(idempotency_key="one").add_task(rt.add, 2, 2).task_id != handles[0].task_id,
                       10, "a new task once the result expired")
        finally:
            c.stop(10)
            w.shutdown(wait_for_completion=False, timeout=5)
    finally:
        p.shutdown(wait_for_completion=False, timeout=5)


@pytest.mark.parametrize("bad", [{"cron": ""}, {"cron": "61 * * * *"}, {"cron": "* * * * * * * *"}, {"cron": 5},
                                 {"cron": "* * * * *", "tz": "Europe/Paris"}, {"every": 1, "tz": 3},
                                 {"every": 1, "cron": "* * * * *"}, {}])
@pytest.mark.parametrize("on_redis", [False, True])
@pytest.mark.timeout(60)
def test_bad_cron_or_tz_is_refused_at_the_call_site(cluster, bad, on_redis):
    eng = cluster.engine() if on_redis else BackgroundTasks(workers=1)
    try:
        with pytest.raises(ValueError):
            eng.periodic(**bad)(_fn())
        assert eng.periodic_tasks == []
    finally:
        if not on_redis:
            eng.shutdown(wait_for_completion=False, timeout=5)


@pytest.mark.timeout(120)
def test_shutdown_is_not_held_by_schedules_while_redis_is_silent(redis_url, prefix):
    # each schedule's cancel waited for its tick's Redis call and then made one of its own:
    # with Redis silent, a socket timeout each
    from fault_proxy import FaultProxy

    from catzilla_tasks.brokers import RedisBroker

    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with FaultProxy(port) as proxy:
        eng = BackgroundTasks(workers=1, broker=RedisBroker(proxy.url, prefix=prefix, socket_timeout=4))
        fs = [_fn(f"quiet{i}") for i in range(3)]
        for f in fs:
            eng.periodic(every=0.05, overlap=True)(f)
        wait_until(lambda: all(f.periodic.runs >= 1 for f in fs), 10, "a run of each")
        proxy.blackhole(30)
        time.sleep(0.5)  # a tick is waiting for Redis now
        t0 = time.monotonic()
        eng.shutdown(wait_for_completion=False, timeout=2)
        took = time.monotonic() - t0
        assert all(f.periodic.cancelled for f in fs)
        proxy.reset_all()
        eng.broker.close()
    assert took < 3.0, took


@pytest.mark.timeout(60)
def test_first_run_now_survives_the_worker_turning_an_app_s_schedules_into_cluster_ones(cluster):
    # `catzilla-tasks worker app:tasks --broker URL` on an app created without a broker
    from catzilla_tasks.brokers import RedisBroker
    from catzilla_tasks.brokers.producer import DistributedTasks

    eng = BackgroundTasks(workers=1)
    f = _fn("at_start")
    timer = eng._call_later
    eng._call_later = lambda delay, fn: None  # the conversion comes before the engine's timer fires
    eng.periodic(every=3600, first_run_now=True, overlap=True)(f)
    eng._call_later = timer
    local = f.periodic  # (had its first run fired in-process before the conversion, that was it)
    producer = DistributedTasks(workers=1, broker=RedisBroker(cluster.url, prefix=cluster.prefix))
    producer.take_over_periodic(eng)

    def runs():
        return local.runs + int(_state(cluster, "redis_periodic_tasks.at_start").get("runs", 0))

    try:
        assert type(f.periodic).__name__ == "ClusterPeriodicTask"
        wait_until(lambda: runs() >= 1, 10, "the first run at once")
        time.sleep(0.5)
        assert runs() == 1
    finally:
        producer.shutdown(wait_for_completion=False, timeout=5)
        eng.shutdown(wait_for_completion=False, timeout=5)
        producer.broker.close()


@pytest.mark.timeout(120)
def test_cancel_racing_fetch_and_finish_answers_what_the_outcome_is(cluster):
    import threading

    cluster.worker(concurrency=8)
    p = cluster.producer
    log_key = f"{cluster.prefix}:ran"
    handles = [p.add_task(rt.record_slow, log_key, i + 1, 0.01) for i in range(300)]
    answers: dict[str, list[bool]] = {h.task_id: [] for h in handles}

    def cancel_some(offset):
        for h in handles[offset::3]:
            answers[h.task_id].append(p.result(h.task_id).cancel())
            answers[h.task_id].append(p.result(h.task_id).cancel())  # a second cancel: never True

    threads = [threading.Thread(target=cancel_some, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    cancelled = 0
    for i, h in enumerate(handles):
        first, second = answers[h.task_id]
        assert second is False
        if first:
            cancelled += 1
            with pytest.raises(TaskCancelled):
                h.wait(20)
        else:
            assert h.wait(20) == i + 1
    print(f"{cancelled} of 300 cancelled in the race")


@pytest.mark.timeout(60)
def test_purge_lets_go_of_the_keys_and_schedule_markers_of_what_it_deletes(cluster):
    # no worker: the keyed task and the schedule's run wait in the queue when it is purged
    p = cluster.producer
    key = f"{cluster.prefix}-purged"
    first = p.options(idempotency_key=key).add_task(rt.add, 1, 1)
    later = p.options(idempotency_key=key + "-d", delay_ms=60_000).add_task(rt.add, 1, 1)
    eng = cluster.engine()
    eng.periodic(every=0.2)(_fn("purged_run"))  # overlap=False
    name = "redis_periodic_tasks.purged_run"
    wait_until(lambda: int(_state(cluster, name).get("runs", 0)) == 1, 10, "the first run")
    cluster.broker.purge()
    # the key must not hand out the deleted task (it would never end) ...
    again = p.options(idempotency_key=key).add_task(rt.add, 2, 2)
    assert again.task_id != first.task_id
    assert p.options(idempotency_key=key + "-d").add_task(rt.add, 2, 2).task_id != later.task_id
    # ... nor the schedule wait a day for a run that is gone
    wait_until(lambda: int(_state(cluster, name).get("runs", 0)) >= 2, 30, "a run after the purge")
    cluster.worker()
    assert again.wait(20) == 4


@pytest.mark.timeout(60)
def test_a_memory_broker_purge_lets_go_of_the_keys_too():
    from catzilla_tasks.brokers import MemoryBroker

    b = MemoryBroker()
    p = BackgroundTasks(workers=1, broker=b)
    rt.register(p)
    try:
        first = p.options(idempotency_key="gone").add_task(rt.add, 1, 1)
        b.purge()
        assert p.options(idempotency_key="gone").add_task(rt.add, 1, 1).task_id != first.task_id
    finally:
        p.shutdown(wait_for_completion=False, timeout=5)


@pytest.mark.timeout(60)
def test_the_index_of_schedules_forgets_names_nobody_declared_for_a_week(cluster):
    # (renamed functions, argument sets that changed: their hashes expire, their names stayed)
    cluster.r.zadd(cluster.broker.schedules_key, {"old.renamed_away": 1})
    cluster.engine().periodic(every=0.2, overlap=True)(_fn("current"))
    wait_until(lambda: cluster.r.zscore(cluster.broker.schedules_key, "old.renamed_away") is None, 10,
               "the stale name to be dropped")
    assert [s["name"] for s in list_schedules(cluster.broker)] == ["redis_periodic_tasks.current"]


@pytest.mark.timeout(60)
def test_a_task_routed_to_another_queue_is_cancelled_from_any_queue_s_broker(cluster):
    # cancelled ids and their channel were per queue: the other queue's workers never heard
    p = cluster.producer                              # its broker's queue: "default"
    log_key = f"{cluster.prefix}:log"
    w = cluster.worker(queue="other")
    res = p.options(queue="other", delay_ms=1500).add_task(rt.record, log_key, "x")
    other = p.options(queue="other").add_task(rt.record, log_key, "y")
    assert other.wait(20) == "y"
    assert res.cancel() is True
    with pytest.raises(TaskCancelled):
        res.wait(5)
    wait_until(lambda: w.counts["cancelled"] == 1, 20, "the other queue's worker to drop it")
    assert [x.decode() for x in cluster.r.lrange(log_key, 0, -1)] == ["y"]


@pytest.mark.timeout(60)
def test_a_periodic_task_with_a_named_queue_fires_into_that_queue_and_its_workers_end_its_runs(cluster):
    eng = cluster.engine()
    f = _fn("report")
    eng.periodic(every=0.2, queue="reports")(f)  # overlap=False: each run's end must free the next
    streams, _ = cluster.broker.queue_keys("reports")
    wait_until(lambda: sum(cluster.r.xlen(s) for s in streams) >= 1, 10, "a run in the reports queue")
    assert sum(cluster.r.xlen(s) for s in cluster.broker.streams) == 0
    weng = cluster.engine(queue="reports")
    weng._registered["redis_periodic_tasks.report"] = f
    w = cluster.worker(engine=weng)
    wait_until(lambda: w.counts["succeeded"] >= 3, 30, "three runs run by the reports worker")
    st = f.periodic.status()
    assert st["runs"] >= 3 and st["name"] == "redis_periodic_tasks.report", st
    listed = list_schedules(weng.broker)                # listed with the queue its runs go to
    assert [x["name"] for x in listed] == ["redis_periodic_tasks.report"]


@pytest.mark.timeout(60)
def test_task_ids_never_start_with_a_dash_so_the_cancel_command_takes_them(cluster, monkeypatch):
    import os
    import subprocess
    import sys

    from catzilla_tasks.brokers import RedisBroker

    real = os.urandom
    draws = iter([b"\xf8" + bytes(5)])  # the first draw would encode to "-AAAAAAA"
    monkeypatch.setattr(os, "urandom", lambda n: next(draws, None) or real(n))
    b = RedisBroker(cluster.url, prefix=cluster.prefix)
    monkeypatch.setattr(os, "urandom", real)
    eng = BackgroundTasks(workers=1, broker=b)
    rt.register(eng)
    try:
        res = eng.options(delay_ms=60_000).add_task(rt.add, 1, 1)
        assert not res.task_id.startswith("-"), res.task_id
        got = subprocess.run([sys.executable, "-m", "catzilla_tasks.cli", "cancel", res.task_id, "--broker",
                              cluster.url, "--prefix", cluster.prefix], capture_output=True, text=True, timeout=60)
        assert got.returncode == 0, got.stderr
    finally:
        eng.shutdown(wait_for_completion=False, timeout=5)
        b.close()


@pytest.mark.timeout(120)
def test_a_silent_redis_does_not_hold_another_engine_s_schedules(cluster, prefix):
    # one ticker thread per process made every schedule wait for the silent one's calls
    from fault_proxy import FaultProxy

    from catzilla_tasks.brokers import RedisBroker

    port = int(cluster.url.rsplit(":", 1)[1].split("/")[0])
    with FaultProxy(port) as proxy:
        quiet = BackgroundTasks(workers=1, broker=RedisBroker(proxy.url, prefix=prefix + "q", socket_timeout=10))
        loud = cluster.engine()
        fq, fl = _fn("behind_proxy"), _fn("direct")
        try:
            quiet.periodic(every=0.05, overlap=True)(fq)
            loud.periodic(every=0.2, overlap=True)(fl)
            wait_until(lambda: fq.periodic.runs >= 1 and fl.periodic.runs >= 1, 10, "both to fire")
            proxy.blackhole(60)
            time.sleep(0.3)  # the quiet one's tick is waiting for its Redis now
            before = fl.periodic.runs
            time.sleep(3.0)  # the passage of time is what is tested
            assert fl.periodic.runs - before >= 8, (before, fl.periodic.runs)  # ~15 due
        finally:
            quiet.shutdown(wait_for_completion=False, timeout=5)
            proxy.reset_all()
            quiet.broker.close()
