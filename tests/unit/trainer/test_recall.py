"""Choosing what to restore from the workers' in-memory tiers (pure: no process group)."""

from __future__ import annotations

import pytest
from pretrain_trainer.ckpt.layout import file_rank
from pretrain_trainer.ckpt.manifest import FileRecord, Manifest
from pretrain_trainer.ckpt.recall import Held, Holdings, Transfer, plan_recall
from pretrain_trainer.config import RunConfig

SHARED = "mp_rank_00_model_states.pt"


def _files(world: int) -> list[str]:
    ranked = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    return [SHARED, *ranked, *(f"rng/rank-{r}.pt" for r in range(world))]


def _owned(rank: int, world: int) -> set[str]:
    """What rank ``rank`` wrote (rank 0 also the module states)."""
    return {p for p in _files(world) if file_rank(p) == rank or (rank == 0 and p == SHARED)}


def _manifest(step: int, world: int) -> Manifest:
    return Manifest(
        job="j",
        stage=0,
        stage_name="s",
        step=step,
        tokens=step * 10,
        world_size=world,
        zero_stage=1,
        config_hash="h",
        final=False,
        saved_at="2026-12-03T00:00:00Z",
        sampler={},
        files=[FileRecord(path=p, size=100, crc32=1) for p in sorted(_files(world))],
    )


def _held(worker: str, snapshots: dict[int, set[str]], *, world: int = 2) -> Holdings:
    found = [
        Held(step, _manifest(step, world), frozenset(files)) for step, files in snapshots.items()
    ]
    return Holdings(worker, tuple(sorted(found, key=lambda h: -h.step)))


def test_file_owners_are_read_from_deepspeeds_and_our_names() -> None:
    assert file_rank(SHARED) is None
    assert file_rank("zero_pp_rank_12_mp_rank_00_optim_states.pt") == 12
    assert file_rank("bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert file_rank("rng/rank-5.pt") == 5
    assert file_rank("universal/zero/embed.weight/fp32.pt") is None


def test_a_survivor_holding_its_own_and_its_lost_neighbours_files_restores_alone() -> None:
    both = _owned(0, 2) | _owned(1, 2)  # its own, and worker 0's copy
    plan = plan_recall([_held("w1", {8: both})], world_size=1, at_least=4)
    assert plan is not None
    assert (plan.manifest.step, plan.universal, plan.transfers) == (8, True, ())
    assert plan.reads[0] == frozenset(_files(2))  # it converts everything
    assert plan.converters == {0}


def test_a_spare_in_the_lost_workers_place_gets_only_the_files_its_rank_reads() -> None:
    survivor = _held("w1", {8: _owned(0, 2) | _owned(1, 2)})
    spare = _held("w2", {})
    plan = plan_recall([survivor, spare], world_size=2, at_least=None)
    assert plan is not None
    assert not plan.universal
    # rank 1 (the spare) reads rank 1's partition and RNG and the shared module states
    assert set(plan.transfers) == {
        Transfer(path, 100, source=0, destination=1) for path in _owned(1, 2) | {SHARED}
    }
    assert plan.reads[1] == frozenset(_owned(1, 2) | {SHARED})


def test_a_snapshot_whose_copy_to_the_neighbour_did_not_finish_is_passed_over() -> None:
    # step 10's files of worker 0 went with it: only step 8 is whole on the survivor
    survivor = _held("w1", {10: _owned(1, 2), 8: _owned(0, 2) | _owned(1, 2)})
    plan = plan_recall([survivor], world_size=1, at_least=None)
    assert plan is not None
    assert plan.manifest.step == 8


def test_storage_wins_when_it_holds_a_newer_checkpoint_and_memory_wins_a_tie() -> None:
    survivor = _held("w1", {8: _owned(0, 2) | _owned(1, 2)})
    assert plan_recall([survivor], world_size=1, at_least=12) is None
    tie = plan_recall([survivor], world_size=1, at_least=8)
    assert tie is not None
    assert tie.manifest.step == 8


def test_ranks_of_one_worker_share_its_tier_so_one_copy_serves_them() -> None:
    # new world of 4 on two workers of 2 ranks; worker B holds nothing yet
    held_a = _held("A", {6: set(_files(4))}, world=4)
    empty = _held("B", {}, world=4)
    plan = plan_recall([held_a, held_a, empty, empty], world_size=4, at_least=None)
    assert plan is not None
    destinations = {t.path: t.destination for t in plan.transfers}
    assert destinations[SHARED] == 2  # the first reader on worker B, once
    assert destinations["rng/rank-3.pt"] == 3
    assert all(t.source == 0 for t in plan.transfers)


def test_nothing_held_means_no_memory_restore() -> None:
    assert plan_recall([_held("w", {}), _held("v", {})], world_size=2, at_least=None) is None


@pytest.mark.parametrize(
    ("checkpoint", "memory"),
    [({"intervalSteps": 5}, 5), ({"intervalSteps": 100}, 10), ({"memoryIntervalSteps": 3}, 3)],
)
def test_the_memory_interval_defaults_to_at_most_ten_steps(
    checkpoint: dict[str, int], memory: int
) -> None:
    config = RunConfig.parse(_config(checkpoint))
    assert config.checkpoint.memory_interval == memory


def test_a_memory_interval_longer_than_the_storage_interval_is_refused_by_field() -> None:
    from pretrain_trainer.config import SpecError

    with pytest.raises(SpecError) as caught:
        RunConfig.parse(_config({"intervalSteps": 4, "memoryIntervalSteps": 8}))
    assert "checkpoint.memoryIntervalSteps" in str(caught.value)


def _config(checkpoint: dict[str, int]) -> dict[str, object]:
    return {
        "model": {"layers": 2, "hidden": 64, "heads": 4, "vocabSize": 256, "seqLen": 64},
        "data": {"sources": [{"name": "a", "path": "a"}]},
        "stages": [
            {
                "name": "s",
                "budget": {"steps": 10},
                "dataMix": {"a": 1},
                "globalBatchSize": 4,
                "microBatchSize": 1,
            }
        ],
        "checkpoint": checkpoint,
    }
