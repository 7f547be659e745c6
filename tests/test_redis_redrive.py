"""Re-driving dead letters (issue 13, item 9): each dead letter goes back to its stream once,
however many re-drives run at once. Against a real redis-server."""

from __future__ import annotations

import threading

import pytest
from redis_helpers import prefix, redis, redis_url  # noqa: F401  (fixtures)

from catzilla_tasks.brokers import RedisBroker


def dead_letters(b: RedisBroker, n: int) -> list[str]:
    """``n`` dead letters as a worker writes them (payload with its attempt count, error...)."""
    pipe = b.redis.pipeline(transaction=False)
    for i in range(n):
        payload = b.serializer.dumps([f"t{i}", "redis_tasks.add", [i, 1], {}, 3, None])
        pipe.xadd(b.dead_key, {"m": payload, "e": "ValueError: no", "n": "redis_tasks.add", "i": f"t{i}",
                               "p": i % 4, "t": 0, "w": "w1"})
    return [eid.decode() for eid in pipe.execute()]


def queued_ids(b: RedisBroker) -> list[str]:
    out = []
    for s in b.streams:
        for _, fields in b.redis.xrange(s):
            out.append(b.serializer.loads(fields[b"m"])[0])
    return out


class Paired:
    """Makes two re-drives read the same dead letters before either moves one: each waits,
    after its first read, until the other has read too (the interleaving that doubled them)."""

    def __init__(self, brokers: list[RedisBroker]) -> None:
        self.barrier = threading.Barrier(len(brokers), timeout=30)
        for b in brokers:
            self._wrap(b)

    def _wrap(self, b: RedisBroker) -> None:
        read = b.redis.xrange
        first = [True]

        def xrange(*args, **kwargs):
            got = read(*args, **kwargs)
            if first[0]:
                first[0] = False
                self.barrier.wait()
            return got

        b.redis.xrange = xrange  # this broker's client only


@pytest.mark.timeout(120)
@pytest.mark.parametrize("which", ["all", "ids"])
def test_concurrent_redrives_move_each_dead_letter_once(redis_url, prefix, which):
    brokers = [RedisBroker(redis_url, prefix=prefix) for _ in range(3)]
    try:
        ids = dead_letters(brokers[0], 120)
        Paired(brokers)
        moved = [0] * len(brokers)
        errors = []

        def redrive(k: int) -> None:
            try:
                moved[k] = brokers[k].redrive(None if which == "all" else ids)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=redrive, args=(k,)) for k in range(len(brokers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and not any(t.is_alive() for t in threads)
        b = brokers[0]
        assert sum(moved) == 120
        assert sorted(queued_ids(b)) == sorted(f"t{i}" for i in range(120))  # each exactly once
        assert b.dead_letter_count() == 0
        # each in the stream of its priority, with a fresh count of attempts
        for p, s in enumerate(b.streams):
            for _, fields in b.redis.xrange(s):
                msg = b.serializer.loads(fields[b"m"])
                assert int(msg[0][1:]) % 4 == p and msg[4] == 0
    finally:
        for b in brokers:
            b.close()


def test_redrive_of_ids_already_gone_moves_nothing(redis_url, prefix):
    b = RedisBroker(redis_url, prefix=prefix)
    try:
        ids = dead_letters(b, 3)
        assert b.redrive([ids[1]]) == 1
        assert b.redrive([ids[1]]) == 0  # already re-driven
        assert b.redrive(None) == 2
        assert b.redrive(None) == 0
        assert sorted(queued_ids(b)) == ["t0", "t1", "t2"]
    finally:
        b.close()
