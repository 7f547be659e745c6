"""The C-level API: other C code submits C tasks (run with no GIL) without Python."""

import ctypes
import pathlib
import shutil
import subprocess
import sysconfig

import pytest

from catzilla_tasks import BackgroundTasks, TaskStatus

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENGINE_DIR = ROOT / "src" / "catzilla_tasks" / "_engine"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed to build the C API test client"
    out = tmp_path_factory.mktemp("capi") / "libcapi_client.so"
    subprocess.run(
        [cc, "-shared", "-fPIC", "-O1", "-std=c11", "-pthread", f"-I{sysconfig.get_paths()['include']}",
         f"-I{ENGINE_DIR}", str(ROOT / "tests" / "c" / "capi_client.c"), "-o", str(out)],
        check=True,
    )
    with_gil = ctypes.PyDLL(str(out))
    without_gil = ctypes.CDLL(str(out))
    with_gil.cz_init.argtypes = [ctypes.py_object]
    without_gil.cz_submit.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    without_gil.cz_submit.restype = ctypes.c_long
    without_gil.cz_submit_many.argtypes = [ctypes.c_long, ctypes.c_int]
    without_gil.cz_count.restype = ctypes.c_long
    without_gil.cz_slots_sum.restype = ctypes.c_long
    without_gil.cz_strerror.restype = ctypes.c_char_p
    return with_gil, without_gil


def test_c_tasks_submitted_from_plain_threads_run_exactly_once(client):
    with_gil, lib = client
    eng = BackgroundTasks(workers=4, queue_size=5000)
    try:
        assert with_gil.cz_init(eng) == 0
        err = ctypes.c_int()
        base = lib.cz_count()
        # 4 C threads, 200k tasks, queue bound 5k: producers block for room (block_ns = -1)
        assert lib.cz_submit(200_000, 4, 2, ctypes.byref(err)) == 0, lib.cz_strerror(err.value)
        eng.join(30)
        assert lib.cz_count() - base == 200_000
        s = eng.stats()
        assert s["succeeded"] == 200_000 and s["failed"] == 0
    finally:
        eng.shutdown()
    err = ctypes.c_int()
    assert lib.cz_submit(10, 1, 2, ctypes.byref(err)) == 10
    assert lib.cz_strerror(err.value) == b"engine shut down"


def test_submit_many_is_all_or_nothing(client):
    with_gil, lib = client
    eng = BackgroundTasks(workers=2, queue_size=1000)
    try:
        assert with_gil.cz_init(eng) == 0
        base = lib.cz_slots_sum()
        assert lib.cz_submit_many(1000, 0) == 0
        eng.join(10)
        assert lib.cz_slots_sum() - base == 1000 * 1001 // 2
        eng.pause()
        assert lib.cz_submit_many(600, 0) == 0
        assert lib.cz_submit_many(600, 0) == -1  # would exceed queue_size: nothing queued
        assert eng.stats()["queued_total"] == 600
        eng.resume()
        eng.join(10)
        # the first 600 ran (values 1..600); the refused 600 never did
        assert lib.cz_slots_sum() - base == 1000 * 1001 // 2 + 600 * 601 // 2
    finally:
        eng.shutdown()


def test_get_engine_refuses_other_objects(client):
    with_gil, _ = client
    with pytest.raises(TypeError, match="expected a started catzilla_tasks.BackgroundTasks"):
        with_gil.cz_init(object())


def test_submit_c_from_python_gives_a_result_handle(client):
    _, lib = client
    eng = BackgroundTasks(workers=2)
    try:
        fn = ctypes.cast(lib.cz_count, ctypes.c_void_p).value  # any void f(void) is callable as f(void*)
        r = eng.submit_c(fn, 0)
        assert r.wait(5) is None and r.status is TaskStatus.SUCCEEDED
        with pytest.raises(ValueError, match="priority"):
            eng.submit_c(fn, 0, 9)
    finally:
        eng.shutdown()
