"""Autoregressive sampling for any registered token model.

Models that define `init_cache(batch_size)` and `step(cache, token_ids (B,)) -> (logits (B, V), cache)` are
sampled recurrently in O(1) per token; others recompute the whole prefix at every step.
"""

from __future__ import annotations

import torch
from torch import nn

from reference.unified import sample_token
from reference.validation import ConfigError
from training.loop import split_output


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """One token per row from logits (B, V): greedy at temperature 0, else softmax(logits/T) over the top k
    (the sampler of [UNI-10], shared by every model)."""
    return sample_token(logits, temperature, top_k, generator)


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, seed: int = 0, eos_id: int | None = None) -> torch.Tensor:
    """prompt (B, P) int64 → (B, P + n) with n ≤ max_new_tokens (stops early when every row emitted eos_id)."""
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ConfigError(f"generate: prompt must be (batch, length >= 1) token ids, got shape {tuple(prompt.shape)}")
    if max_new_tokens < 0:
        raise ConfigError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:
        raise ConfigError(f"generate: temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ConfigError(f"generate: top_k must be >= 0 (0: no truncation), got {top_k}")
    model.eval()
    g = torch.Generator().manual_seed(seed)
    out = prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    init_cache, step = getattr(model, "init_cache", None), getattr(model, "step", None)
    recurrent = callable(init_cache) and callable(step)
    cache = None
    if recurrent:
        assert callable(init_cache) and callable(step)
        cache = init_cache(prompt.shape[0])
        logits = prompt.new_zeros(())
        for t in range(prompt.shape[1]):
            logits, cache = step(cache, prompt[:, t])
    for _ in range(max_new_tokens):
        if not recurrent:
            logits = split_output(model(out))[0][:, -1]
        token = sample_next(logits, temperature=temperature, top_k=top_k, generator=g)
        out = torch.cat([out, token.unsqueeze(1)], dim=1)
        if eos_id is not None:
            done = done | (token == eos_id)
            if bool(done.all()):
                break
        if recurrent:
            assert callable(step)
            logits, cache = step(cache, token)
    return out
