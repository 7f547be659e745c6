"""Workflows across Redis workers (TaskChain, chain, group, chord on an engine with a broker):
steps travel as ordinary tasks, the workers release the dependents, values pass through Redis,
a failing step fails the run, a killed worker's step is rerun, the producer may exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import redis_tasks as rt
from redis_helpers import prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)
from test_redis_broker import Cluster

from catzilla_tasks import (
    BackgroundTasks,
    TaskCancelled,
    TaskChain,
    WorkflowError,
    call,
    chain,
    chord,
    group,
    result_of,
    results_of,
)
from catzilla_tasks.brokers import RedisBroker, RemoteResult

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def cluster(redis_url, prefix, monkeypatch):
    c = Cluster(redis_url, prefix, monkeypatch)
    yield c
    c.close()


def start_worker(url: str, prefix: str, concurrency: int, vt: float = 60.0) -> subprocess.Popen:
    env = dict(os.environ, CT_TEST_REDIS_URL=url, CT_TEST_PREFIX=prefix, CT_TEST_VT=str(vt),
               PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    w = subprocess.Popen(
        [sys.executable, "-m", "catzilla_tasks.cli", "worker", "redis_tasks:tasks", "--concurrency", str(concurrency)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    line = w.stdout.readline()  # printed once the engine and broker exist, just before fetching starts
    assert line.startswith("catzilla-tasks worker"), line
    return w


def stop(*workers: subprocess.Popen) -> None:
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
    for w in workers:
        try:
            w.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            w.kill()
            w.communicate()


def test_a_dag_in_process_worker_values_by_position_keyword_and_list(cluster):
    w = cluster.worker()
    p = cluster.producer
    wf = TaskChain("dag", tasks=p)
    a = wf.step(rt.add, 1, 2)                                   # 3
    b = wf.step(rt.add, a, 10, step_name="b")                   # 13
    c = wf.step(rt.pair, a, b=result_of("b"), step_name="c")    # [3, 13]
    wf.step(rt.total, results_of(a, b), plus=b, step_name="end", depends_on=[c])  # 16 + 13
    r = wf.execute()
    assert isinstance(r, RemoteResult)
    assert r.wait(20) == {"dag_0": 3, "b": 13, "c": [3, 13], "end": 29}
    # readable from any process: a new broker on the same queue
    other = RedisBroker(cluster.url, prefix=cluster.prefix)
    assert other.result(r.task_id).wait(5)["end"] == 29
    other.close()
    # the run's hash expires with the result; nothing is left in the streams
    assert 0 < cluster.r.pttl(cluster.broker.workflow_key(r.task_id)) <= cluster.broker.result_ttl * 1000
    # (once the last step's entry is acknowledged and deleted: after the commit that stored it)
    wait_until(lambda: w.stats()["in_flight"] == 0, 20, "the last step to be acknowledged")
    assert all(cluster.r.xlen(s) == 0 for s in cluster.broker.streams)


def test_celery_style_helpers_run_across_workers(cluster):
    cluster.worker()
    p = cluster.producer
    assert chain(call(rt.add, 1, 2), call(rt.add, 10), call(rt.add, 100), tasks=p).execute().wait(20) == {
        "chain_0": 3, "chain_1": 13, "chain_2": 113}
    g = group(call(rt.add, 1, 1), call(rt.add, 2, 2), tasks=p)
    assert g.execute().wait(20) == {"group_0": 2, "group_1": 4}
    assert chord(g, call(rt.total, plus=1)).execute().wait(20)["chord_2"] == 7
    empty = TaskChain("empty", tasks=p)
    assert empty.execute().wait(5) == {}


def test_await_a_remote_workflow(cluster):
    import asyncio

    cluster.worker()
    wf = chain(call(rt.add, 1, 2), call(rt.add, 3), tasks=cluster.producer)

    async def main():
        return await wf.execute()

    assert asyncio.run(main()) == {"chain_0": 3, "chain_1": 6}
    bad = chain(call(rt.add, 1, 2), call(rt.always_fails), tasks=cluster.producer)

    async def failing():
        return await bad.execute()

    with pytest.raises(WorkflowError, match="'chain_1' failed") as info:
        asyncio.run(failing())
    assert info.value.results == {"chain_0": 3}
    with pytest.raises(NotImplementedError, match="awaitable itself"):
        wf.execute_async()


def test_bad_workflows_are_refused_at_execute(cluster, redis_url, prefix):
    p = cluster.producer
    wf = TaskChain("local", tasks=p)
    wf.step(lambda: 1)
    with pytest.raises(TypeError, match="step 'local_0'.*importable name"):
        wf.execute()
    wf = TaskChain("obj", tasks=p)
    wf.step(rt.echo, object())
    with pytest.raises(TypeError, match="step 'obj_0': cannot encode"):
        wf.execute()
    no_results = BackgroundTasks(
        workers=1, min_workers=1, broker=RedisBroker(redis_url, prefix=prefix, result_ttl=0)
    )
    pickled = BackgroundTasks(
        workers=1,
        min_workers=1,
        broker=RedisBroker(redis_url, prefix=prefix, serializer="pickle", allow_pickle=True),
    )
    try:
        with pytest.raises(ValueError, match="result_ttl=0"):
            chain(call(rt.add, 1, 2), tasks=no_results).execute()
        with pytest.raises(ValueError, match="msgpack or JSON"):
            chain(call(rt.add, 1, 2), tasks=pickled).execute()
    finally:
        no_results.shutdown()
        pickled.shutdown()
    assert all(cluster.r.xlen(s) == 0 for s in cluster.broker.streams)  # nothing was published


def test_json_workflows(cluster):
    eng = cluster.engine(serializer="json")
    cluster.worker(engine=cluster.engine())  # a msgpack worker reads JSON steps and answers in JSON
    wf = TaskChain("js", tasks=eng)
    a = wf.step(rt.pair, "x", b={"k": 1})
    wf.step(rt.pair, a, step_name="last \"quoted\"")
    assert wf.execute().wait(20) == {"js_0": ["x", {"k": 1}], 'last "quoted"': [["x", {"k": 1}], None]}


def test_a_failing_step_fails_the_run_and_its_dependents_never_run(cluster):
    cluster.worker()
    p = cluster.producer
    log = f"{cluster.prefix}:never"
    wf = TaskChain("bad", tasks=p)
    ok = wf.step(rt.add, 1, 1, step_name="ok")
    f = wf.step(rt.always_fails, ok, step_name="boom")        # 2 retries, then fails for good
    after = wf.step(rt.record, log, f, step_name="after")
    wf.step(rt.record, log, "x", depends_on=[after])
    r = wf.execute()
    with pytest.raises(WorkflowError, match="step 'boom' failed: ValueError: bad value 2") as info:
        r.wait(20)
    err = info.value
    assert err.step == "boom" and err.workflow == "bad"
    assert err.results == {"ok": 2}  # the values of the steps that had succeeded
    assert isinstance(err.__cause__, ValueError) and "always_fails" in err.__cause__.remote_traceback
    assert cluster.r.llen(log) == 0  # neither dependent ran
    assert cluster.broker.dead_letter_count() == 1
    assert cluster.r.hget(cluster.broker.workflow_key(r.task_id), "state") == b"failed"


def test_a_step_whose_task_the_worker_lacks_fails_the_run_naming_it(cluster):
    cluster.worker()
    wf = TaskChain("unknown", tasks=cluster.producer)
    wf.step(rt.add, 1, 1)
    wf.step(os.getpid, step_name="not-registered")  # importable, but no worker registered it
    with pytest.raises(WorkflowError, match="'not-registered' failed: LookupError: unknown task name 'posix.getpid'"):
        wf.execute().wait(20)


def test_steps_queued_when_the_run_failed_are_skipped(cluster):
    p = cluster.producer
    log = f"{cluster.prefix}:late"
    wf = TaskChain("race", tasks=p)
    wf.step(rt.always_fails, 0, step_name="boom")
    wf.step(rt.record, log, "independent", step_name="late")  # a root too: queued at execute
    r = wf.execute()
    # fail the run before any worker runs: a worker that then fetches 'late' must skip it
    cluster.r.hset(cluster.broker.workflow_key(r.task_id), "state", "failed")
    w = cluster.worker()
    wait_until(lambda: w.stats()["workflow_steps_skipped"] == 2, 20, "both steps skipped")
    assert cluster.r.llen(log) == 0
    assert all(cluster.r.xlen(s) == 0 for s in cluster.broker.streams)


def test_fan_out_fan_in_across_two_worker_processes(redis_url, prefix):
    log = f"{prefix}:pids"
    a = start_worker(redis_url, prefix, concurrency=3)
    b = start_worker(redis_url, prefix, concurrency=3)
    p = BackgroundTasks(workers=2, broker=RedisBroker(redis_url, prefix=prefix))
    try:
        wf = TaskChain("fan", tasks=p)
        seed = wf.step(rt.add, 1, 1, step_name="seed")                                  # 2
        sq = [wf.step(rt.square_noting_pid, log, seed, 0.2, step_name=f"sq{i}") for i in range(12)]  # 4 each
        s = wf.step(rt.total, results_of(*sq), step_name="sum")                       # 48
        wf.step(rt.pair, s, b=result_of("seed"), step_name="out")
        got = wf.execute().wait(60)
        assert got["sum"] == 48 and got["out"] == [48, 2] and [got[f"sq{i}"] for i in range(12)] == [4] * 12
        pids = {x.decode().split(":")[0] for x in p.broker.redis.lrange(log, 0, -1)}
        assert pids == {str(a.pid), str(b.pid)}  # each holds at most 3 steps of 0.2 s: both worked
    finally:
        stop(a, b)
        p.shutdown()


def test_the_producer_may_exit_right_after_execute(redis_url, prefix):
    code = textwrap.dedent(f"""
        import redis_tasks as rt
        from catzilla_tasks import BackgroundTasks, TaskChain, results_of
        from catzilla_tasks.brokers import RedisBroker
        p = BackgroundTasks(workers=1, min_workers=1, broker=RedisBroker({redis_url!r}, prefix={prefix!r}))
        wf = TaskChain("gone", tasks=p)
        xs = [wf.step(rt.add, i, i) for i in range(4)]
        wf.step(rt.total, results_of(*xs), step_name="sum")
        print(wf.execute().task_id)
    """)
    env = dict(
        os.environ, CT_TEST_REDIS_URL=redis_url, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.strip().splitlines()[-1]
    broker = RedisBroker(redis_url, prefix=prefix)
    assert broker.result(run_id).status.name == "PENDING"
    w = start_worker(redis_url, prefix, concurrency=4)  # only now: nothing but Redis holds the run
    try:
        assert broker.result(run_id).wait(30)["sum"] == 12
    finally:
        stop(w)
        broker.close()


def test_a_worker_killed_mid_workflow_loses_nothing(redis_url, prefix):
    log = f"{prefix}:started"
    p = BackgroundTasks(workers=2, broker=RedisBroker(redis_url, prefix=prefix))
    r = p.broker.redis
    a = start_worker(redis_url, prefix, concurrency=4, vt=1.0)
    b = None
    try:
        wf = TaskChain("kill", tasks=p)
        first = wf.step(rt.add, 1, 2, step_name="first")                          # 3
        slow = wf.step(rt.square_noting_pid, log, first, 3.0, step_name="slow")    # 9, takes 3 s
        wf.step(rt.total, results_of(first, slow), plus=1, step_name="last")        # 13
        run = wf.execute()
        started = r.blpop(log, timeout=30)  # the slow step started in worker A
        assert started is not None and started[1].decode() == f"{a.pid}:3"
        os.kill(a.pid, signal.SIGKILL)
        a.wait(10)
        b = start_worker(redis_url, prefix, concurrency=4, vt=1.0)  # reclaims 'slow' after 1 s idle
        assert run.wait(60) == {"first": 3, "slow": 9, "last": 13}
        assert [x.decode() for x in r.lrange(log, 0, -1)] == [f"{b.pid}:3"]  # rerun once, by B
        # a step's result is stored before its entry is acknowledged: wait for the last ack
        wait_until(lambda: all(r.xpending(s, "workers")["pending"] == 0 for s in p.broker.streams), 30,
                   "every entry acknowledged")
    finally:
        a.kill()
        a.communicate()
        if b is not None:
            stop(b)
        p.shutdown()


def test_cancelling_a_run_skips_what_has_not_started_and_lets_running_steps_finish(cluster):
    from catzilla_tasks import TaskCancelled, TaskStatus

    w = cluster.worker()
    p = cluster.producer
    started, gate, log = (f"{cluster.prefix}:{k}" for k in ("started", "gate", "log"))
    wf = TaskChain("cancel-me", tasks=p)
    a = wf.step(rt.held, started, gate, 1, step_name="a")
    b = wf.step(rt.record, log, a, step_name="b")          # released by a: must never run
    wf.step(rt.record, log, "c", depends_on=[b])
    r = wf.execute()
    assert cluster.r.blpop([started], timeout=20) is not None  # 'a' is running
    assert r.cancel() is True
    with pytest.raises(TaskCancelled, match="workflow 'cancel-me' run .* was cancelled"):
        r.wait(5)
    assert r.status is TaskStatus.CANCELLED
    other = RedisBroker(cluster.url, prefix=cluster.prefix)   # every waiter sees it, from any process
    with pytest.raises(TaskCancelled):
        other.result(r.task_id).wait(5)
    other.close()
    assert r.cancel() is False                                 # it has ended
    cluster.r.rpush(gate, b"go")                               # the running step finishes ...
    wait_until(lambda: w.stats()["succeeded"] == 1, 20, "the running step finished")
    assert cluster.r.llen(log) == 0                            # ... and releases nothing
    assert cluster.r.hget(cluster.broker.workflow_key(r.task_id), "state") == b"cancelled"
    assert all(cluster.r.xlen(s) == 0 for s in cluster.broker.streams)


def test_chain_cancel_cancels_its_runs_on_the_workers_and_queued_steps_are_skipped(cluster):
    p = cluster.producer
    log = f"{cluster.prefix}:log"
    wf = TaskChain("queued", tasks=p)
    wf.step(rt.record, log, "x")
    wf.step(rt.record, log, "y")          # two roots: queued in the streams at execute
    runs = [wf.execute(), wf.execute()]
    assert wf.cancel() is True            # no worker yet: nothing has started
    assert wf.cancel() is False
    w = cluster.worker()
    wait_until(lambda: w.stats()["workflow_steps_skipped"] == 4, 20, "every queued step skipped")
    assert cluster.r.llen(log) == 0
    for r in runs:
        with pytest.raises(TaskCancelled):
            r.wait(5)


def test_a_single_remote_task_can_be_cancelled_too(cluster):
    # (issue 19: test_redis_cancel.py has the rest)
    r = cluster.producer.add_task(rt.add, 1, 2)
    assert r.cancel() is True
    w = cluster.worker()
    with pytest.raises(TaskCancelled):
        r.wait(20)
    wait_until(lambda: w.counts["cancelled"] == 1, 20, "the worker to drop it")
    done = cluster.producer.add_task(rt.add, 1, 2)
    assert done.wait(20) == 3
    assert done.cancel() is False          # it has ended


def test_steps_with_delay_ms_wait_in_the_delayed_set_after_their_release(cluster):
    cluster.worker()
    p = cluster.producer
    first, later, root = (f"{cluster.prefix}:{k}" for k in ("first", "later", "root"))
    wf = TaskChain("delays", tasks=p)
    a = wf.step(rt.stamp, first)
    wf.step(rt.stamp_later, later, a)       # @task(delay_ms=400): due 400 ms after a's release of it
    wf.step(rt.stamp_later, root)           # a delayed root: due 400 ms after execute()
    t0 = time.time()
    assert wf.execute().wait(20) == {"delays_0": 1, "delays_1": 2, "delays_2": 2}
    t_first = float(cluster.r.lindex(first, 0))
    t_later = float(cluster.r.lindex(later, 0))
    t_root = float(cluster.r.lindex(root, 0))
    assert t_later - t_first >= 0.39, (t_first, t_later)
    assert t_root - t0 >= 0.39, (t0, t_root)
    assert cluster.r.zcard(cluster.broker.delayed_key) == 0
