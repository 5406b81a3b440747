"""Which worker count the planner runs: every count keeps the batch exact, and the fastest on
the available slots wins, the fewest of those as fast."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pretrain_operator.api import WorkerCounts
from pretrain_trainer.config import Parallelism


def _brute_best(counts: WorkerCounts, available: int) -> int | None:
    """The rule spelled out: highest workers x efficiency, ties to the fewest workers."""
    fitting = [n for n in range(counts.low, counts.high + 1) if counts.fits(n) and n <= available]
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


LAYOUTS = st.builds(
    Parallelism,
    tensor=st.sampled_from([1, 2]),
    pipeline=st.sampled_from([1, 2, 4]),
    expert=st.sampled_from([1, 2, 3, 8]),
)


def _fits_by_definition(counts: WorkerCounts, workers: int) -> bool:
    """The layout's rule spelled out on the world: ``config.parallel``'s own check."""
    world = workers * counts.nproc
    return counts.low <= workers <= counts.high and (
        counts.parallelism.world_problem(world, micro_batches=counts.micro_batches) is None
    )


@given(
    micro_batches=st.integers(1, 600),
    replicas=st.integers(1, 4),
    layout=LAYOUTS,
    low=st.integers(1, 30),
    span=st.integers(0, 60),
    available=st.integers(0, 100),
)
def test_under_a_parallel_layout_only_counts_the_layout_can_split_run_and_best_is_the_fastest(
    micro_batches: int, replicas: int, layout: Parallelism, low: int, span: int, available: int
) -> None:
    counts = WorkerCounts(low, low + span, micro_batches, replicas * layout.replica, layout)
    fitting = [n for n in range(low, low + span + 1) if _fits_by_definition(counts, n)]
    assert list(counts.usable) == fitting
    assert counts.best(available) == _brute_best(counts, available)
    covered = [n for band in reversed(counts.bands()) for n in band.members()]
    assert covered == fitting
    for band in counts.bands():
        assert {counts.split(n).most for n in band.members()} == {band.most}


def test_pipeline_8_on_nodes_of_8_runs_only_worker_counts_that_divide_the_batch() -> None:
    """The reference job's foundation stage: 4096 micro-batches, one pipeline of 8 per node."""
    counts = WorkerCounts(64, 128, 4096, 8, Parallelism(pipeline=8))
    assert list(counts.usable) == [64, 128]
    assert {available: counts.best(available) for available in (128, 127, 64, 63)} == {
        128: 128,
        127: 64,
        64: 64,
        63: None,
    }
    assert counts.split(128).even
    assert counts.data_parallel(128) == 128


def test_expert_groups_larger_than_a_worker_take_workers_in_whole_groups() -> None:
    # Two data-parallel ranks per worker (tensor 4 on 8 processes), experts over 8 of them.
    counts = WorkerCounts(3, 13, 64, 8, Parallelism(tensor=4, expert=8))
    assert counts.step == 4
    assert list(counts.usable) == [4, 8, 12]
    assert counts.best(11) == 8
    assert counts.best(3) is None
