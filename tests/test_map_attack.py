"""tasks.map of Python tasks under attack: what a failed submission already queued, races of
the cancellation with the workers."""

from __future__ import annotations

import os

import pytest

import isolation_attack_helpers as h
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
    assert not os.path.exists(ran), f"items ran after map raised: {open(ran).read().split()}"
    assert t.stats()["cancelled"] == 2
