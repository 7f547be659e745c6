"""Times a producer accepts (issue 13, item 6; one rule with issue 12, item 6): NaN anywhere,
and infinite or past-the-bound (100 years) delays and retry bases, are refused where the task
is added (nothing reaches Redis), as in-process; an infinite or past-the-bound limit
(timeout_ms, retry_max_ms) means no limit. Against a real redis-server."""

from __future__ import annotations

import datetime
import math

import pytest
import redis_tasks as rt
from redis_helpers import prefix, redis, redis_url  # noqa: F401  (fixtures)

from catzilla_tasks import BackgroundTasks, TaskConfig
from catzilla_tasks.brokers import RedisBroker
from catzilla_tasks.config import MAX_MS

INF, NAN = math.inf, math.nan
BAD = [
    ({"delay_ms": INF}, "delay_ms"),
    ({"delay_ms": NAN}, "delay_ms"),
    ({"delay_ms": 1e300}, "delay_ms"),
    ({"delay_ms": MAX_MS * 2}, "delay_ms"),
    ({"timeout_ms": NAN}, "timeout_ms"),
    ({"retry_base_ms": INF, "retry_max_ms": INF}, "retry_base_ms"),
    ({"retry_base_ms": MAX_MS * 2}, "retry_base_ms"),
    ({"retry_max_ms": NAN}, "retry_max_ms"),
    ({"retry_base_ms": NAN}, "retry_base_ms"),
    ({"max_retries": 3, "retry_base_ms": 1e300, "retry_max_ms": 1e300}, "retry_base_ms"),
]


@pytest.fixture
def producer(redis_url, prefix):
    eng = BackgroundTasks(workers=2, broker=RedisBroker(redis_url, prefix=prefix))
    rt.register(eng)
    yield eng
    eng.shutdown(wait_for_completion=False, timeout=10)
    eng.broker.close()


def nothing_queued(broker: RedisBroker) -> bool:
    return all(n == 0 for n in broker.queued().values())


@pytest.mark.parametrize("fields,field", BAD, ids=[repr(b[0]) for b in BAD])
def test_bad_times_are_refused_at_options_on_the_producer(producer, fields, field):
    with pytest.raises(ValueError, match=field):
        producer.options(**fields).add_task(rt.add, 1, 2)
    assert nothing_queued(producer.broker)


@pytest.mark.parametrize("fields,field", BAD, ids=[repr(b[0]) for b in BAD])
def test_the_same_times_are_refused_in_process_and_in_decorators(fields, field):
    with pytest.raises(ValueError, match=field):
        TaskConfig(**fields)
    eng = BackgroundTasks(workers=2)
    try:
        with pytest.raises(ValueError, match=field):
            eng.options(**fields)
        with pytest.raises(ValueError, match=field):
            eng.task(**fields)(lambda: None)
    finally:
        eng.shutdown(timeout=10)


def test_far_eta_is_refused_and_nothing_is_queued(producer):
    with pytest.raises(ValueError, match="eta"):
        producer.options(eta=datetime.datetime(9999, 1, 1)).add_task(rt.add, 1, 2)
    assert nothing_queued(producer.broker)


def test_the_longest_representable_delay_is_kept_in_the_delayed_set(producer):
    b = producer.broker
    year_ms = 365 * 86400 * 1000
    producer.options(delay_ms=year_ms).add_task(rt.add, 1, 2)
    producer.options(delay_ms=MAX_MS).add_task(rt.add, 1, 2)
    assert b.queued()["delayed"] == 2 and b.queued()["NORMAL"] == 0
    now_ms = b.redis.time()[0] * 1000
    scores = sorted(s for _, s in b.redis.zrange(b.delayed_key, 0, -1, withscores=True))
    assert abs(scores[0] - (now_ms + year_ms)) < 60_000
    assert abs(scores[1] - (now_ms + MAX_MS)) < 60_000


NO_LIMIT = [{"timeout_ms": INF}, {"timeout_ms": 1e300}, {"timeout_ms": MAX_MS * 2},
            {"retry_max_ms": INF}, {"max_retries": 3, "retry_max_ms": 1e300}]


@pytest.mark.parametrize("fields", NO_LIMIT, ids=repr)
def test_an_infinite_or_huge_limit_means_no_limit(producer, fields):
    cfg = TaskConfig(**fields)
    if "timeout_ms" in fields:
        assert cfg.timeout_ms is None
    else:
        assert cfg.as_dict()["retry_max_ms"] == MAX_MS
    producer.options(**fields).add_task(rt.add, 1, 2)
    assert producer.broker.queued()["NORMAL"] == 1


@pytest.mark.parametrize("field", ["result_ttl", "idempotency_ttl", "visibility_timeout"])
@pytest.mark.parametrize("value", [NAN, INF, 1e300])
def test_broker_times_must_be_finite(redis_url, field, value):
    with pytest.raises(ValueError, match=field):
        RedisBroker(redis_url, **{field: value})


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "opts", [{"timeout_ms": NAN}, {"delay_ms": 1e300}, {"retry_base_ms": INF, "retry_max_ms": INF}]
)
def test_a_worker_dead_letters_a_message_whose_times_are_out_of_range(redis_url, prefix, monkeypatch, opts):
    """A message from a producer that did not check (an older version, another client): the
    worker refuses its options as add_task would, dead-letters it and goes on."""
    from test_redis_broker import Cluster

    c = Cluster(redis_url, prefix, monkeypatch)
    try:
        w = c.worker()
        b = c.broker
        b.publish_raw(2, b.serializer.dumps(["bad-1", "redis_tasks.add", [1, 2], {}, 0, opts]))
        with pytest.raises(ValueError, match=next(iter(opts))):
            b.result("bad-1").wait(20)
        assert c.producer.add_task(rt.add, 2, 3).wait(20) == 5  # the worker goes on
        assert [d["task_id"] for d in b.dead_letters()] == ["bad-1"]
        assert w.counts["dead_lettered"] == 1
    finally:
        c.close()
