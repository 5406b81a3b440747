"""The Hugging Face layout of our model: Llama (dense) or Mixtral (MoE) names and config.

The model is architecturally Llama / Mixtral (RoPE, RMSNorm, SwiGLU, grouped-query attention,
top-k routing with renormalised softmax weights), so an export is a renaming plus three
reshapes:

- **RoPE.** Ours rotates interleaved pairs of each head (dimensions ``(0, 1), (2, 3), ...``),
  Hugging Face's rotates halves (``(j, j + d/2)``). The output rows of ``q`` and ``k`` are
  permuted within each head to ``[0, 2, 4, ..., d-2, 1, 3, ..., d-1]``: frequency ``j`` then
  lands at ``j`` and ``j + d/2``, and since ``q`` and ``k`` get the same permutation, ``q.k``
  and so the attention are unchanged.
- **Stacked projections.** ``attn.kv`` is ``[k; v]``, ``mlp.gate_up`` is ``[gate; up]``.
- **Experts** in the classic Mixtral layout (``block_sparse_moe.experts.<j>.w1/w2/w3``), which
  vLLM reads and transformers 5 converts on load.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}


def rope_permutation(head_dim: int) -> torch.Tensor:
    """Row order within a head that turns interleaved RoPE pairs into rotated halves."""
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))


def _halves(weight: torch.Tensor, *, heads: int, head_dim: int) -> torch.Tensor:
    rows = weight.view(heads, head_dim, -1)[:, rope_permutation(head_dim)]
    return rows.reshape(heads * head_dim, -1)


def hf_weights(model: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state (the model's names, tied parameters once) under Hugging Face's names."""
    hd, kv_rows, ffn = model.head_dim, model.kv_head_count * model.head_dim, model.ffn_width
    out = {"model.embed_tokens.weight": state["embed.weight"]}
    for i in range(model.layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        k, v = torch.tensor_split(state[ours + "attn.kv.weight"], [kv_rows])
        out |= {
            theirs + "input_layernorm.weight": state[ours + "attn_norm.weight"],
            theirs + "self_attn.q_proj.weight": _halves(
                state[ours + "attn.q.weight"], heads=model.heads, head_dim=hd
            ),
            theirs + "self_attn.k_proj.weight": _halves(k, heads=model.kv_head_count, head_dim=hd),
            theirs + "self_attn.v_proj.weight": v,
            theirs + "self_attn.o_proj.weight": state[ours + "attn.out.weight"],
            theirs + "post_attention_layernorm.weight": state[ours + "mlp_norm.weight"],
        }
        if model.moe is None:
            gate, up = torch.tensor_split(state[ours + "mlp.gate_up.weight"], [ffn])
            out |= {
                theirs + "mlp.gate_proj.weight": gate,
                theirs + "mlp.up_proj.weight": up,
                theirs + "mlp.down_proj.weight": state[ours + "mlp.down.weight"],
            }
            continue
        moe = theirs + "block_sparse_moe."
        out[moe + "gate.weight"] = state[ours + "mlp.router.weight"]
        for j in range(model.moe.experts):
            expert = f"{ours}mlp.experts.{j}."
            gate, up = torch.tensor_split(state[expert + "gate_up.weight"], [ffn])
            out |= {
                f"{moe}experts.{j}.w1.weight": gate,
                f"{moe}experts.{j}.w3.weight": up,
                f"{moe}experts.{j}.w2.weight": state[expert + "down.weight"],
            }
    out["model.norm.weight"] = state["norm.weight"]
    if not model.tie_embeddings:
        out["lm_head.weight"] = state["head.weight"]
    return out


def hf_config(model: ModelConfig, *, dtype: str, eos_id: int | None) -> dict[str, Any]:
    """``config.json``: LlamaForCausalLM or MixtralForCausalLM. ``rope_theta`` is given both
    ways: transformers 5 reads ``rope_parameters``, 4.x the top-level key."""
    config: dict[str, Any] = {
        "architectures": ["MixtralForCausalLM" if model.moe else "LlamaForCausalLM"],
        "model_type": "mixtral" if model.moe else "llama",
        "hidden_size": model.hidden,
        "intermediate_size": model.ffn_width,
        "num_hidden_layers": model.layers,
        "num_attention_heads": model.heads,
        "num_key_value_heads": model.kv_head_count,
        "head_dim": model.head_dim,
        "vocab_size": model.vocab_size,
        "max_position_embeddings": model.seq_len,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},
        "tie_word_embeddings": model.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": DTYPE_NAMES[dtype],
        "dtype": DTYPE_NAMES[dtype],
        # Documents are separated by the end-of-sequence token alone: there is no BOS.
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": None,
    }
    if model.moe is None:
        config["mlp_bias"] = False
    else:
        config |= {
            "num_local_experts": model.moe.experts,
            "num_experts_per_tok": model.moe.top_k,
            "router_aux_loss_coef": model.moe.aux_loss_coef,
            "router_jitter_noise": 0.0,
            "output_router_logits": False,
            "sliding_window": None,
        }
    return config


def generation_config(*, eos_id: int | None) -> dict[str, Any]:
    """``generation_config.json``: stop at the end-of-sequence token, pad with it."""
    return {"bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": eos_id}


def tokenizer_config(tokenizer_json: str, *, eos_id: int | None, seq_len: int) -> dict[str, Any]:
    """``tokenizer_config.json`` for the tokenizers file saved as ``tokenizer.json``, so that
    ``AutoTokenizer`` loads it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer

    eos = Tokenizer.from_str(tokenizer_json).id_to_token(eos_id) if eos_id is not None else None
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": seq_len,
        "clean_up_tokenization_spaces": False,
    }
    if eos is not None:
        config |= {"eos_token": eos, "pad_token": eos}
    return config
