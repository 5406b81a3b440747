"""The trainer's pieces on their own: DeepSpeed config, stability guard, model, contract,
metrics and health. Real torch, no processes."""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from pretrain_trainer.config import ModelConfig, MoE, Stage
from pretrain_trainer.contract import (
    ContractError,
    StageReport,
    TrainerEnv,
    parse_report,
    write_report,
)
from pretrain_trainer.dsconfig import deepspeed_config, owns_clipping
from pretrain_trainer.metrics import Health, TrainerMetrics, serve
from pretrain_trainer.model import Transformer, freeze
from pretrain_trainer.optim import GuardedAdamW


def _stage(**fields: Any) -> Stage:
    base = {"name": "s", "budget": {"steps": 10}, "dataMix": {"a": 1}, "globalBatchSize": 32}
    return Stage.model_validate({**base, **fields})


@pytest.mark.parametrize(
    ("fields", "world", "expected"),
    [
        ({}, 1, {"gradient_accumulation_steps": 32, "zero_optimization": {"stage": 1}}),
        ({"microBatchSize": 4}, 4, {"gradient_accumulation_steps": 2}),
        # 8 micro-batches over 3 ranks run 3, 3 and 2: DeepSpeed is told the longest.
        ({"microBatchSize": 4}, 3, {"gradient_accumulation_steps": 3}),
        ({"precision": "fp32"}, 2, {"bf16": {"enabled": False}, "fp16": {"enabled": False}}),
        (
            {"precision": "bf16", "gradClip": 2.0},
            2,
            {"bf16": {"enabled": True}, "gradient_clipping": 2.0},
        ),
        (
            {"zeroStage": 3, "offloadOptimizer": True, "offloadParams": True},
            2,
            {
                "zero_optimization": {
                    "stage": 3,
                    "offload_optimizer": {"device": "cpu", "pin_memory": False},
                    "offload_param": {"device": "cpu", "pin_memory": False},
                }
            },
        ),
        # Without ZeRO in fp32 the guarded optimizer clips (it needs the pre-clip norm).
        ({"zeroStage": 0, "precision": "fp32", "gradClip": 1.0}, 1, {"gradient_clipping": 0.0}),
    ],
)
def test_deepspeed_config_is_generated_from_the_stage(
    fields: dict[str, Any], world: int, expected: dict[str, Any]
) -> None:
    config = deepspeed_config(_stage(**fields), world_size=world)
    assert {k: config[k] for k in expected} == expected
    # DeepSpeed would insist on micro x accumulation x world, which an uneven split is not.
    assert "train_batch_size" not in config
    covered = config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"]
    assert 0 <= covered * world - 32 < config["train_micro_batch_size_per_gpu"] * world
    assert "auto" not in repr(config)


def test_deepspeed_config_refuses_a_batch_that_is_not_whole_micro_batches() -> None:
    # Any world size splits whole micro-batches; a batch that is not whole ones cannot run.
    with pytest.raises(ValueError, match="globalBatchSize 30 is not whole micro-batches of 4"):
        deepspeed_config(_stage(microBatchSize=4, globalBatchSize=30), world_size=3)
    with pytest.raises(ValueError, match="over world size 0"):
        deepspeed_config(_stage(microBatchSize=4), world_size=0)


def test_only_zero0_fp32_clips_in_the_optimizer() -> None:
    assert owns_clipping(_stage(zeroStage=0, precision="fp32"))
    assert not owns_clipping(_stage(zeroStage=0, precision="bf16"))
    assert not owns_clipping(_stage(zeroStage=1, precision="fp32"))


def _guarded(norms: list[float | None], **kw: Any) -> tuple[GuardedAdamW, torch.nn.Parameter]:
    param = torch.nn.Parameter(torch.ones(4))
    opt = GuardedAdamW(
        [param],
        lr=0.1,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.0,
        spike_factor=kw.get("spike_factor", 5.0),
        spike_window=10,
        clip=kw.get("clip", 0.0),
    )
    queue = list(norms)
    opt.norm_source = (lambda: queue.pop(0)) if norms else None
    return opt, param


def _one_step(opt: GuardedAdamW, param: torch.nn.Parameter, grad: float = 1.0) -> bool:
    param.grad = torch.full_like(param, grad)
    before = param.detach().clone()
    opt.begin_step()
    opt.step()
    opt.step()  # a ZeRO wrapper calls step once per parameter group: decided once per step
    return not torch.equal(before, param.detach())


def test_guard_skips_a_spiking_step_and_counts_it() -> None:
    opt, param = _guarded([1.0, 1.1, 0.9, 1.0, 1.05, 50.0, 1.0])
    applied = [_one_step(opt, param) for _ in range(7)]
    assert applied == [True, True, True, True, True, False, True]
    assert opt.skipped_steps == 1
    assert opt.last_grad_norm == 1.0


def test_guard_skips_non_finite_norms_even_without_history() -> None:
    opt, param = _guarded([float("nan"), float("inf"), 1.0])
    assert [_one_step(opt, param) for _ in range(3)] == [False, False, True]
    assert opt.skipped_steps == 2


def test_guard_with_spike_factor_zero_only_skips_non_finite() -> None:
    opt, param = _guarded([1.0] * 5 + [1e6], spike_factor=0.0)
    assert all(_one_step(opt, param) for _ in range(6))


