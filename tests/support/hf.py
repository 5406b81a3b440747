"""Whether an exported model, loaded by transformers, computes what ours computes: logits to
1e-4 on a fixed random prompt, and the same 20 tokens decoded greedily."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from pretrain_trainer.model import Transformer


def prompt(vocab_size: int, rows: int = 2, length: int = 24) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (rows, length), generator=generator)


def greedy(model: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor) -> list[int]:
    """20 tokens after ``start``'s first row, each the argmax of the last position."""
    tokens = start
    for _ in range(20):
        tokens = torch.cat((tokens, model(tokens)[:, -1:].argmax(-1)), dim=1)
    return tokens[0, start.shape[1] :].tolist()


def assert_same_model(ours: Transformer, out: Path) -> None:
    """``out`` (an export) loads with AutoModelForCausalLM and matches ``ours`` (in eval mode)."""
    import transformers

    ours = ours.eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = prompt(ours.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=0, atol=1e-4)
        generated = theirs.generate(
            tokens[:1, :8],
            attention_mask=torch.ones_like(tokens[:1, :8]),  # id 0 is a token, not padding
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=[],  # no stop at eos: ours decodes 20 tokens whatever they are
            pad_token_id=0,
        )
        assert generated[0, 8:].tolist() == greedy(ours, tokens[:1, :8])
