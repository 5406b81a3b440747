"""Which worker count the planner runs: every count keeps the batch exact, and the fastest on
the available slots wins, the fewest of those as fast."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pretrain_operator.api import WorkerCounts


def _brute_best(counts: WorkerCounts, available: int) -> int | None:
    """The rule spelled out: highest workers x efficiency, ties to the fewest workers."""
    fitting = [n for n in counts.usable if n <= available]
    if not fitting:
        return None
    fastest = max(counts.useful(n) for n in fitting)
    return min(n for n in fitting if counts.useful(n) >= fastest - 1e-9)


@given(
    micro_batches=st.integers(1, 3000),
    nproc=st.integers(1, 8),
    low=st.integers(1, 60),
    span=st.integers(0, 80),
    available=st.integers(0, 160),
)
def test_best_is_the_fastest_count_that_fits_and_the_fewest_of_that_speed(
    micro_batches: int, nproc: int, low: int, span: int, available: int
) -> None:
    counts = WorkerCounts(low, low + span, micro_batches, nproc)
    assert counts.best(available) == _brute_best(counts, available)


@given(micro_batches=st.integers(1, 3000), nproc=st.integers(1, 8), low=st.integers(1, 60))
def test_bands_cover_every_count_once_fastest_first_and_each_runs_its_fewest(
    micro_batches: int, nproc: int, low: int
) -> None:
    counts = WorkerCounts(low, low + 70, micro_batches, nproc)
    bands = counts.bands()
    covered = [n for band in reversed(bands) for n in range(band.low, band.high + 1)]
    assert covered == list(counts.usable)
    assert [b.useful for b in bands] == sorted((b.useful for b in bands), reverse=True)
    for band in bands:
        assert counts.best(band.high) == band.low
        assert {counts.split(n).most for n in range(band.low, band.high + 1)} == {band.most}


def test_plan_table_at_batch_4096_on_nodes_of_8_prefers_127_nodes_worth_to_64() -> None:
    """The reference job (examples/deepseek-3stage.yaml, foundation): 4096 micro-batches
    over 64-128 nodes of 8 processes."""
    counts = WorkerCounts(64, 128, 4096, 8)
    table = {available: counts.best(available) for available in (128, 127, 110, 103, 102, 64, 63)}
    assert table == {128: 128, 127: 103, 110: 103, 103: 103, 102: 86, 64: 64, 63: None}
    # 127 nodes do 5 micro-batches on the longest rank, 81% efficient: 102.4 nodes' worth,
    # which 103 nodes give at 99%. A divisor-only rule fell back to 64.
    assert counts.split(127).most == counts.split(103).most == 5
    assert counts.split(127).efficiency == pytest.approx(0.806, abs=1e-3)
    assert counts.useful(127) == pytest.approx(counts.useful(103)) == pytest.approx(102.4)
    assert counts.useful(103) > 1.5 * counts.useful(64)


def test_a_batch_that_is_not_whole_micro_batches_has_no_usable_count() -> None:
    counts = WorkerCounts(1, 8, 0, 1)
    assert list(counts.usable) == []
    assert counts.best(8) is None
    assert counts.bands() == []


def test_workers_beyond_the_micro_batches_are_named_as_idle() -> None:
    assert WorkerCounts(1, 8, 12, 2).idle_above() == 6
    assert WorkerCounts(1, 6, 12, 2).idle_above() is None
    assert WorkerCounts(1, 8, 12, 2).best(8) == 6  # the last two would only pad
