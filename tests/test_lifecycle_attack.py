"""Review of issue 12 (lifecycle): inputs and paths the fixes did not cover."""

import threading

import pytest

from catzilla_tasks import BackgroundTasks, TaskResult


@pytest.mark.timeout(60)
def test_task_result_refuses_ids_that_only_parse_like_a_live_one():
    with BackgroundTasks(workers=1, enable_auto_scaling=False) as eng:
        gate = threading.Event()
        h = eng.add_task(gate.wait, 30)
        tid = h.task_id
        prefix, num = tid.rsplit("-", 1)
        assert TaskResult(tid) is h
        wrapped = str(2**64 - int(num))  # strtoull("-N") wraps around to N
        for bad in (tid + "\x00", tid + "\x00junk", f"{prefix}- {num}", f"{prefix}-+{num}",
                    f"{prefix}-0{num}", f"{prefix}--{wrapped}", f"{prefix}-{num} "):
            with pytest.raises(LookupError):
                TaskResult(bad)
        gate.set()
        assert h.wait(10) is True


@pytest.mark.timeout(120)
@pytest.mark.parametrize("second_waits", [True, False])
def test_two_threads_shutting_down_one_engine_both_return(second_waits):
    for _ in range(8):
        eng = BackgroundTasks(workers=2, enable_auto_scaling=False)
        hs = [eng.add_task(sum, [i]) for i in range(20)]
        start = threading.Barrier(2)
        errors = []

        def stop(wait, eng=eng, start=start, errors=errors):
            start.wait()
            try:
                eng.shutdown(wait_for_completion=wait, timeout=20)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=stop, args=(w,), daemon=True) for w in (True, second_waits)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a concurrent shutdown() never returned"
        assert errors == []
        assert all(h.status.name in ("SUCCEEDED", "CANCELLED") for h in hs)
        assert eng.stats()["workers"] == 0


@pytest.mark.timeout(60)
def test_shutdown_inside_a_task_of_the_engine_is_a_clear_error_not_a_wait_for_itself():
    with BackgroundTasks(workers=2, enable_auto_scaling=False) as eng:
        h = eng.add_task(eng.shutdown, True, 5)
        with pytest.raises(RuntimeError, match="inside a task"):
            h.wait(30)
        assert not eng.is_shutdown
        assert eng.add_task(sum, [1, 2]).wait(10) == 3


@pytest.mark.timeout(60)
def test_cancelling_a_queued_task_gives_its_memory_pool_bytes_back_at_once(make_tasks):
    eng = make_tasks(workers=2, enable_auto_scaling=False, memory_pool_mb=1)
    eng.pause()
    blob = b"x" * 700_000
    h = eng.add_task(len, blob)
    assert eng.stats()["queued_arg_bytes"] >= 700_000
    assert h.cancel() is True
    # the room is back while the engine is still paused: the same arguments fit again
    assert eng.stats()["queued_arg_bytes"] == 0
    h2 = eng.add_task(len, blob)
    eng.resume()
    assert h2.wait(10) == 700_000
    eng.join(10)
    assert eng.stats()["queued_arg_bytes"] == 0


@pytest.mark.timeout(60)
def test_wait_and_join_refuse_a_bool_timeout_as_delay_ms_and_timeout_ms_do(make_tasks):
    eng = make_tasks(workers=2, enable_auto_scaling=False)
    h = eng.add_task(sum, [1, 2])
    for flag in (True, False):
        with pytest.raises(TypeError, match="timeout must be a number"):
            h.wait(flag)
        with pytest.raises(TypeError, match="timeout must be a number"):
            eng.join(flag)
    assert h.wait(10) == 3


@pytest.mark.timeout(60)
def test_shutdown_without_waiting_gives_back_the_memory_pool_bytes_of_the_tasks_it_cancels():
    eng = BackgroundTasks(workers=2, enable_auto_scaling=False, memory_pool_mb=1)
    eng.pause()
    held = [eng.add_task(len, b"x" * 1000) for _ in range(3)]
    held.append(eng.options(delay_ms=60_000).add_task(len, b"y" * 1000))
    assert eng.stats()["queued_arg_bytes"] > 4000
    eng.shutdown(wait_for_completion=False, timeout=20)
    assert all(h.status.name == "CANCELLED" for h in held)
    assert eng.stats()["queued_arg_bytes"] == 0  # while the handles still live
