"""tasks.map of Python tasks under attack: what a failed submission already queued, races of
the cancellation with the workers."""

from __future__ import annotations

import os

import isolation_attack_helpers as h
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catzilla_tasks import task


@pytest.mark.timeout(180)
def test_a_failed_submission_cancels_what_its_part_already_queued(make_tasks, tmp_path):
    """Isolated tasks are queued one by one: an item that cannot be pickled fails its
    submission after the items before it in the same part were queued. Those must be cancelled
    with the rest (they used to run after map had raised)."""
    t = make_tasks(workers=2)
    ran = str(tmp_path / "ran")
    iso = task(isolation="process")(h.append_line)
    t.pause()  # nothing starts before map has raised
    with pytest.raises(TypeError, match="cannot be pickled"):
        t.map(iso, [(ran, 1), (ran, 2), (ran, lambda: 0), (ran, 4)])
    t.resume()
    t.join(60)
    assert not os.path.exists(ran), "items ran after map raised"
    assert t.stats()["cancelled"] == 2


class _NoRepr:
    def __repr__(self):
        raise RuntimeError("repr is broken")


def _fail(x):
    raise ValueError("the item's own failure")


@pytest.mark.timeout(120)
def test_an_item_whose_repr_fails_does_not_replace_the_tasks_error(make_tasks):
    """The note naming the failed item repr()s it: a repr that raised replaced the task's
    error with its own (RuntimeError, the ValueError only as its context)."""
    t = make_tasks(workers=2)
    with pytest.raises(ValueError, match="own failure") as ei:
        t.map(_fail, [_NoRepr()])
    assert any("item 0" in note for note in ei.value.__notes__)


@pytest.mark.timeout(120)
def test_the_note_of_a_huge_failed_item_is_short(make_tasks):
    """A 10 MB item made a 10 MB note (printed with every traceback)."""
    t = make_tasks(workers=2)
    with pytest.raises(ValueError) as ei:
        t.map(_fail, [b"x" * 10_000_000])
    (note,) = ei.value.__notes__
    assert "item 0" in note and len(note) < 500


@pytest.mark.timeout(180)
def test_ctrl_c_while_queueing_one_by_one_cancels_what_was_queued(make_tasks, tmp_path):
    """Ctrl-C in the middle of a part queued one by one (isolated tasks): the items of that
    part already queued are cancelled too."""
    t = make_tasks(workers=2)
    ran = str(tmp_path / "ran")
    iso = task(isolation="process")(h.append_line)
    t.pause()
    with pytest.raises(KeyboardInterrupt):
        t.map(iso, [(ran, 1), (ran, 2), (ran, h.InterruptWhenPickled()), (ran, 4)])
    t.resume()
    t.join(60)
    assert not os.path.exists(ran)
    assert t.stats()["cancelled"] == 2


# ---- random batches through a tiny window ------------------------------------------------


@pytest.mark.timeout(300)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fails=st.lists(st.booleans(), max_size=40), step=st.integers(1, 5), extra=st.integers(0, 8),
       return_exceptions=st.booleans())
def test_random_batches_through_a_small_window(make_tasks, monkeypatch, fails, step, extra, return_exceptions):
    """Whatever the window: results in order; without return_exceptions the first failure in
    order is raised and every item after it either ran or was cancelled, none lost or run twice."""
    import threading

    from catzilla_tasks import mapping

    monkeypatch.setattr(mapping, "MAP_STEP", step)
    monkeypatch.setattr(mapping, "MAP_WINDOW", step + extra)
    t = make_tasks(workers=2, min_workers=2, enable_auto_scaling=False)
    lock, ran = threading.Lock(), []

    def job(i):
        with lock:
            ran.append(i)
        if fails[i]:
            raise ValueError(i)
        return i * 10

    if return_exceptions or not any(fails):
        res = t.map(job, range(len(fails)), return_exceptions=return_exceptions)
        assert [r.args[0] if isinstance(r, ValueError) else r for r in res] == \
            [i if f else i * 10 for i, f in enumerate(fails)]
        assert sorted(ran) == list(range(len(fails)))
        return
    first = fails.index(True)
    with pytest.raises(ValueError) as ei:
        t.map(job, range(len(fails)))
    assert ei.value.args == (first,)
    t.join(60)
    assert len(set(ran)) == len(ran) and set(range(first + 1)) <= set(ran)
    assert t.stats()["cancelled"] + len(ran) <= len(fails)


@pytest.mark.timeout(120)
def test_a_numpy_integer_chunk_size_is_an_integer(make_tasks):
    """chunk_size=np.int64(4) was refused: 'must be an integer >= 1 or None, got 4'."""
    np = pytest.importorskip("numpy")
    t = make_tasks(workers=2)
    assert t.map(abs, [-1, -2, -3], chunk_size=np.int64(4)) == [1, 2, 3]
    with pytest.raises(ValueError, match="chunk_size"):
        t.map(abs, [-1], chunk_size=np.int64(0))
    with pytest.raises(ValueError, match="chunk_size"):
        t.map(abs, [-1], chunk_size=np.float64(4))
