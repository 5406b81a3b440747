"""The shipped examples are valid and say what their comments promise."""

from __future__ import annotations

from typing import Any

from pretrain_operator.api import parse_job

from tests.conftest import ROOT, load_yaml


def test_example_parses_into_a_job(example_doc: Any) -> None:
    job = parse_job(example_doc)
    assert job.spec.stages
    for stage in job.spec.stages:
        assert job.spec.worker_counts(stage).usable, stage.name


def test_tiny_cpu_example_has_three_short_fp32_stages() -> None:
    job = parse_job(load_yaml(ROOT / "examples" / "tiny-cpu.yaml"))
    assert [s.name for s in job.spec.stages] == ["foundation", "enhancement", "instruction"]
    assert all(s.precision == "fp32" for s in job.spec.stages)  # no bf16 speed-up on CPU
    assert sum(s.total_steps(job.spec.model) for s in job.spec.stages) <= 300
    assert job.spec.model.num_params() < 1_000_000
    assert job.spec.elastic.max_count == 2


def test_gpu_example_runs_one_process_per_requested_gpu() -> None:
    job = parse_job(load_yaml(ROOT / "examples" / "gpu-1node.yaml"))
    assert job.spec.resources.gpus() == job.spec.nproc_per_worker == 8
    assert not list(job.warnings())


def test_reference_example_follows_the_published_three_stage_recipe() -> None:
    job = parse_job(load_yaml(ROOT / "examples" / "deepseek-3stage.yaml"))
    stages = job.spec.stages

    def mix(i: int) -> dict[str, float]:
        total = sum(stages[i].data_mix.values())
        return {k: round(v / total, 6) for k, v in stages[i].data_mix.items()}

    assert [s.name for s in stages] == ["foundation", "enhancement", "instruction"]
    assert mix(0) == {"general-text": 0.8, "code": 0.2}
    assert mix(1) == {"domain-text": 0.5, "knowledge": 0.3, "math": 0.2}
    assert mix(2) == {"curated-instructions": 0.3, "synthetic-instructions": 0.7}
    assert [s.global_batch_size for s in stages] == [4096, 2048, 1024]
    assert [s.optimizer.lr for s in stages] == [3e-4, 1e-4, 5e-5]
    assert stages[0].lr_schedule.warmup_steps > 0
    assert (stages[1].lr_schedule.decay, stages[1].lr_schedule.final_lr) == ("cosine", 5e-5)
    assert (stages[2].lr_schedule.decay, stages[2].lr_schedule.final_lr) == ("step", 1e-5)
    assert [s.dropout for s in stages] == [0.1, 0.3, 0.5]
    assert [s.optimizer.weight_decay for s in stages] == [0.01, 0.05, 0.1]
    assert [s.grad_clip for s in stages] == [1.0, 2.0, 5.0]
    assert [s.label_smoothing for s in stages] == [0.05, 0.1, 0.2]
    assert 60e9 < job.spec.model.num_params() < 70e9
    assert job.spec.elastic.max_count * job.spec.nproc_per_worker == 1024