def test_guard_computes_and_clips_the_norm_itself_without_a_source() -> None:
    opt, param = _guarded([], clip=1.0)
    param.grad = torch.full((4,), 3.0)
    opt.begin_step()
    opt.step()
    assert math.isclose(opt.last_grad_norm, 6.0, rel_tol=1e-6)
    # AdamW normalises the update, so check the clipped gradient went into the moments.
    assert torch.allclose(opt.state[param]["exp_avg"], torch.full((4,), 0.1 * 0.5), atol=1e-6)


SMALL = ModelConfig(layers=2, hidden=32, heads=4, kv_heads=2, vocab_size=64, seq_len=16)


def test_model_parameter_count_matches_the_config() -> None:
    for config in (SMALL, SMALL.model_copy(update={"moe": MoE(experts=4)})):
        model = Transformer(config)
        assert sum(p.numel() for p in model.parameters()) == config.num_params()


def test_model_is_causal() -> None:
    torch.manual_seed(0)
    model = Transformer(SMALL).eval()
    tokens = torch.randint(0, 64, (1, 16))
    changed = tokens.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 64
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not torch.allclose(a[0, 10:], b[0, 10:], atol=1e-6)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    plain = Transformer(SMALL)
    recomputed = Transformer(SMALL, activation_checkpointing=True)
    recomputed.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 64, (2, 16))
    for model in (plain, recomputed):
        model(tokens).sum().backward()
    for (name, a), (_, b) in zip(
        plain.named_parameters(), recomputed.named_parameters(), strict=True
    ):
        assert a.grad is not None
        assert b.grad is not None
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_moe_routes_every_token_and_has_a_finite_balance_loss() -> None:
    torch.manual_seed(0)
    model = Transformer(SMALL.model_copy(update={"moe": MoE(experts=4, top_k=2)}))
    model(torch.randint(0, 64, (4, 16))).sum().backward()
    load = model.expert_load()
    assert load is not None
    assert math.isclose(float(load.sum()), 1.0, rel_tol=1e-5)
    aux = model.aux_loss()
    assert torch.isfinite(aux)
    assert (
        float(aux.detach()) >= 0.99
    )  # the Switch loss is 1 at perfect balance and grows otherwise
    assert model.layers[0].mlp.router.weight.grad is not None


def test_freeze_stops_gradients_by_module_prefix() -> None:
    model = Transformer(SMALL)
    frozen = freeze(model, ["embed", "layers.0"])
    names = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "embed.weight" in names
    assert all(n.startswith(("embed", "layers.0.")) for n in names)
    assert not any(n.startswith("layers.1.") for n in names)
    assert frozen == sum(p.numel() for p in model.parameters() if not p.requires_grad)


def test_contract_environment_is_parsed_with_clear_errors() -> None:
    env = TrainerEnv.from_environ(
        {"PRETRAIN_JOB": "j", "PRETRAIN_STAGE": "2", "PRETRAIN_METRICS_PORT": "9400"}
    )
    assert (env.job, env.stage, env.metrics_port, env.namespace) == ("j", 2, 9400, "local")
    with pytest.raises(ContractError, match="missing environment variable"):
        TrainerEnv.from_environ({"PRETRAIN_JOB": "j"})
    with pytest.raises(ContractError, match="PRETRAIN_STAGE='x' is not an integer"):
        TrainerEnv.from_environ({"PRETRAIN_JOB": "j", "PRETRAIN_STAGE": "x"})


def test_health_fails_once_no_step_finished_within_the_timeout() -> None:
    now = [100.0]
    health = Health(step_timeout=30, clock=lambda: now[0])
    now[0] = 129.0
    assert health.healthy()
    now[0] = 131.0
    assert not health.healthy()
    health.progressed()
    assert health.healthy()


def test_metrics_and_healthz_are_served_over_http() -> None:
    metrics = TrainerMetrics(namespace="ns", job="j", stage="foundation")
    now = [0.0]
    health = Health(step_timeout=10, clock=lambda: now[0])
    metrics.loss.set(2.5)
    metrics.tokens.inc(1024)
    metrics.expert_load([0.25, 0.75])
    server = serve(port=0, metrics=metrics, health=health)
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
        assert 'pretrainjob_loss{job="j",namespace="ns",stage="foundation"} 2.5' in text
        assert 'pretrainjob_tokens_total{job="j",namespace="ns",stage="foundation"} 1024.0' in text
        assert 'pretrainjob_moe_expert_load{expert="1",job="j"' in text
        assert urllib.request.urlopen(f"{base}/healthz", timeout=5).status == 200
        now[0] = 11.0
        with pytest.raises(urllib.error.HTTPError) as stalled:
            urllib.request.urlopen(f"{base}/healthz", timeout=5)
        assert stalled.value.code == 503
    finally:
        server.shutdown()


def test_report_is_written_whole(tmp_path: Path) -> None:
    target = tmp_path / "reports" / "stage.json"
    report = StageReport(
        job="j", stage=1, stage_name="b", step=7, tokens=70, loss=2.5, checkpoint="/c", world_size=2
    )
    write_report(str(target), report)
    assert target.read_text() == (
        '{"finished":true,"stage":1,"step":7,"tokens":70,"loss":2.5,"checkpoint":"/c",'
        '"job":"j","stageName":"b","skippedSteps":0,"worldSize":2}\n'
    )
    assert parse_report(target.read_text()) == report
    assert list(target.parent.iterdir()) == [target]
