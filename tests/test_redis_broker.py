"""Distributed mode against a real redis-server (see redis_helpers.py): producer, worker,
results, retries, delays, dead letters, serialization, idempotency, priorities, the CLI."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import redis_tasks as rt
from redis_helpers import prefix, redis, redis_url, wait_until  # noqa: F401  (fixtures)

from catzilla_tasks import BackgroundTasks, TaskPriority, TaskStatus, WorkerLost
from catzilla_tasks.brokers import RedisBroker, Worker
from catzilla_tasks.brokers.serialization import Serializer
from catzilla_tasks.cli import main as cli_main


class Cluster:
    """Producer engines and in-process workers on one queue (each worker: its own engine)."""

    def __init__(self, url: str, prefix: str, monkeypatch, **client_options) -> None:
        monkeypatch.setenv("CT_TEST_REDIS_URL", url)
        self.url = url
        self.prefix = prefix
        self.client_options = client_options
        self.engines: list[BackgroundTasks] = []
        self.workers: list[tuple[Worker, threading.Thread]] = []
        self.producer = self.engine()
        self.broker: RedisBroker = self.producer.broker
        self.r = self.broker.redis

    def engine(self, **broker_kw) -> BackgroundTasks:
        broker_kw.setdefault("prefix", self.prefix)
        for k, v in self.client_options.items():
            broker_kw.setdefault(k, v)
        eng = BackgroundTasks(workers=4, broker=RedisBroker(self.url, **broker_kw))
        rt.register(eng)
        self.engines.append(eng)
        return eng

    def worker(self, concurrency: int = 32, engine: BackgroundTasks | None = None, consumer: str | None = None,
               **broker_kw) -> Worker:
        eng = engine or self.engine(**broker_kw)
        w = Worker(eng, concurrency=concurrency, consumer=consumer)
        t = threading.Thread(target=w.run, daemon=True)
        t.start()
        assert w.ready.wait(10)
        self.workers.append((w, t))
        return w

    def stop_workers(self) -> None:
        for w, _t in self.workers:
            w.stop()
        for _w, t in self.workers:
            t.join(30)
            assert not t.is_alive(), "worker did not stop"
        self.workers.clear()

    def close(self) -> None:
        self.stop_workers()
        for eng in self.engines:
            eng.shutdown(wait_for_completion=False, timeout=10)
            eng.broker.close()


@pytest.fixture
def cluster(redis_url, prefix, monkeypatch):
    c = Cluster(redis_url, prefix, monkeypatch)
    yield c
    c.close()


def test_results_from_any_process_sync_and_await(cluster):
    cluster.worker()
    p = cluster.producer
    r = p.add_task(rt.add, 2, 3)
    assert r.wait(10) == 5
    assert r.status is TaskStatus.SUCCEEDED and r.is_ready()
    # another "process": a fresh broker object that knows only the task id
    other = RedisBroker(cluster.url, prefix=cluster.prefix)
    assert other.result(r.task_id).wait(5) == 5
    assert p.add_task(rt.async_add, 1, 2).wait(10) == 3
    assert p.add_task(rt.echo, 1, "x", b"y", k={"n": [1, 2]}).wait(10) == [[1, "x", b"y"], {"k": {"n": [1, 2]}}]

    async def main():
        return await p.add_task(rt.add, 20, 22)

    assert asyncio.run(main()) == 42
    # by registered name, and with options
    assert p.add_task("redis_tasks.add", 1, 1).wait(10) == 2
    assert p.options(priority=TaskPriority.HIGH).add_task(rt.add, 3, 3).wait(10) == 6
    other.close()


def test_waiters_are_woken_by_the_result_not_by_polling(cluster):
    cluster.worker()
    before = cluster.r.info("commandstats").get("cmdstat_blmove", {}).get("calls", 0)
    r = cluster.producer.add_task(rt.record_slow, f"{cluster.prefix}:log", 1, 0.3)
    got = []
    waiters = [threading.Thread(target=lambda: got.append(cluster.broker.result(r.task_id).wait(10))) for _ in range(3)]
    for t in waiters:
        t.start()
    for t in waiters:
        t.join(15)
    assert got == [1, 1, 1]
    after = cluster.r.info("commandstats").get("cmdstat_blmove", {}).get("calls", 0)
    assert after - before == 3  # one blocking call per waiter: woken by the worker's write
    assert cluster.r.ttl(cluster.broker.result_key(r.task_id)) > 0


def test_wait_timeout_and_no_results_mode(cluster):
    r = cluster.producer.add_task(rt.add, 1, 1)  # no worker yet
    assert r.status is TaskStatus.PENDING
    with pytest.raises(TimeoutError):
        r.wait(0.05)
    eng = cluster.engine(result_ttl=0)
    r0 = eng.add_task(rt.add, 1, 2)
    with pytest.raises(RuntimeError, match="result_ttl"):
        r0.wait(1)


def test_failures_retries_and_dead_letters(cluster):
    cluster.worker()
    p = cluster.producer
    with pytest.raises(ValueError, match="bad value 7") as ei:
        p.add_task(rt.always_fails, 7).wait(10)
    assert "always_fails" in ei.value.remote_traceback
    w = cluster.workers[0][0]
    assert w.counts["retried"] == 2  # max_retries=2, through the delayed set
    key = f"flaky-{cluster.prefix}"
    assert p.add_task(rt.flaky, key, 2).wait(10) == 3  # two failures, then success on the third run
    dead = cluster.broker.dead_letters()
    assert len(dead) == 1 and dead[0]["name"] == "redis_tasks.always_fails"
    assert dead[0]["error"].startswith("ValueError: bad value 7")
    # a timeout is a failure of that task only
    r = p.add_task(rt.too_slow)
    with pytest.raises(TimeoutError) as ei2:  # TaskTimeout, rebuilt from the stored error
        r.wait(10)
    assert r.status is TaskStatus.TIMED_OUT and type(ei2.value).__name__ == "TaskTimeout"


def test_dead_letters_cli_list_and_redrive(cluster, capsys):
    p = cluster.producer
    w = cluster.worker()
    for x in (1, 2):
        with pytest.raises(ValueError):
            p.add_task(rt.always_fails, x).wait(10)
    where = ["--broker", cluster.url, "--prefix", cluster.prefix]
    capsys.readouterr()
    assert cli_main(["dead-letters", "list", *where]) == 0
    text = capsys.readouterr().out
    assert "2 dead-lettered task(s)" in text and "redis_tasks.always_fails" in text and "bad value 2" in text
    assert cli_main(["dead-letters", "list", *where, "--json"]) == 0
    items = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(i["error"].splitlines()[0] for i in items) == ["ValueError: bad value 1", "ValueError: bad value 2"]
    assert cli_main(["dead-letters", "redrive", *where, items[0]["id"]]) == 0
    assert "re-driven: 1 task(s)" in capsys.readouterr().out
    # it runs again, with fresh retries, and fails again into the dead letters
    wait_until(lambda: w.counts["dead_lettered"] == 3, 10, "the re-driven task to fail again")
    assert w.counts["retried"] == 6
    assert cluster.broker.dead_letter_count() == 2
    assert cli_main(["dead-letters", "redrive", *where, "--all"]) == 0
    assert "re-driven: 2 task(s)" in capsys.readouterr().out
    wait_until(lambda: w.counts["dead_lettered"] == 5, 10, "both to fail again")
    assert cli_main(["dead-letters", "redrive", *where]) == 2  # neither ids nor --all
    assert "--all" in capsys.readouterr().err


def test_delayed_tasks_wait_in_the_sorted_set(cluster):
    p = cluster.producer
    r = p.options(delay_ms=400).add_task(rt.add, 1, 1)
    assert cluster.r.zcard(cluster.broker.delayed_key) == 1
    assert cluster.broker.queued()["NORMAL"] == 0
    cluster.worker()
    assert r.wait(10) == 2
    assert cluster.r.zcard(cluster.broker.delayed_key) == 0


def test_garbage_unknown_names_and_bad_payloads_are_dead_lettered(cluster):
    w = cluster.worker()
    b = cluster.broker
    b.redis.xadd(b.streams[2], {"junk": b"\x00\x01"})                   # no payload field
    b.redis.xadd(b.streams[2], {"m": b"m\xc1\xc1garbage"})             # undecodable msgpack
    b.redis.xadd(b.streams[1], {"m": b"z-unknown-format"})             # unknown format byte
    b.redis.xadd(b.streams[2], {"m": Serializer().dumps({"not": "a task"})})
    b.redis.xadd(b.streams[2], {"m": Serializer().dumps(["id1", "no.such.task", [], {}])})
    b.redis.xadd(b.streams[2], {"m": b"p" + b"cos\nsystem\n(S'echo pwned'\ntR."})  # pickle: refused
    assert cluster.producer.add_task(rt.add, 40, 2).wait(10) == 42  # the worker keeps going
    wait_until(lambda: w.counts["dead_lettered"] == 6, 10, "six dead letters")
    errors = [d["error"] for d in b.dead_letters()]
    assert any("without an 'm' field" in e for e in errors)
    assert any("unknown task name 'no.such.task'" in e for e in errors)
    assert any("allow_pickle" in e for e in errors)
    assert any("unknown payload format" in e for e in errors)
    assert sum("DecodeError" in e for e in errors) == 5
    # every entry acknowledged: the add task's too, whose result is stored before its entry is
    # acknowledged (at least once), so its ack may still be on its way when wait() returns
    wait_until(
        lambda: b.queued()["NORMAL"] == 0 and b.redis.xpending(b.streams[2], "workers")["pending"] == 0,
        10,
        "every entry acknowledged",
    )


def test_serializers_json_and_pickle_opt_in(cluster):
    cluster.worker()
    pj = cluster.engine(serializer="json")
    assert pj.add_task(rt.echo, 1, {"a": 2}).wait(10) == [[1, {"a": 2}], {}]
    with pytest.raises(ValueError, match="allow_pickle=True"):
        RedisBroker(cluster.url, serializer="pickle")
    with pytest.raises(TypeError, match="cannot encode with json"):
        pj.add_task(rt.echo, b"bytes are not JSON")
    pp = cluster.engine(serializer="pickle", allow_pickle=True)
    pp.add_task(rt.echo, {1, 2})
    # this worker did not allow pickle: the task is dead-lettered, not run
    wait_until(lambda: cluster.broker.dead_letter_count() == 1, 10, "the pickle task to be refused")
    assert "allow_pickle" in cluster.broker.dead_letters()[0]["error"]
    cluster.stop_workers()
    cluster.worker(serializer="msgpack", allow_pickle=True)
    assert pp.add_task(rt.echo, {1, 2}).wait(10) == [[{1, 2}], {}]


def test_entries_delivered_to_a_worker_that_never_saw_them_run_without_waiting_for_the_timeout(cluster):
    """Redis handed entries to this consumer but the reply was lost (the server died between
    delivering and answering, or an earlier process of the same consumer name died): the
    worker finds them in its own pending list, at start and after a dropped connection,
    instead of leaving them to the visibility timeout (here 10 minutes)."""
    from catzilla_tasks.brokers.redis import GROUP

    p = cluster.engine(visibility_timeout=600)
    b = p.broker
    log = f"{cluster.prefix}:lost"
    rs = [p.add_task(rt.record, log, i) for i in range(5)]
    b.redis.xgroup_create(b.streams[2], GROUP, id="0", mkstream=True)
    got = b.redis.xreadgroup(GROUP, "w-lost", {b.streams[2]: ">"}, count=10)  # delivered, never seen
    assert len(got[0][1]) == 5
    w = cluster.worker(consumer="w-lost", visibility_timeout=600)
    assert [r.wait(10) for r in rs] == list(range(5))
    assert w.counts["recovered"] == 5 and w.counts["reclaimed"] == 0
    assert sorted(int(x) for x in cluster.r.lrange(log, 0, -1)) == list(range(5))  # each once


def test_idempotency_key_makes_a_finished_task_a_no_op(cluster):
    w = cluster.worker()
    p = cluster.producer
    log = f"{cluster.prefix}:idem"
    r1 = p.options(idempotency_key="order-17").add_task(rt.record, log, "a")
    assert r1.wait(10) == "a"
    same = p.options(idempotency_key="order-17").add_task(rt.record, log, "b")
    assert same.task_id == r1.task_id  # deduplicated at submit (issue 19): nothing queued
    cluster.r.delete(cluster.broker.dedup_key("order-17"))  # a copy past that record (a re-drive, say)
    r2 = p.options(idempotency_key="order-17").add_task(rt.record, log, "b")
    assert r2.task_id != r1.task_id
    assert r2.wait(10) == "a"  # the first run's result; not run again
    assert cluster.r.lrange(log, 0, -1) == [b"a"]
    # the worker counts a skip once its transaction is applied, which is also what wakes r2
    wait_until(lambda: w.counts["skipped_idempotent"] == 1, 10, "the worker to count the skip")
    r3 = p.options(idempotency_key="order-18").add_task(rt.record, log, "c")
    assert r3.wait(10) == "c"


def test_priorities_across_two_workers_and_work_is_shared(cluster):
    p = cluster.producer
    log = f"{cluster.prefix}:order"
    with p.batch():
        for i in range(30):
            p.add_task(rt.low, log, f"L{i}", 0.01)
        for i in range(30):
            p.add_task(rt.critical, log, f"C{i}", 0.01)
    assert cluster.broker.queued()["LOW"] == 30 and cluster.broker.queued()["CRITICAL"] == 30
    w1 = cluster.worker(concurrency=1)
    w2 = cluster.worker(concurrency=1)
    wait_until(lambda: cluster.r.llen(log) == 60, 30, "all 60 tasks")
    wait_until(lambda: w1.counts["succeeded"] + w2.counts["succeeded"] == 60, 10, "all acknowledged")
    order = [x.decode().rsplit(":", 1)[1] for x in cluster.r.lrange(log, 0, -1)]
    last_critical = max(i for i, v in enumerate(order) if v.startswith("C"))
    first_low = min(i for i, v in enumerate(order) if v.startswith("L"))
    # each worker holds at most one task: at most one LOW per worker may start before the
    # last CRITICAL (fetched while the other worker was taking the last CRITICAL ones)
    assert first_low > last_critical - 2, order
    assert w1.counts["succeeded"] >= 10 and w2.counts["succeeded"] >= 10  # shared


def test_fetches_only_free_capacity(cluster):
    p = cluster.producer
    with p.batch():
        for i in range(50):
            p.add_task(rt.record_slow, f"{cluster.prefix}:cap", i, 0.2)
    w = cluster.worker(concurrency=5)
    b = cluster.broker
    wait_until(lambda: w.counts["fetched"] >= 5, 10, "the first fetch")
    info = b.redis.xpending(b.streams[2], "workers")
    assert info["pending"] <= 5  # never more than its capacity held
    assert b.redis.xlen(b.streams[2]) == 50  # (acked entries are deleted; 45 unread + 5 held)


def test_bad_input_is_refused_at_the_call_site(cluster):
    p = cluster.producer
    with pytest.raises(ValueError, match="broker URL"):
        RedisBroker("http://localhost:6379")
    with pytest.raises(TypeError, match="module level"):
        p.add_task(lambda: None)
    with pytest.raises(ValueError, match="visibility_timeout"):
        RedisBroker(cluster.url, visibility_timeout=0)
    with pytest.raises(TypeError, match="cannot travel"):
        p.options(on_success=print).add_task(rt.add, 1, 2)
    with pytest.raises(ValueError, match="idempotency_key"):
        p.options(idempotency_key="").add_task(rt.add, 1, 2)
    with pytest.raises(ValueError, match="concurrency"):
        Worker(p, concurrency=0)
    local = BackgroundTasks(workers=2)
    try:
        with pytest.raises(TypeError, match="has no broker"):
            Worker(local)
    finally:
        local.shutdown()  # a live engine left behind changes what workflows' default_engine() picks
    assert "secret" not in repr(RedisBroker("redis://:secret@127.0.0.1:1/0"))


def test_password_url(redis_url, prefix, monkeypatch):
    # a server of its own with a password: the URL's password is used, and required
    from redis_helpers import RedisServer

    srv = RedisServer()
    try:
        redis.Redis(host="127.0.0.1", port=srv.port).config_set("requirepass", "s3cret")
        url = f"redis://:s3cret@127.0.0.1:{srv.port}/0"
        c = Cluster(url, prefix, monkeypatch)
        try:
            c.worker()
            assert c.producer.add_task(rt.add, 1, 2).wait(10) == 3
        finally:
            c.close()
        bad = RedisBroker(f"redis://:wrong@127.0.0.1:{srv.port}/0")
        with pytest.raises(redis.AuthenticationError):
            bad.redis.ping()
    finally:
        srv.stop()


def test_tls_rediss_url(prefix, monkeypatch):
    from redis_helpers import RedisServer

    srv = RedisServer(tls=True)
    try:
        c = Cluster(srv.url, prefix, monkeypatch, ssl_ca_certs=srv.cert)
        try:
            c.worker(ssl_ca_certs=srv.cert)
            r = c.producer.add_task(rt.add, 2, 2)
            assert r.wait(10) == 4
            assert c.broker.redis.connection_pool.connection_class.__name__ == "SSLConnection"
        finally:
            c.close()
        plain = redis.Redis(host="127.0.0.1", port=srv.port, socket_timeout=2)  # the server speaks only TLS
        with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
            plain.ping()
    finally:
        srv.stop()


def test_a_task_that_keeps_losing_its_workers_is_dead_lettered(cluster):
    b = cluster.broker
    r = cluster.producer.add_task(rt.add, 1, 1)
    b.redis.xgroup_create(b.streams[2], "workers", id="0", mkstream=True)
    b.redis.xreadgroup("workers", "dead-worker-1", {b.streams[2]: ">"}, count=1)
    eid = b.redis.xpending_range(b.streams[2], "workers", min="-", max="+", count=1)[0]["message_id"]
    for i in range(2, 11):  # nine more workers took it and died (each XCLAIM counts a delivery)
        b.redis.xclaim(b.streams[2], "workers", f"dead-worker-{i}", 0, [eid])
    w = cluster.worker(visibility_timeout=0.05)
    wait_until(lambda: w.counts["dead_lettered"] == 1, 10, "the task to be dead-lettered")
    with pytest.raises(WorkerLost, match="delivered 11 times"):
        r.wait(5)
    assert "WorkerLost: delivered 11 times" in b.dead_letters()[0]["error"]
    assert cluster.producer.add_task(rt.add, 2, 2).wait(10) == 4  # and the worker goes on


def test_clients_name_the_library_without_a_package_metadata_lookup(cluster, monkeypatch):
    """redis-py, left to itself, reads its version from the installed packages' metadata for
    every connection it creates (importlib.metadata: ~0.4 MiB in a worker); ours give it."""
    import redis.utils

    import catzilla_tasks

    if not hasattr(redis, "DriverInfo"):
        pytest.skip("redis-py < 7.1 has no DriverInfo")

    def no_lookup():
        raise AssertionError("redis-py looked its version up in the package metadata")

    monkeypatch.setattr(redis.utils, "get_lib_version", no_lookup)
    b = RedisBroker(cluster.url, prefix=cluster.prefix)
    try:
        assert b.redis.ping() and b._wait_redis.ping()
        info = b.redis.connection_pool.connection_kwargs["driver_info"]
        assert info.formatted_name == f"redis-py(catzilla-tasks_v{catzilla_tasks.__version__})"
        assert info.lib_version == redis.__version__
        assert asyncio.run(_aping(b))
        # the user's own choice wins
        mine = redis.DriverInfo(lib_version="1.2.3")
        b2 = RedisBroker(cluster.url, prefix=cluster.prefix, driver_info=mine)
        assert b2.redis.connection_pool.connection_kwargs["driver_info"] is mine
        b2.close()
    finally:
        b.close()


async def _aping(b: RedisBroker) -> bool:
    c = b._aclient()
    try:
        return await c.ping()
    finally:
        await c.aclose()


def test_a_worker_keeps_nothing_of_the_tasks_it_has_committed(cluster):
    """Committed jobs (messages, payloads, handles) are freed by reference counting as soon as
    their batch is acknowledged, not kept until the next batch (which doubled a worker's peak)."""
    import gc

    from catzilla_tasks.brokers.worker import _Job

    w = cluster.worker(concurrency=64)
    p = cluster.producer
    gc.collect()
    gc.disable()  # what is freed here is freed by reference counting alone (no cycles left)
    try:
        with p.batch():
            rs = [p.add_task(rt.echo, i, [i] * 3, k=i) for i in range(300)]
        assert [r.wait(10) for r in rs[-2:]] == [[[298, [298] * 3], {"k": 298}], [[299, [299] * 3], {"k": 299}]]
        wait_until(lambda: w.counts["succeeded"] == 300 and w.stats()["in_flight"] == 0, 10, "300 tasks committed")
        wait_until(lambda: not any(type(o) is _Job for o in gc.get_objects()), 5, "no job left")
    finally:
        gc.enable()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["ShutdownTimeout", "WorkerLost", "CompileError", "TaskCancelled", "WorkflowError"])
def test_a_remote_error_of_our_types_comes_back_as_the_same_class(cluster, name):
    # decoded by one lookup in errors.py: CompileError and ShutdownTimeout came back as
    # RemoteTaskError before, and WorkerLost without its pid/exitcode
    from catzilla_tasks import errors

    cluster.worker()
    sent = rt.our_error(name)
    with pytest.raises(type(sent)) as ei:
        cluster.producer.add_task(rt.raises_ours, name).wait(10)
    got = ei.value
    assert type(got) is type(sent) and str(got) == str(sent)
    assert {k: getattr(got, k) for k in type(sent)._remote_fields} == {
        k: getattr(sent, k) for k in type(sent)._remote_fields}
    assert isinstance(got, errors.CatzillaTasksError) and "raises_ours" in got.remote_traceback
