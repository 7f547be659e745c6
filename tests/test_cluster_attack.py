"""Adversarial tests of the cluster view (issue 20): what the read side does with registry
entries it did not write (another version, another program under the same prefix, a hand
edit), the ``--json`` contract, what reaches an operator's terminal, the exporter with Redis
down, and the heartbeat through an outage."""

from __future__ import annotations

import json
import math
import time

import pytest
from redis_helpers import prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)

from catzilla_tasks.brokers.cluster import ClusterView
from catzilla_tasks.cli import main


def strict_json(text: str):
    """JSON as a strict parser (JavaScript's, jq's) reads it: NaN and Infinity are not JSON."""

    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().out


def _good(r, prefix: str, wid: str, now: float) -> None:
    r.zadd(f"{prefix}:cluster:workers", {wid: int(now * 1000)})
    r.hset(
        f"{prefix}:cluster:worker:{wid}",
        mapping={
            "id": wid,
            "host": "h",
            "pid": 7,
            "queues": '["default"]',
            "weights": "{}",
            "concurrency": 4,
            "started": repr(now - 5),
            "interval": "2.0",
            "last_seen": repr(now),
            "in_flight": 0,
            "processed": 3,
            "succeeded": 3,
            "failed": 0,
            "retried": 0,
            "reclaimed": 0,
            "rss_bytes": 1,
            "tasks": json.dumps(
                {
                    "t": {
                        "succeeded": 3,
                        "failed": 0,
                        "retried": 0,
                        "rate": 1.0,
                        "run": {"40": 3},
                        "run_sum_ns": 3000,
                        "wait": {},
                        "wait_sum_ns": 0,
                    }
                }
            ),
            "engine": "{}",
        },
    )


