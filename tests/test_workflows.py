"""Task chains and workflows (catzilla_tasks.workflows): DAG building and validation, results
passed along, failure and cancellation, the Celery-style helpers, a full engine, under load.

No test sleeps to synchronise: gates are Events and Barriers (with timeouts), and the
workflow's own TaskResult is waited for.
"""

import asyncio
import itertools
import os
import random
import subprocess
import sys
import threading

import pytest
from gc_helpers import gc_pressure_on

from catzilla_tasks import TaskCancelled, TaskStatus, current_task, task
from catzilla_tasks.workflows import (
    Step,
    TaskChain,
    WorkflowError,
    call,
    chain,
    chain_for,
    chord,
    default_engine,
    group,
    result_of,
    results_of,
    workflow,
)

T = 10  # seconds: generous timeouts for waits that normally end in milliseconds
# The stress test's size follows the other stress tests (smaller under the sanitizer build).
STRESS_N = int(os.environ.get("CATZILLA_TASKS_STRESS_N", "1000000"))


class Counter:
    """Thread-safe call counter per name (side effects prove what ran)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts = {}

    def hit(self, name):
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + 1

    def __getitem__(self, name):
        return self.counts.get(name, 0)


def add(x, y):
    return x + y


def mul(x, y):
    return x * y


def const(v):
    return v


# -- building and the results ------------------------------------------------------------------


def test_diamond_passes_results_along(tasks):
    wf = TaskChain("diamond", tasks=tasks)
    top = wf.step(const, 3)
    left = wf.step(mul, top, 10)
    right = wf.step(add, top, y=4)  # a Step as a keyword value too
    bottom = wf.step(lambda a, b: (a, b), left, right, step_name="bottom")
    assert (top.id, left.id, right.id, bottom.id) == ("diamond_0", "diamond_1", "diamond_2", "bottom")
    r = wf.execute()
    assert r.wait(T) == {"diamond_0": 3, "diamond_1": 30, "diamond_2": 7, "bottom": (30, 7)}
    assert r.status is TaskStatus.SUCCEEDED


def test_a_step_taking_many_results_mixed_with_plain_values(tasks):
    wf = TaskChain("wide", tasks=tasks)
    parts = [wf.step(const, i) for i in range(12)]
    # results in positions 0..11 and keywords, plain values around them, a results_of() list
    args = [p if i % 2 else i * 100 for i, p in enumerate(parts)] + parts[::2]
    last = wf.step(lambda *a, **k: (a, k), *args, extra=results_of(*parts[:3]), k=parts[11], plain="x")
    out = wf.execute().wait(T)[last.id]
    assert out == (tuple(i if i % 2 else i * 100 for i in range(12)) + tuple(range(0, 12, 2)),
                   {"extra": [0, 1, 2], "k": 11, "plain": "x"})


def test_seed_style_add_task_with_depends_on_and_result_of(tasks):
    order = []
    lock = threading.Lock()

    def record(name, *values):
        with lock:
            order.append(name)
        return (name, values)

    wf = TaskChain("seed", tasks=tasks)
    assert wf.add_task(record, "a") is wf  # returns the chain, as the seed's API
    wf.add_task(record, "b", depends_on=["seed_0"]).add_task(record, "c", depends_on="seed_1")
    wf.add_task(record, "d", result_of("seed_0"), results_of("seed_1", "seed_2"), depends_on=[])
    assert wf.step_ids == ["seed_0", "seed_1", "seed_2", "seed_3"] and len(wf) == 4
    out = wf.execute().wait(T)
    assert order.index("a") < order.index("b") < order.index("c") < order.index("d")
    assert out["seed_3"] == ("d", (("a", ()), [("b", ()), ("c", ())]))


def test_a_step_may_name_a_step_added_after_it(tasks):
    seen = []
    wf = TaskChain("fwd", tasks=tasks)
    wf.add_task(seen.append, "second", depends_on=["first"])
    wf.add_task(seen.append, "first", step_name="first")
    wf.execute().wait(T)
    assert seen == ["first", "second"]


def test_fan_out_to_1000_steps_and_fan_in(tasks):
    wf = TaskChain("fan", tasks=tasks)
    root = wf.step(const, 2)
    parts = [wf.step(mul, root, i) for i in range(1000)]
    total = wf.step(sum, results_of(*parts), step_name="total")
    out = wf.execute().wait(T)
    assert out["total"] == 2 * sum(range(1000))
    assert len(out) == 1002 and out[parts[7].id] == 14 and total.id == "total"


def test_independent_steps_run_in_parallel(tasks):
    # Both steps must be inside wait() at the same time, or the barrier breaks after T s.
    barrier = threading.Barrier(2, timeout=T)
    wf = TaskChain("par", tasks=tasks)
    a = wf.step(barrier.wait)
    b = wf.step(barrier.wait)
    wf.step(lambda x, y: sorted((x, y)), a, b, step_name="join")
    assert wf.execute().wait(T)["join"] == [0, 1]


def test_a_random_dag_computes_what_a_serial_evaluation_does(tasks):
    rng = random.Random(7)
    wf = TaskChain("rand", tasks=tasks)
    steps, expected = [], []
    for i in range(2000):
        deps = rng.sample(range(i), min(i, rng.randint(0, 3)))
        steps.append(wf.step(lambda i, *vals: (i + sum(vals)) % 1_000_003, i, *(steps[d] for d in deps)))
        expected.append((i + sum(expected[d] for d in deps)) % 1_000_003)
    out = wf.execute().wait(T)
    assert [out[s.id] for s in steps] == expected


def test_empty_workflow_and_repeated_independent_executions(tasks):
    assert TaskChain("empty", tasks=tasks).execute().wait(T) == {}
    wf = TaskChain("again", tasks=tasks)
    wf.step(add, wf.step(const, 1), 1)
    results = [wf.execute() for _ in range(20)]
    assert all(r.wait(T) == {"again_0": 1, "again_1": 2} for r in results)


def test_async_steps_and_kwargs(tasks):
    async def fetch(x, *, scale):
        await asyncio.sleep(0)
        return x * scale

    wf = TaskChain("async", tasks=tasks)
    a = wf.step(fetch, 2, scale=5)
    wf.step(fetch, a, scale=3)
    assert wf.execute().wait(T) == {"async_0": 10, "async_1": 30}


# -- validation --------------------------------------------------------------------------------


def test_cycle_is_an_error_naming_its_steps(tasks):
    wf = TaskChain("loop", tasks=tasks)
    wf.add_task(const, 1, step_name="ok")
    wf.add_task(const, 1, step_name="a", depends_on=["c", "ok"])
    wf.add_task(const, 2, step_name="b", depends_on=["a"])
    wf.add_task(const, 3, step_name="c", depends_on=["b"])
    with pytest.raises(ValueError, match=r"workflow 'loop': dependency cycle: ('a' -> 'c' -> 'b' -> 'a'|"
                                         r"'b' -> 'a' -> 'c' -> 'b'|'c' -> 'b' -> 'a' -> 'c')"):
        wf.execute()
    assert tasks.stats()["submitted"] == 0  # nothing was queued

    self_loop = TaskChain("self", tasks=tasks)
    self_loop.add_task(const, 1, depends_on=["self_0"])
    with pytest.raises(ValueError, match=r"dependency cycle: 'self_0' -> 'self_0'"):
        self_loop.validate()


def test_unknown_step_is_an_error_naming_both(tasks):
    wf = TaskChain("unk", tasks=tasks)
    wf.add_task(const, 1)
    wf.add_task(const, 2, depends_on=["unk_0", "nope"])
    with pytest.raises(ValueError, match=r"step 'unk_1' depends on unknown step 'nope'; the steps are 'unk_0', "
                                         r"'unk_1'"):
        wf.execute()
    wf2 = TaskChain("unk2", tasks=tasks)
    wf2.add_task(add, result_of("missing"), 1)
    with pytest.raises(ValueError, match="unknown step 'missing'"):
        wf2.validate()


def test_duplicate_step_name_is_an_error_naming_the_steps(tasks):
    wf = TaskChain("dup", tasks=tasks)
    wf.add_task(const, 1, step_name="load")
    with pytest.raises(ValueError, match=r"duplicate step name 'load': step 0 and step 1"):
        wf.add_task(const, 2, step_name="load")
    wf.add_task(const, 3, step_name="dup_2")  # an explicit name ...
    with pytest.raises(ValueError, match=r"duplicate step name 'dup_2': step 1 and step 2"):
        wf.add_task(const, 4)  # ... taken by the automatic id of the next step
    assert wf.step_ids == ["load", "dup_2"]


def test_building_errors_are_clear(tasks):
    wf = TaskChain("b", tasks=tasks)
    other = TaskChain("other", tasks=tasks)
    foreign = other.step(const, 1)
    with pytest.raises(TypeError, match="needs a callable"):
        wf.add_task(const(1))
    with pytest.raises(ValueError, match="step 'other_0' of another workflow"):
        wf.add_task(add, foreign, 1)
    with pytest.raises(ValueError, match="of another workflow"):
        wf.add_task(const, 1, depends_on=[foreign])
    s = wf.step(const, 1)
    with pytest.raises(TypeError, match="only top-level arguments are"):
        wf.add_task(sum, [s, s])
    with pytest.raises(TypeError, match="expected a step id"):
        wf.add_task(const, 1, depends_on=[3])
    with pytest.raises(ValueError, match="step_name must be a non-empty string"):
        wf.add_task(const, 1, step_name="")
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        TaskChain("")
    assert isinstance(s, Step) and repr(s) == "<Step 'b_0' of workflow 'b'>"


# -- failure -----------------------------------------------------------------------------------


class Boom(Exception):
    pass


def test_a_failing_step_fails_the_workflow_and_its_dependents_never_run(tasks):
    ran = Counter()

    def step(name, *_):
        ran.hit(name)
        if name == "b":
            raise Boom("b broke")
        return name

    wf = TaskChain("fail", tasks=tasks)
    a = wf.step(step, "a", step_name="a")
    b = wf.step(step, "b", a, step_name="b")
    c = wf.step(step, "c", b, step_name="c")
    wf.step(step, "d", c, step_name="d")
    wf.step(step, "e", b, a, step_name="e")
    r = wf.execute()
    with pytest.raises(WorkflowError, match=r"workflow 'fail': step 'b' failed: Boom: b broke") as info:
        r.wait(T)
    err = info.value
    assert err.step == "b" and err.workflow == "fail"
    assert isinstance(err.__cause__, Boom)
    assert err.results == {"a": "a"}
    assert r.status is TaskStatus.FAILED
    tasks.join(T)
    assert (ran["a"], ran["b"], ran["c"], ran["d"], ran["e"]) == (1, 1, 0, 0, 0)


def test_retries_come_from_the_steps_own_config(tasks):
    attempts = Counter()

    @task(max_retries=2, retry_backoff="fixed", retry_base_ms=1)
    def flaky(name, fail_times):
        attempts.hit(name)
        if attempts[name] <= fail_times:
            raise Boom(f"{name} attempt {attempts[name]}")
        return name

    ok = TaskChain("retry", tasks=tasks)
    ok.step(const, ok.step(flaky, "twice", 2))
    assert ok.execute().wait(T) == {"retry_0": "twice", "retry_1": "twice"}
    assert attempts["twice"] == 3

    never = TaskChain("retry2", tasks=tasks)
    after = Counter()
    never.step(after.hit, never.step(flaky, "always", 99))
    with pytest.raises(WorkflowError, match="step 'retry2_0' failed: Boom: always attempt 3"):
        never.execute().wait(T)
    tasks.join(T)
    assert attempts["always"] == 3 and after.counts == {}


def test_steps_already_running_elsewhere_finish_after_a_failure(tasks):
    started, gate = threading.Event(), threading.Event()
    finished = Counter()

    def slow():
        started.set()
        gate.wait(T)
        finished.hit("slow")
        return "slow"

    def fail():
        started.wait(T)  # fail only once slow() is running
        raise Boom("now")

    wf = TaskChain("run", tasks=tasks)
    s = wf.step(slow, step_name="slow")
    wf.step(fail, step_name="fail")
    wf.step(finished.hit, s, step_name="after_slow")
    r = wf.execute()
    with pytest.raises(WorkflowError, match="step 'fail' failed"):
        r.wait(T)  # the workflow fails while slow() still runs
    assert finished.counts == {}
    gate.set()
    tasks.join(T)
    assert finished.counts == {"slow": 1}  # slow() finished; its dependent never ran


def test_a_step_that_cannot_be_queued_fails_the_workflow(tasks):
    from catzilla_tasks import TaskConfig

    def local():  # a nested function cannot be pickled for a process-isolated task
        return 1

    local.__catzilla_task__ = TaskConfig(isolation="process")
    wf = TaskChain("noqueue", tasks=tasks)
    wf.step(local, wf.step(const, 1))
    with pytest.raises(WorkflowError, match="step 'noqueue_1' could not be queued: TypeError") as info:
        wf.execute().wait(T)
    assert isinstance(info.value.__cause__, TypeError)


# -- cancellation -------------------------------------------------------------------------------


def test_cancel_the_workflow_result_stops_what_has_not_started(tasks):
    started, gate = threading.Event(), threading.Event()
    ran = Counter()
    asked = []

    def long_step():
        started.set()
        gate.wait(T)
        asked.append(current_task().cancel_requested)
        ran.hit("long")

    wf = TaskChain("cancel", tasks=tasks)
    first = wf.step(long_step)
    wf.step(ran.hit, "next", depends_on=[first])
    r = wf.execute()
    assert started.wait(T)
    assert r.cancel() is True
    assert r.status is TaskStatus.CANCELLED
    with pytest.raises(TaskCancelled):
        r.wait(T)
    gate.set()
    tasks.join(T)
    assert asked == [True]  # the running step was asked to stop ...
    assert ran.counts == {"long": 1}  # ... it finished, and its dependent never ran


def test_cancel_on_the_chain_cancels_queued_steps(tasks):
    ran = Counter()
    wf = TaskChain("queued", tasks=tasks)
    roots = [wf.step(ran.hit, i) for i in range(50)]
    wf.step(ran.hit, "end", depends_on=roots)
    tasks.pause()
    try:
        r1, r2 = wf.execute(), wf.execute()
        assert tasks.stats()["queued_total"] == 100
        assert wf.cancel() is True
    finally:
        tasks.resume()
    tasks.join(T)
    assert r1.status is TaskStatus.CANCELLED and r2.status is TaskStatus.CANCELLED
    assert ran.counts == {}  # the queued steps were cancelled before any ran
    assert tasks.stats()["cancelled"] == 100
    assert wf.cancel() is False  # nothing left to cancel


# -- engines -------------------------------------------------------------------------------------


def test_chain_for_runs_on_that_engine(tasks, make_tasks):
    other = make_tasks(workers=2)
    other.pause()
    try:
        r = chain_for(other, "mine").add_task(const, 5).execute()
        assert other.stats()["queued_total"] == 1 and tasks.stats()["queued_total"] == 0
    finally:
        other.resume()
    assert r.wait(T) == {"mine_0": 5}


def test_tasks_chain_is_a_workflow_on_that_engine(tasks, make_tasks):
    import catzilla_tasks

    other = make_tasks(workers=2)
    wf = other.chain("etl")
    assert isinstance(wf, catzilla_tasks.TaskChain) and wf.tasks is other
    other.pause()
    try:
        r = wf.add_task(const, 2).add_task(add, result_of("etl_0"), 3).execute()
        assert other.stats()["queued_total"] == 1 and tasks.stats()["queued_total"] == 0
    finally:
        other.resume()
    assert r.wait(T) == {"etl_0": 2, "etl_1": 5}


def test_default_engine_is_the_most_recently_created_live_one(make_tasks):
    older = make_tasks(workers=2)
    assert default_engine() is older
    newer = make_tasks(workers=2)
    assert default_engine() is newer
    wf = TaskChain("default")  # no engine given: resolved at execute()
    wf.add_task(const, 1)
    newer.pause()
    try:
        r = wf.execute()
        assert newer.stats()["queued_total"] == 1 and older.stats()["queued_total"] == 0
    finally:
        newer.resume()
    assert r.wait(T) == {"default_0": 1}
    newer.shutdown()
    assert default_engine() is older  # the newest one still running


def test_a_default_engine_is_created_on_first_use():
    code = (
        "from catzilla_tasks import engine\n"
        "from catzilla_tasks.workflows import chain\n"
        "assert not list(engine._live)\n"
        "print(chain((int, '4'), (pow, 2)).execute().wait(10)['chain_1'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "16"


def test_executing_on_a_shut_down_engine_raises(make_tasks):
    eng = make_tasks(workers=2)
    wf = TaskChain("late", tasks=eng).add_task(const, 1)
    eng.shutdown()
    with pytest.raises(RuntimeError, match="has been shut down"):
        wf.execute()


def test_steps_left_to_queue_when_the_engine_stops_accepting_fail_the_workflow(make_tasks):
    eng = make_tasks(workers=2)
    started, gate = threading.Event(), threading.Event()
    ran = Counter()

    def first():
        started.set()
        gate.wait(T)
        return 1

    wf = TaskChain("closing", tasks=eng)
    wf.step(ran.hit, wf.step(first), step_name="second")
    r = wf.execute()
    assert started.wait(T)
    eng._close()  # what shutdown() does first: no new task is accepted
    gate.set()
    with pytest.raises(WorkflowError, match="step 'second' could not be queued: RuntimeError") as info:
        r.wait(T)
    assert "shut down" in str(info.value.__cause__)
    eng.shutdown()
    assert ran.counts == {}


def test_a_full_engine_delays_steps_but_loses_none(make_tasks):
    eng = make_tasks(workers=2, queue_size=32)
    wf = TaskChain("full", tasks=eng)
    root = wf.step(const, 1)
    parts = [wf.step(add, root, i) for i in range(500)]
    wf.step(sum, results_of(*parts), step_name="total")
    extra = [wf.step(const, i) for i in range(100)]  # more roots than the queue holds
    out = wf.execute().wait(T)
    assert out["total"] == sum(1 + i for i in range(500))
    assert [out[s.id] for s in extra] == list(range(100))
    assert eng.stats()["rejected"] > 0  # the engine was full, and the steps waited for room


def test_a_workflow_in_an_engine_under_load(tasks):
    done = itertools.count()

    def busy(i):
        next(done)

    def flood():
        for i in range(20_000):
            tasks.options(block_timeout=T).add_task(busy, i)

    rng = random.Random(3)
    wf = TaskChain("load", tasks=tasks)
    steps, expected = [], []
    for i in range(1000):
        deps = rng.sample(range(i), min(i, rng.randint(0, 3)))
        steps.append(wf.step(lambda i, *vals: i + sum(vals) % 997, i, *(steps[d] for d in deps)))
        expected.append(i + sum(expected[d] for d in deps) % 997)
    flooder = threading.Thread(target=flood)
    flooder.start()
    results = [wf.execute() for _ in range(3)]
    flooder.join(T)
    for r in results:
        out = r.wait(T)
        assert [out[s.id] for s in steps] == expected
    tasks.join(T)
    assert next(done) == 20_000


# -- await and futures ----------------------------------------------------------------------------


def test_await_a_workflow(tasks):
    wf = TaskChain("aw", tasks=tasks)
    wf.step(add, wf.step(const, 20), 22)

    async def main():
        via_future = await wf.execute_async()
        via_result = await wf.execute()
        doubled = await wf.execute_async().then(lambda out: out["aw_1"] * 2)
        return via_future, via_result, doubled

    via_future, via_result, doubled = asyncio.run(main())
    assert via_future == via_result == {"aw_0": 20, "aw_1": 42} and doubled == 84


def test_await_a_failing_workflow(tasks):
    wf = TaskChain("awf", tasks=tasks)
    wf.step(divmod, 1, 0)

    async def main():
        with pytest.raises(WorkflowError) as info:
            await wf.execute_async()
        return info.value

    err = asyncio.run(main())
    assert err.step == "awf_0" and isinstance(err.__cause__, ZeroDivisionError)


# -- @workflow -------------------------------------------------------------------------------------


def test_workflow_decorator_with_arguments(tasks):
    @workflow("report", tasks=tasks)
    def report(wf, day, shards):
        rows = [wf.step(mul, day, shard) for shard in range(shards)]
        wf.step(sum, results_of(*rows), step_name="summary")

    assert report.execute(3, shards=4).wait(T)["summary"] == 3 * (0 + 1 + 2 + 3)
    assert report.build(1, shards=2).step_ids == ["report_0", "report_1", "summary"]
    assert report.name == "report"


def test_workflow_decorator_without_parameters(tasks, make_tasks):
    @workflow(tasks=tasks)
    def nightly(wf):
        wf.step(add, wf.step(later_defined, 1), 2)  # a name defined after the decorator ran

    def later_defined(x):
        return x

    assert nightly.name == "nightly"
    assert nightly.execute().wait(T) == {"nightly_0": 1, "nightly_1": 3}
    other = make_tasks(workers=2)
    assert nightly.on(other).build().tasks is other

    @workflow("broken")
    def broken(wf):
        wf.add_task(const, 1, step_name="x", depends_on=["x"])

    with pytest.raises(ValueError, match="workflow 'broken': dependency cycle: 'x' -> 'x'"):
        broken.execute()


# -- Celery-style helpers ---------------------------------------------------------------------------


def test_chain_passes_each_value_to_the_next_call(tasks):
    c = chain(call(const, 2), (pow, 10), call(add, y=1), str, tasks=tasks)
    out = c.execute().wait(T)
    assert out == {"chain_0": 2, "chain_1": 1024, "chain_2": 1025, "chain_3": "1025"}
    assert out[c.step_ids[-1]] == "1025"


def test_group_runs_calls_in_parallel(tasks):
    barrier = threading.Barrier(3, timeout=T)
    g = group(barrier.wait, barrier.wait, call(barrier.wait), name="g", tasks=tasks)
    assert sorted(g.execute().wait(T).values()) == [0, 1, 2]


def test_chord_calls_back_with_the_list_of_values(tasks):
    c = chord(group(*(call(mul, i, i) for i in range(10)), tasks=tasks), call(sum, start=1000))
    out = c.execute().wait(T)
    assert out[c.step_ids[-1]] == 1000 + sum(i * i for i in range(10))
    assert c.tasks is tasks
    plain = chord([(add, 1, 2), (add, 3, 4)], (lambda values, tag: (tag, values), "t"), name="ch", tasks=tasks)
    assert plain.execute().wait(T)["ch_2"] == ("t", [3, 7])


def test_chord_failure_skips_the_callback(tasks):
    called = Counter()
    c = chord(group((divmod, 1, 1), (divmod, 1, 0), tasks=tasks), called.hit)
    with pytest.raises(WorkflowError, match="step 'chord_1' failed: ZeroDivisionError"):
        c.execute().wait(T)
    tasks.join(T)
    assert called.counts == {}


def test_helper_type_errors():
    with pytest.raises(TypeError, match="call\\(func"):
        chain(42)
    with pytest.raises(TypeError, match="needs a callable"):
        call("not callable")
    with pytest.raises(TypeError, match="step id"):
        results_of(1)
    assert repr(call(add, 1, y=2)) == "call(add, 1, y=2)"


# -- stress ---------------------------------------------------------------------------------------


@pytest.mark.stress
def test_many_concurrent_workflows_with_failures_and_cancels(tasks, caplog):
    """A step runs only once every dependency succeeded; every workflow ends; no callback
    raises. 300 random 150-step DAGs at once (30 under the sanitizer build), some with failing
    steps, some cancelled."""
    rng = random.Random(11)
    nruns = max(30, min(300, STRESS_N // 3333))
    lock = threading.Lock()
    log = []  # (run, step) of every step that ran
    fails = set()  # (run, step) that raised

    def step(run, i, fail, *_deps):
        with lock:
            log.append((run, i))
        if fail:
            with lock:
                fails.add((run, i))
            raise Boom(f"{run}/{i}")
        return i

    shapes, results = [], []
    for run in range(nruns):
        wf = TaskChain(f"w{run}", tasks=tasks)
        shape, steps = [], []
        for i in range(150):
            deps = rng.sample(range(i), min(i, rng.randint(0, 3)))
            fail = run % 3 == 1 and rng.random() < 0.02
            steps.append(wf.step(step, run, i, fail, *(steps[d] for d in deps)))
            shape.append(deps)
        shapes.append(shape)
        results.append(wf.execute())
        if run % 3 == 2 and run % 2:
            results[-1].cancel()
    with caplog.at_level("ERROR", logger="catzilla_tasks"):
        outcomes = []
        for r in results:
            try:
                outcomes.append(r.wait(T * 3))
            except (WorkflowError, TaskCancelled) as exc:
                outcomes.append(exc)
        tasks.join(T)
    ran = {}
    for run, i in log:
        ran.setdefault(run, set()).add(i)
    for run, shape in enumerate(shapes):
        ok = ran.get(run, set()) - {i for r, i in fails if r == run}
        for i in ran.get(run, ()):
            assert all(d in ok for d in shape[i]), f"run {run}: step {i} ran before its dependencies succeeded"
        out = outcomes[run]
        if isinstance(out, dict):
            assert out == {f"w{run}_{i}": i for i in range(150)}
        elif isinstance(out, WorkflowError):
            assert (run, int(out.step.split("_")[1])) in fails
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    kinds = {type(o).__name__ for o in outcomes}
    assert kinds == {"dict", "WorkflowError", "TaskCancelled"}, kinds


def test_workflows_finish_when_queueing_a_step_lets_other_threads_run(tasks):
    """A step queued by execute() or by its last dependency's worker can start and end on
    another worker before its gate is hooked to its end, when the hooking lets other threads
    run (the collector running a finalizer): its dependents are released all the same. Before
    the fix, such workflows never ended (CI saw one in the whole suite)."""
    nruns = 150 if STRESS_N >= 1_000_000 else 40
    chains = []
    for run in range(nruns):
        wf = TaskChain(f"g{run}", tasks=tasks)
        a = wf.step(add, run, 1)
        b = wf.step(add, a, 1)
        c = wf.step(add, a, 2)
        wf.step(add, b, c)
        chains.append(wf.validate())
    with gc_pressure_on(pause=0.001):
        results = [wf.execute() for wf in chains]
        for run, r in enumerate(results):
            assert r.wait(T) == {f"g{run}_0": run + 1, f"g{run}_1": run + 2, f"g{run}_2": run + 3,
                                 f"g{run}_3": 2 * run + 5}


# -- the engine's gates (release in C) ---------------------------------------------------------


class FailLog:
    """on_fail(gate, exc) of hand-made gates: what C reported, and an Event per report."""

    def __init__(self):
        self.calls = []
        self.event = threading.Event()

    def __call__(self, gate, exc):
        self.calls.append((gate.step, exc))
        self.event.set()


def test_gates_count_down_and_fill_results_in_the_engine(make_tasks):
    eng = make_tasks(workers=2)
    fails = FailLog()
    done = threading.Event()
    seen = []

    def last(x, y):
        seen.append((x, y))
        done.set()
        return x * y

    # 0: const(5); 1: add(<0>, 10); 2: last(<1>, <0 and 1 as a list>) — released by 0 and 1
    gates = eng._gates(
        (const, add, last),
        ((5,), (None, 10), (None, None)),
        (None, None, ("y",)),
        (0, 1, 2),
        ((1, 2), (2,), ()),
        (None, ((0, 0),), ((0, 1), (1, (0, 1)))),
        fails,
    )
    assert [g.pending for g in gates] == [0, 1, 2] and [g.state for g in gates] == [0, 0, 0]
    eng.pause()
    assert gates[0]._fire() is True
    assert eng.stats()["queued_total"] == 1 and gates[1].result is None  # nothing else queued yet
    eng.resume()
    assert done.wait(T)
    assert gates[2].result.wait(T) == 15 * [5, 15]
    assert seen == [(15, [5, 15])]
    assert [g.pending for g in gates] == [0, 0, 0] and [g.state for g in gates] == [1, 1, 1]
    assert [g.value for g in gates[:2]] == [5, 15]
    assert not fails.calls
    with pytest.raises(RuntimeError, match="already queued"):
        gates[0]._fire()


def test_a_failing_gate_reports_and_releases_nothing(make_tasks):
    eng = make_tasks(workers=2)
    fails = FailLog()

    def boom():
        raise ValueError("boom")

    ran = Counter()
    gates = eng._gates((boom, ran.hit), ((), ("child",)), (None, None), (0, 1), ((1,), ()), (None, None), fails)
    assert gates[0]._fire() is True
    assert fails.event.wait(T)
    assert fails.calls == [(0, None)]  # the task ended unsuccessfully: its result tells how
    with pytest.raises(ValueError, match="boom"):
        gates[0].result.wait(T)
    eng.join(T)
    assert gates[1].state == 0 and gates[1].result is None and gates[1].pending == 1 and ran["child"] == 0
    with pytest.raises(RuntimeError, match="has not succeeded"):
        _ = gates[0].value
    assert gates[1].cancel() is True and gates[1].state == 2
    with pytest.raises(RuntimeError, match="cancelled"):
        gates[1]._fire()


def test_a_gate_released_into_a_full_engine_is_reported_not_lost(make_tasks):
    eng = make_tasks(workers=1, min_workers=1, queue_size=2)
    fails = FailLog()
    started, go = threading.Event(), threading.Event()

    def parent():
        started.set()
        assert go.wait(T)

    gates = eng._gates((parent, const), ((), (7,)), (None, None), (0, 1), ((1,), ()), (None, None), fails)
    assert gates[0]._fire() is True
    assert started.wait(T)
    eng.pause()
    fillers = [eng.add_task(const, i) for i in range(2)]  # the queue is full now
    go.set()
    assert fails.event.wait(T)
    (step, exc), = fails.calls
    assert step == 1 and type(exc).__name__ == "QueueFull"
    assert gates[1].state == 0  # still waiting: the caller decides (the workflow parks it)
    eng.resume()
    for f in fillers:
        f.wait(T)
    assert gates[1]._fire() is True and gates[1].result.wait(T) == 7


def test_gate_arguments_are_checked(make_tasks):
    eng = make_tasks(workers=2)
    fails = FailLog()
    with pytest.raises(TypeError, match="callable"):
        eng._gates((42,), ((),), (None,), (0,), ((),), (None,), fails)
    with pytest.raises(ValueError, match="one entry per step"):
        eng._gates((const,), ((), ()), (None,), (0,), ((),), (None,), fails)
    with pytest.raises(IndexError, match="out of range"):
        eng._gates((const,), ((1,),), (None,), (0,), ((3,),), (None,), fails)
    with pytest.raises(ValueError, match="fill out of range"):
        eng._gates((const,), ((1,),), (None,), (0,), ((),), (((5, 0),),), fails)


def test_workflow_steps_are_queued_without_python_add_task(make_tasks, monkeypatch):
    # Release is the engine's: the Python add_task is never used to queue a step.
    eng = make_tasks(workers=2)

    def refuse(*a, **k):
        raise AssertionError("a step was queued through Python add_task")

    monkeypatch.setattr(eng, "add_task", refuse, raising=False)
    wf = TaskChain("c-release", tasks=eng)
    a = wf.step(const, 2)
    b = wf.step(add, a, 3)
    wf.step(mul, b, a)
    assert wf.execute().wait(T) == {"c-release_0": 2, "c-release_1": 5, "c-release_2": 10}


def test_a_cycle_through_a_finished_steps_task_is_collected(make_tasks):
    """A gate keeps its task (not a TaskResult) once queued; when the task is over and the
    engine has let go of it, the cycle collector must see through the gate into the task's
    function and value, or a cycle through them would never be freed."""
    import gc
    import weakref

    class Marker:
        pass

    def run_once(fail: bool) -> weakref.ref:
        tasks = make_tasks(workers=2)
        holder: list = []
        marker = Marker()

        def step_fn():  # closes over holder, which will hold the gates: gate -> task -> fn -> gate
            if fail:
                raise ValueError(marker)  # the task's value (the exception) holds the marker too
            return marker

        done = threading.Event()
        seen: list = []

        def on_fail(gate, exc):
            seen.append(exc)
            done.set()

        def finish():
            done.set()

        holder.extend(tasks._gates((step_fn, finish), ((), ()), (None, None), (0, 1), ((1,), ()), (None, None),
                                   on_fail))
        assert holder[0]._fire()
        assert done.wait(T)
        if fail:
            assert len(seen) == 1 and seen[0] is None  # None: read gate.result
            with pytest.raises(ValueError):
                holder[0].result.wait(T)
        else:
            assert holder[0].value is marker
            assert holder[1].result.wait(T) is None
        seen.clear()
        tasks.shutdown()  # every worker has let go of its tasks: the gates own them
        return weakref.ref(marker)

    for fail in (False, True):
        ref = run_once(fail)
        gc.collect()
        assert ref() is None, f"a cycle through a finished step's task was never freed (failing step: {fail})"


def test_finished_workflows_leave_no_gates_behind(tasks):
    import gc

    def gates_alive():
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o).__name__ == "Gate")

    before = gates_alive()
    wf = TaskChain("leak", tasks=tasks)
    root = wf.step(const, 1)
    parts = [wf.step(add, root, i) for i in range(50)]
    wf.step(sum, results_of(*parts))
    bad = TaskChain("leak-fail", tasks=tasks)
    bad.step(add, bad.step(int, "not a number"), 1)
    for _ in range(20):
        wf.execute().wait(T)
        with pytest.raises(WorkflowError):
            bad.execute().wait(T)
    assert gates_alive() == before
