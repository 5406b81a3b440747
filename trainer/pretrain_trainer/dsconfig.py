"""The DeepSpeed configuration, generated from the typed stage config (no "auto" values).

Pure and torch-free so it can be tested and shown without a training environment.
"""

from __future__ import annotations

from typing import Any

from .config import Stage

# How tensor parallelism splits the model's matrices (DeepSpeed's AutoTP training, regex specs
# over our module names): the output projections split their inputs (row-parallel, summed
# over the tensor group), the other projections their outputs (column-parallel). ``kv`` and
# ``gate_up`` stack two matrices, so each is split as two: rank r holds [k_r; v_r].
TENSOR_ROW = (r".*\.attn\.out\.weight$", r".*\.mlp\.down\.weight$")
TENSOR_COLUMN = (r".*\.attn\.q\.weight$",)
TENSOR_STACKED = (r".*\.attn\.kv\.weight$", r".*\.mlp\.gate_up\.weight$")


def tensor_parallel(size: int) -> dict[str, Any]:
    """DeepSpeed's ``tensor_parallel`` section: the embedding, the output layer, the norms and
    MoE experts stay whole on every rank of the group."""
    return {
        "autotp_size": size,
        "partition_config": {
            "use_default_specs": False,
            "layer_specs": [
                {"patterns": list(TENSOR_ROW), "partition_type": "row"},
                {"patterns": list(TENSOR_COLUMN), "partition_type": "column"},
                {
                    "patterns": list(TENSOR_STACKED),
                    "partition_type": "column",
                    "shape": [2, -1],
                    "partition_dim": 0,
                },
            ],
        },
    }


def owns_clipping(stage: Stage) -> bool:
    """Whether the trainer's optimizer clips gradients itself.

    DeepSpeed's ZeRO and bf16 optimizers compute the global gradient norm before clipping and
    clip inside their step, which is where the stability guard reads that norm. Without ZeRO
    in fp32 the engine clips the module's gradients and keeps no norm, so the guarded optimizer
    computes the norm and clips itself.
    """
    return stage.zero_stage == 0 and stage.precision == "fp32"


def lockstep(stage: Stage) -> bool:
    """Whether every rank must run the same number of micro-steps.

    ZeRO 2 and 3 reduce (and ZeRO 3 gathers) inside every forward and backward, so a rank with
    fewer micro-batches than the longest pads with zero-weighted dummy micro-steps, or the
    collectives fall out of step. ZeRO 0 and 1 reduce only at the accumulation boundary, which
    a short rank simply reaches sooner (it still needs one micro-step to reach it at all).
    Experts spread over ranks exchange tokens inside every forward: lockstep too.
    """
    return stage.zero_stage >= 2 or stage.parallelism.expert > 1


def deepspeed_config(stage: Stage, *, world_size: int) -> dict[str, Any]:
    """DeepSpeed config for ``stage`` at ``world_size`` processes. The global batch is exact
    at any world size (``config.split``): the trainer marks each accumulation boundary itself
    and weights each micro-batch's loss, so DeepSpeed is told the longest rank's count and no
    ``train_batch_size`` (which it insists is micro x accumulation x world: an uneven split
    is not). Raises ValueError naming the stage when the batch is not whole micro-batches."""
    split = stage.split(world_size)
    zero: dict[str, Any] = {"stage": stage.zero_stage}
    if stage.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if stage.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": stage.micro_batch_size,
        "gradient_accumulation_steps": split.most,
        "gradient_clipping": 0.0 if owns_clipping(stage) else stage.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": stage.precision == "bf16"},
        "fp16": {"enabled": False},
        # The optimizer is the trainer's own torch AdamW subclass (nothing compiled at run time).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if stage.parallelism.tensor > 1:
        config["tensor_parallel"] = tensor_parallel(stage.parallelism.tensor)
    return config