BAD_ENTRIES = {
    # not a hash at all (another program's key under the prefix)
    "wrong_type": lambda r, k: r.set(k, "garbage"),
    # JSON fields of the wrong shape (another version of the worker, a hand edit)
    "tasks_not_a_dict": lambda r, k: r.hset(
        k,
        mapping={"last_seen": repr(time.time()), "tasks": "[1, 2]", "queues": '"abc"', "engine": "5", "weights": "[]"},
    ),
    "task_fields_garbage": lambda r, k: r.hset(
        k,
        mapping={
            "last_seen": repr(time.time()),
            "queues": "[1, null]",
            "tasks": '{"t": {"succeeded": "x", "run": [1], "rate": "fast"}, "u": 5}',
            "engine": '{"exec": {"counts": {"a": "b"}, "sum_ns": "z"}}',
        },
    ),
    # numbers that are not finite
    "not_finite": lambda r, k: r.hset(
        k, mapping={"last_seen": "nan", "interval": "inf", "started": "-inf", "pid": "x", "rss_bytes": "1e400"}
    ),
    # fields missing
    "empty_fields": lambda r, k: r.hset(k, mapping={"host": "h"}),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", sorted(BAD_ENTRIES))
def test_one_malformed_registry_entry_does_not_blind_the_cluster_view(redis_url, prefix, capsys, kind):
    """One entry the view cannot read must not take the whole cluster view down with it: before,
    a WRONGTYPE hash, a ``tasks`` field that is a JSON list or holds strings made ``workers``,
    ``queues``, ``tasks`` (and the dashboard and the exporter, which read the same) fail for every
    worker; ``last_seen: nan`` came out of ``workers --json`` as ``NaN``, which is not JSON."""
    r = redis.Redis.from_url(redis_url)
    now = time.time()
    _good(r, prefix, "good-1", now)
    r.zadd(f"{prefix}:cluster:workers", {"bad-1": int(now * 1000)})
    BAD_ENTRIES[kind](r, f"{prefix}:cluster:worker:bad-1")

    rc, out = cli(capsys, "workers", "--broker", redis_url, "--prefix", prefix, "--json")
    assert rc == 0
    ws = {w["id"]: w for w in strict_json(out)}
    good = ws["good-1"]
    assert (good["state"], good["processed"], good["queues"]) == ("alive", 3, ["default"])
    for w in ws.values():
        assert w["state"] in ("alive", "lost")
        assert isinstance(w["last_seen"], (int, float)) and math.isfinite(w["last_seen"])
        assert isinstance(w["processed"], int) and isinstance(w["failed"], int)
        assert isinstance(w["queues"], list) and all(isinstance(q, str) for q in w["queues"])
    for argv in (["workers"], ["queues", "--json"], ["tasks"], ["tasks", "--json"]):
        rc, out = cli(capsys, argv[0], "--broker", redis_url, "--prefix", prefix, *argv[1:])
        assert rc == 0, argv
        if "--json" in argv:
            strict_json(out)
    rc, out = cli(capsys, "tasks", "--broker", redis_url, "--prefix", prefix, "--json")
    t = {x["name"]: x for x in strict_json(out)}["t"]
    assert t["succeeded"] >= 3 and t["run"]["samples"] >= 3
    with ClusterView(redis_url, prefix=prefix) as v:
        totals = v.totals()
    assert totals["workers_alive"] >= 1
    r.close()


@pytest.mark.timeout(60)
def test_malformed_failure_records_do_not_break_tasks(redis_url, prefix, capsys):
    """The latest failures of a name: a key of the wrong type, items that are not objects, an
    ``at`` that is not a number: before, ``tasks`` failed on each (WRONGTYPE, then a TypeError
    formatting the time)."""
    r = redis.Redis.from_url(redis_url)
    now = time.time()
    _good(r, prefix, "good-1", now)
    r.zadd(f"{prefix}:cluster:errors", {"t": int(now * 1000), "other": int(now * 1000)})
    r.lpush(
        f"{prefix}:cluster:errors:t",
        "[1]",
        "5",
        "not json",
        json.dumps({"at": "x", "task": "t", "task_id": "i1", "error": "ValueError: boom"}),
    )
    r.set(f"{prefix}:cluster:errors:other", "garbage")
    for argv in (["tasks"], ["tasks", "--json"]):
        rc, out = cli(capsys, argv[0], "--broker", redis_url, "--prefix", prefix, *argv[1:])
        assert rc == 0, argv
    assert "ValueError: boom" in cli(capsys, "tasks", "--broker", redis_url, "--prefix", prefix)[1]
    with ClusterView(redis_url, prefix=prefix) as v:
        names = {t["name"]: t for t in v.task_names()}
    assert [e["error"] for e in names["t"]["errors"]] == ["ValueError: boom"]
    assert names["other"]["errors"] == []
    r.close()


# -- what reaches an operator's terminal -------------------------------------------------------
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred\rover\x9b1m\u202eevil"


def _no_control(text: str) -> None:
    """Text for a terminal: no escape sequences, no carriage return, no C1 or bidi controls
    (newlines only between lines)."""
    bad = sorted({repr(c) for c in text if (ord(c) < 32 and c != "\n") or 0x7F <= ord(c) < 0xA0 or c == "\u202e"})
    assert not bad, f"control characters reach the terminal: {bad}"


@pytest.fixture
def worker_and_producer(redis_url, prefix):
    import os
    import threading

    import redis_tasks as rt

    from catzilla_tasks import BackgroundTasks
    from catzilla_tasks.brokers import RedisBroker, Worker

    os.environ["CT_TEST_REDIS_URL"] = redis_url
    eng = BackgroundTasks(workers=2, broker=RedisBroker(redis_url, prefix=prefix))
    rt.register(eng)
    w = Worker(eng, concurrency=2, heartbeat_interval=0.05)
    t = threading.Thread(target=w.run)
    t.start()
    assert w.ready.wait(10)
    p = BackgroundTasks(workers=1, broker=RedisBroker(redis_url, prefix=prefix))
    try:
        yield w, p
    finally:
        w.stop()
        t.join(20)
        eng.shutdown(wait_for_completion=False)
        p.shutdown(wait_for_completion=False)


@pytest.mark.timeout(60)
def test_tables_and_inspect_do_not_pass_terminal_escapes_through(worker_and_producer, redis_url, prefix, capsys):
    """An exception message is often made of user input (``ValueError(f"bad email {email}")``);
    before, ``tasks`` and ``inspect`` wrote it to the operator's terminal as it was: escape
    sequences (retitle the window, clear the screen, recolour), a carriage return that overwrites
    the line, bidi overrides. Likewise a worker's id and host in ``workers``. ``--json`` keeps
    the text as it is (JSON escapes it)."""
    import redis_tasks as rt

    w, p = worker_and_producer
    r = redis.Redis.from_url(redis_url)
    bad = p.add_task(rt.fails_until_set, f"{prefix}:never", 1, HOSTILE)
    with pytest.raises(RuntimeError):
        bad.wait(10)
    _good(r, prefix, "w\x1b[2J" + HOSTILE, time.time())
    r.hset(f"{prefix}:cluster:worker:w\x1b[2J{HOSTILE}", "host", HOSTILE)

    def failure_published():
        rc, out = cli(capsys, "tasks", "--broker", redis_url, "--prefix", prefix, "--json")
        return any(t["errors"] for t in json.loads(out))

    wait_until(failure_published, 10, "the failure in the registry")
    for argv in (["tasks"], ["workers"], ["inspect", bad.task_id]):
        rc, out = cli(capsys, argv[0], *argv[1:], "--broker", redis_url, "--prefix", prefix)
        _no_control(out)
        assert "red" in out and "evil" in out, argv  # the text itself is still shown
    rc, out = cli(capsys, "inspect", bad.task_id, "--broker", redis_url, "--prefix", prefix, "--json")
    assert json.loads(out)["error"]["message"] == HOSTILE
    r.close()


# -- the exporter with Redis down ---------------------------------------------------------------
@pytest.mark.timeout(60)
def test_exporter_says_when_it_cannot_read_redis(redis_url, prefix, capsys):
    """With Redis away the exporter answered an empty scrape: Prometheus counts that a success
    (``up`` 1) and every queue-depth and dead-letter series just vanishes, so an alert on them
    resolves itself during the outage, and ``--once`` printed nothing and exited 0. The exporter
    now says so: ``catzilla_tasks_cluster_up`` is 1 when Redis was read and 0 when it was not,
    and ``--once`` exits 1."""
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from catzilla_tasks import prometheus as prom
    from catzilla_tasks.brokers import RedisBroker

    def read(text):
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    with ClusterView(redis_url, prefix=prefix) as up:
        got = read(prom.collector_text(prom.ClusterCollector(up)).decode())
    assert got[("catzilla_tasks_cluster_up", ())] == 1
    from redis_helpers import free_port

    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    down = ClusterView(RedisBroker(nowhere, prefix=prefix, socket_connect_timeout=1, retry_on_timeout=False))
    try:
        got = read(prom.collector_text(prom.ClusterCollector(down)).decode())
    finally:
        down.close()
    assert got[("catzilla_tasks_cluster_up", ())] == 0
    assert not any(name.startswith("catzilla_tasks_queue_") for name, _ in got)  # no made-up depths
    assert main(["exporter", "--broker", nowhere, "--prefix", prefix, "--once"]) == 1
    captured = capsys.readouterr()
    assert "catzilla_tasks_cluster_up 0.0" in captured.out and "redis" in captured.err.lower()


# -- the heartbeat through an outage ------------------------------------------------------------
@pytest.mark.timeout(60)
def test_failures_seen_while_redis_was_away_are_published_by_the_next_beat(redis_url, prefix):
    """The failures a worker saw since its last beat were taken out of its figures before the
    beat was sent: a beat that could not reach Redis lost them, so the latest failures of a name
    missed exactly those of an outage. Now the next beat that gets through publishes them."""
    import os
    import threading

    import redis_tasks as rt
    from redis_helpers import free_port

    from catzilla_tasks import BackgroundTasks
    from catzilla_tasks.brokers import RedisBroker, Worker

    os.environ["CT_TEST_REDIS_URL"] = redis_url
    eng = BackgroundTasks(workers=2, broker=RedisBroker(redis_url, prefix=prefix))
    rt.register(eng)
    w = Worker(eng, concurrency=2, heartbeat_interval=3600)  # beats at its start, then when told to
    t = threading.Thread(target=w.run)
    t.start()
    p = BackgroundTasks(workers=1, broker=RedisBroker(redis_url, prefix=prefix))
    away = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    try:
        assert w.ready.wait(10)
        bad = p.add_task(rt.fails_until_set, f"{prefix}:never", 1, "seen during the outage")
        with pytest.raises(RuntimeError):
            bad.wait(10)
        name = "redis_tasks.fails_until_set"
        wait_until(lambda: w.figures.totals().get(name, {}).get("failed") == 1, 10, "the failure counted")
        hb = w._heartbeat_thread
        live, hb._r = hb._r, away  # this beat does not reach Redis
        try:
            with pytest.raises(redis.ConnectionError):
                hb.beat()
        finally:
            hb._r = live
        hb.beat()
        with ClusterView(redis_url, prefix=prefix) as v:
            names = {x["name"]: x for x in v.task_names()}
        assert [e["task_id"] for e in names[name]["errors"]] == [bad.task_id]
        assert "seen during the outage" in names[name]["errors"][0]["error"]
    finally:
        away.close()
        w.stop()
        t.join(20)
        eng.shutdown(wait_for_completion=False)
        p.shutdown(wait_for_completion=False)


# -- clock skew ---------------------------------------------------------------------------------
class _SkewedTime:
    """The ``time`` module of a host whose clock is ``skew`` seconds off (monotonic clocks are
    per host and unaffected)."""

    def __init__(self, skew: float) -> None:
        self.skew = skew

    def time(self) -> float:
        return time.time() + self.skew

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.mark.timeout(60)
def test_clock_skew_between_hosts_does_not_decide_alive_or_lost(redis_url, prefix, monkeypatch):
    """A worker's liveness was judged by comparing the time its host wrote (``last_seen``) with
    the reader's clock: a worker on a host 60 s behind was shown lost while it beat every 50 ms,
    one on a host 60 s ahead stayed alive for a minute after it stopped, and dropped the other
    workers' entries from the registry (its ``now - keep`` was past their beats). Beats and
    reads now use Redis's clock."""
    from catzilla_tasks import BackgroundTasks
    from catzilla_tasks.brokers import RedisBroker, Worker
    from catzilla_tasks.brokers import registry as registry_mod

    engines, beats = [], {}
    try:
        for skew in (-60.0, +60.0):
            eng = BackgroundTasks(workers=1, broker=RedisBroker(redis_url, prefix=prefix, visibility_timeout=1))
            # (0.3 s: alive for 0.9 s after a beat, which the reads below must come within on a
            # loaded machine; with 0.05 s, 0.15 s)
            w = Worker(eng, concurrency=1, heartbeat_interval=0.3, consumer=f"skew{skew:+.0f}")
            engines.append(eng)
            beats[skew] = w._heartbeat_thread  # (not started: each host's beats made here, by hand)

        def beat(skew: float) -> None:
            monkeypatch.setattr(registry_mod, "time", _SkewedTime(skew))
            beats[skew].beat()
            monkeypatch.undo()

        def states() -> dict[str, str]:
            with ClusterView(redis_url, prefix=prefix) as v:
                return {w["id"]: w["state"] for w in v.workers()}

        for _ in range(3):
            beat(-60.0)
            beat(+60.0)
        assert states() == {"skew-60": "alive", "skew+60": "alive"}
        time.sleep(0.3 * (registry_mod.LOST_AFTER_BEATS + 1))  # both fall silent: both lost
        assert states() == {"skew-60": "lost", "skew+60": "lost"}
    finally:
        monkeypatch.undo()
        for eng in engines:
            eng.shutdown(wait_for_completion=False)


@pytest.mark.timeout(60)
def test_inspect_json_is_json_for_any_result_and_an_empty_id_is_a_usage_error(
    worker_and_producer, redis_url, prefix, capsys
):
    """``inspect --json`` printed a task's float result NaN or infinity as ``NaN``/``Infinity``
    (not JSON: a strict parser, JavaScript's, refuses the whole object); now null, as the
    dashboard's task route gives it. An empty TASK_ID ended in a Python traceback; now a usage
    error (exit 2)."""
    import redis_tasks as rt

    w, p = worker_and_producer
    r = p.add_task(rt.echo, float("nan"), float("inf"))
    r.wait(10)
    rc, out = cli(capsys, "inspect", r.task_id, "--broker", redis_url, "--prefix", prefix, "--json")
    info = strict_json(out)
    assert rc == 0 and info["status"] == "succeeded" and "result" in info
    assert main(["inspect", "", "--broker", redis_url, "--prefix", prefix]) == 2
    assert "TASK_ID" in capsys.readouterr().err
