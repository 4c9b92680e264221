"""Needle-in-a-haystack retrieval probe, run at every evaluation (`train: {probes: [niah]}`). Spec:
specs/atlas_mag.md ([MAG-12]).

Each trial is a haystack of random tokens with one needle "k₁ k₂ k₃ v" (a 3-token key, a 1-token value)
inserted at a depth drawn from 10 % … 90 %; the sequence ends with the key again, and the probe reads the
model's prediction after it. Reported: `accuracy` (argmax = v), `value_logprob` (mean log p(v)) and
`chance_logprob` (log 1/vocab) for comparison. Trials are seeded by `train.seed`, so every evaluation sees
the same probes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.loop import split_output

TRIALS = 16
MAX_LEN = 256
MAX_TOKEN = 256  # draw ids below this (bytes for the byte tokenizer)


def niah_batch(length: int, vocab: int, trials: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (trials, length), values (trials,)): haystacks with a needle and the key repeated at the end."""
    g = torch.Generator().manual_seed(seed)
    top = min(vocab, MAX_TOKEN)
    ids = torch.randint(0, top, (trials, length), generator=g)
    key = torch.randint(0, top, (trials, 3), generator=g)
    value = torch.randint(0, top, (trials,), generator=g)
    for n in range(trials):
        depth = int((0.1 + 0.8 * n / max(1, trials - 1)) * (length - 8))
        ids[n, depth:depth + 3] = key[n]
        ids[n, depth + 3] = value[n]
        ids[n, -3:] = key[n]
    return ids, value


def niah(model: nn.Module, exp: Any, device: torch.device) -> dict[str, float]:
    """[MAG-12] Retrieval accuracy and mean log-probability of the needle's value."""
    vocab = int(exp.model.vocab_size)
    length = max(12, min(int(getattr(exp.task, "seq_len", MAX_LEN)), MAX_LEN))
    ids, value = niah_batch(length, vocab, TRIALS, int(exp.train.seed))
    logits, _, _ = split_output(model(ids.to(device)))
    last = F.log_softmax(logits[:, -1].float(), dim=-1)  # (trials, V)
    value = value.to(device)
    return {
        "accuracy": float((last.argmax(dim=-1) == value).float().mean()),
        "value_logprob": float(last.gather(1, value[:, None]).mean()),
        "chance_logprob": -math.log(vocab),
    }
