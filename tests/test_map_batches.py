"""tasks.map at its edges: huge chunk sizes, the first failure and Ctrl-C (what has not started
is cancelled, as concurrent.futures does), and a bounded number of items in flight."""

from __future__ import annotations

import array
import gc
import threading

import pytest

from catzilla_tasks import BackgroundTasks, task

numba = pytest.importorskip("numba", reason="the [compile] extra (numba) is part of the test extra")

pytestmark = pytest.mark.usefixtures("compile_cache_dir")


@task
def add(a: int, b: int) -> int:
    return a + b


# ---- chunk_size never overflows ----------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("chunk", [2**63 - 1, 2**63 - 1000, 2**63, 10**30])
@pytest.mark.parametrize("n", [0, 1, 10, 5000])
def test_huge_chunk_size_is_one_node_for_the_whole_batch(compile_engine, chunk, n):
    items = [(i, 1) for i in range(n)]
    assert compile_engine.map(add, items, chunk_size=chunk) == [i + 1 for i in range(n)]
    a, b = array.array("q", range(n)), array.array("q", [1]) * n
    assert list(compile_engine.map(add, a, b, chunk_size=chunk, out="array")) == [i + 1 for i in range(n)]


@pytest.mark.timeout(120)
def test_engine_clamps_a_chunk_larger_than_the_batch(compile_engine):
    """The C side clamps too (a chunk of 2**63-1 made start + chunk overflow)."""
    from catzilla_tasks import compiler

    spec = compiler.native_of(add).spec_for((int, int))
    for n in (1, 7, 5000):
        items = [(i, 2) for i in range(n)]
        for chunk in (2**63 - 1, 2**63 - 1000, n + 1):
            results, failed, cancelled = compile_engine._map_native(spec.address, spec.codes, spec.rcode, items, chunk, 2)
            assert results == [i + 2 for i in range(n)] and not failed and not cancelled


@pytest.mark.parametrize("bad", [0, -1, -(2**63), True, 1.5, "8"])
def test_bad_chunk_size_is_refused_at_the_call(compile_engine, bad):
    with pytest.raises(ValueError, match="chunk_size"):
        compile_engine.map(add, [(1, 2)], chunk_size=bad)
