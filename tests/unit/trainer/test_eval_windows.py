"""The held-out windows and their shares: fixed by the source alone, whole, disjoint, and
split over any number of ranks without a window lost or read twice."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from pretrain_trainer.config import Evaluation
from pretrain_trainer.evaluate import share, window_offsets


@given(tokens=st.integers(0, 100_000), seq_len=st.integers(1, 512), count=st.integers(1, 2_000))
def test_windows_are_whole_disjoint_and_as_many_as_fit(
    tokens: int, seq_len: int, count: int
) -> None:
    offsets = window_offsets(tokens, seq_len=seq_len, count=count)
    assert len(offsets) == min(count, tokens // (seq_len + 1))
    assert all(o >= 0 and o + seq_len + 1 <= tokens for o in offsets.tolist())
    gaps = offsets[1:] - offsets[:-1]
    assert (gaps >= seq_len + 1).all()  # sorted, never overlapping


def test_windows_spread_over_the_whole_source() -> None:
    offsets = window_offsets(10_000, seq_len=9, count=10)
    assert offsets.tolist() == [i * 1000 for i in range(10)]


@given(count=st.integers(0, 1_000), ranks=st.integers(1, 64))
def test_shares_cover_every_window_once_and_differ_by_at_most_one(count: int, ranks: int) -> None:
    shares = [range(count)[share(count, rank=r, ranks=ranks)] for r in range(ranks)]
    assert [i for s in shares for i in s] == list(range(count))
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1


def test_a_stage_evaluates_at_its_interval_and_always_at_its_end() -> None:
    every = Evaluation(interval_steps=5)
    assert [s for s in range(1, 13) if every.due(s, last_step=s == 12)] == [5, 10, 12]
    end_only = Evaluation()
    assert [s for s in range(1, 13) if end_only.due(s, last_step=s == 12)] == [12]
    assert end_only.names(["a", "b"]) == ["a", "b"]
    assert Evaluation(sources=["b"]).names(["a", "b"]) == ["b"]


def test_a_report_with_the_most_eval_sources_fits_a_termination_message() -> None:
    """Kubernetes keeps 4096 bytes of a container's termination message: the stage report,
    with every counter of its usage set and the longest names, must fit with a kilobyte to
    spare for fields to come."""
    from pretrain_trainer.config.training import MAX_EVAL_SOURCES
    from pretrain_trainer.contract import StageReport, Usage

    long = "x" * 60
    usage = Usage(
        **{
            name: 2**31 if field.annotation in (int, int | None) else 1.2345678901234567e9
            for name, field in Usage.model_fields.items()
            if name != "attempt"
        },
        attempt=2**31,
    )
    report = StageReport(
        job="j" * 63,
        stage=63,
        stage_name="s" * 63,
        step=2**40,
        tokens=2**60,
        loss=1.2345678901234567,
        eval_loss={f"{long}{i:02d}": 1.2345678901234567 for i in range(MAX_EVAL_SOURCES)},
        checkpoint="/checkpoints/" + "j" * 63 + "/stage-63/step-1099511627776",
        world_size=2**20,
        usage=usage,
    )
    assert len(report.to_json().encode()) + 1 <= 4096 - 1000, len(report.to_json())
