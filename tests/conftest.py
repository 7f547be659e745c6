import os
import sys

import pytest
from gc_helpers import gc_pressure_on

from catzilla_tasks import BackgroundTasks

# Stress sizes: full by default, smaller under the sanitizer build (CI sets this).
STRESS_N = int(os.environ.get("CATZILLA_TASKS_STRESS_N", "1000000"))


@pytest.fixture
def tasks():
    eng = BackgroundTasks(workers=4, queue_size=100_000)
    try:
        yield eng
    finally:
        eng.shutdown(wait_for_completion=False, timeout=10)


@pytest.fixture
def make_tasks():
    made = []

    def make(**kw):
        eng = BackgroundTasks(**kw)
        made.append(eng)
        return eng

    yield make
    for eng in made:
        eng.shutdown(wait_for_completion=False, timeout=10)


@pytest.fixture
def gc_pressure():
    """gc_pressure_on() for a whole test."""
    with gc_pressure_on():
        yield


@pytest.fixture(scope="module")
def compile_cache_dir(tmp_path_factory):
    """Compiled tasks of one test module cache their code in a fresh directory."""
    d = tmp_path_factory.mktemp("compiled")
    old = os.environ.get("CATZILLA_TASKS_CACHE_DIR")
    os.environ["CATZILLA_TASKS_CACHE_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("CATZILLA_TASKS_CACHE_DIR", None)
    else:
        os.environ["CATZILLA_TASKS_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def compile_engine():
    """One engine per compiled-task test module: 2 workers, no auto-scaling."""
    with BackgroundTasks(workers=2, min_workers=1, enable_auto_scaling=False) as t:
        yield t


@pytest.fixture(autouse=True)
def _background_compiles_end_with_their_test():
    """add_task compiles numeric tasks in a background thread (numba holds the GIL most of a
    second): what a test queued finishes before the next test runs (its CPU and timing
    measurements)."""
    yield
    compiler = sys.modules.get("catzilla_tasks.compiler")
    if compiler is not None:
        compiler.wait_for_background(300)
