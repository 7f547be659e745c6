"""Tasks with rate limits, concurrency limits, named queues and progress, for the distributed
tests (workers import them by name; see test_rate_limits.py, test_routing.py, test_progress.py)."""

from __future__ import annotations

import os
import time

from catzilla_tasks import current_task, task

FUNCS = []


def _reg(f):
    FUNCS.append(f)
    return f


def register(engine) -> None:
    for f in FUNCS:
        engine._registered[f"{f.__module__}.{f.__qualname__}"] = f


def _r():
    import redis_tasks

    return redis_tasks._sync_client()


@_reg
@task(rate_limit="20/s")
def rated(log: str, i: int) -> int:
    _r().rpush(log, f"{i} {time.time()!r}")
    return i


def log_admissions(key: str) -> None:
    """Test instrumentation (worker processes): push ``"<i> <slot s>"`` to ``key`` for every
    call of ``rated`` the rate limiter admits, with the slot it reserved (server clock)."""
    from catzilla_tasks.brokers.protocol import MSG_ARGS, MSG_NAME, MSG_OPTIONS, OPT_RESERVED
    from catzilla_tasks.brokers.worker import Worker

    orig = Worker._admit

    def admit(self, jobs):
        first = [not (len(j.msg) > MSG_OPTIONS and j.msg[MSG_OPTIONS] and OPT_RESERVED in j.msg[MSG_OPTIONS])
                 for j in jobs]
        orig(self, jobs)
        rows = []
        for j, new in zip(jobs, first, strict=True):
            if not new or j.error is not None or not j.msg[MSG_NAME].endswith(".rated"):
                continue
            if j.limit_deferred:
                slot_ms = self.broker.serializer.loads(j.payload)[MSG_OPTIONS][OPT_RESERVED]
            else:
                slot_ms = time.time() * 1000 + self.session.clock_offset_ms() + j.local_delay
            rows.append(f"{j.msg[MSG_ARGS][1]} {slot_ms / 1000!r}")
        if rows:
            _r().rpush(key, *rows)

    Worker._admit = admit


@_reg
@task(rate_limit="1000000/s")
def rated_far(i: int) -> int:
    return i


@_reg
@task
def unlimited(i: int) -> int:
    return i


@_reg
@task(rate_limit="2/s", rate_limit_key=lambda customer, log: customer)
def per_customer(customer: str, log: str) -> str:
    _r().rpush(log, f"{customer} {time.time()!r}")
    return customer


@_reg
@task(concurrency_limit=2)
def limited(counter: str, log: str, seconds: float) -> int:
    r = _r()
    now = r.incr(counter)
    r.rpush(log, now)
    time.sleep(seconds)
    r.decr(counter)
    return int(now)


@_reg
@task(queue="emails")
def email(log: str, i: int, seconds: float = 0.0) -> str:
    time.sleep(seconds)
    _r().rpush(log, f"email {i}")
    return "emails"


@_reg
@task(queue="emails")
def queued_echo(x):
    return x


@_reg
@task
def default_job(log: str, i: int) -> str:
    _r().rpush(log, f"default {i}")
    return "default"


@_reg
@task
def reports(gate: str) -> str:
    t = current_task()
    t.set_progress(0.25, "a quarter")
    _r().blpop([gate], 30)  # held until the test has read the progress
    t.set_progress(1.0, "done")
    return str(os.getpid())


def __getattr__(name: str):
    if name == "tasks":  # `catzilla-tasks worker limit_tasks:tasks` (test processes set the environment)
        import redis_tasks

        from catzilla_tasks import BackgroundTasks
        from catzilla_tasks.brokers import RedisBroker

        broker = RedisBroker(os.environ["CT_TEST_REDIS_URL"], prefix=os.environ.get("CT_TEST_PREFIX", "ctt"))
        eng = BackgroundTasks(workers=4, broker=broker)
        redis_tasks.register(eng)
        register(eng)
        if os.environ.get("CT_TEST_ADMISSIONS"):
            log_admissions(os.environ["CT_TEST_ADMISSIONS"])
        globals()["tasks"] = eng
        return eng
    raise AttributeError(name)
