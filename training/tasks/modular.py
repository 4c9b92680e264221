"""Modular arithmetic `a ∘ b = [MASK]` mod p (Power et al., 2022), split into train/val by pairs (spec:
`specs/titans.md`, [TITANS-19]).

Token layout (plus `token_offset`, so that the multi-task loader can put these after a text vocabulary):
numbers 0 … p − 1 are ids 0 … p − 1, then `∘` = p, `=` = p + 1, MASK = p + 2. A sequence is
`[a, ∘, b, =, MASK]`; only the MASK position carries a target, (a ∘ b) mod p.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from training.config import require
from training.tasks import check_batch_args, check_split
from training.tasks.needle import IGNORE_INDEX

SPLIT_OFFSETS = {"train": 0, "val": 1_000_003, "test": 2_000_006}
SEQ_LEN = 5
ANSWER_POSITION = 4


@dataclass(frozen=True)
class ModularConfig:
    """The seed's task is mod 97 with `+`; `train_fraction` of the p² pairs train, the rest validate."""

    p: int = 97
    op: Literal["+", "-", "*"] = "+"
    train_fraction: float = 0.5
    split_seed: int = 0
    token_offset: int = 0

    def __post_init__(self) -> None:
        require(self.p >= 2, "p", self.p, "an integer >= 2 (the modulus)")
        require(0 < self.train_fraction < 1, "train_fraction", self.train_fraction, "a number in (0, 1)")
        require(self.split_seed >= 0, "split_seed", self.split_seed, "an integer >= 0")
        require(self.token_offset >= 0, "token_offset", self.token_offset, "an integer >= 0")


class ModularTask:
    """[TITANS-19] `[a, ∘, b, =, MASK]` → (a ∘ b) mod p at the MASK position; pairs split once by `split_seed`."""

    def __init__(self, cfg: ModularConfig) -> None:
        self.cfg = cfg
        p, o = cfg.p, cfg.token_offset
        self.op_token, self.eq_token, self.mask_token = o + p, o + p + 1, o + p + 2
        self.vocab_size = o + p + 3
        g = torch.Generator().manual_seed(cfg.split_seed)
        order = torch.randperm(p * p, generator=g)  # pair index a·p + b
        n_train = min(max(1, round(cfg.train_fraction * p * p)), p * p - 1)
        self.pairs = {"train": order[:n_train], "val": order[n_train:]}

    def number_tokens(self) -> torch.Tensor:
        """The token ids of the numbers 0 … p − 1 (rows of the embedding the grokking metrics read)."""
        return torch.arange(self.cfg.p) + self.cfg.token_offset

    def answer(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        p = self.cfg.p
        if self.cfg.op == "+":
            return (a + b) % p
        if self.cfg.op == "-":
            return (a - b) % p
        return (a * b) % p

    def encode(self, pair_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs (N,) as a·p + b -> input_ids (N, 5) and targets (N, 5) (IGNORE_INDEX but at the MASK)."""
        p, o = self.cfg.p, self.cfg.token_offset
        a, b = pair_index // p, pair_index % p
        n = pair_index.shape[0]
        x = torch.stack([a + o, torch.full_like(a, self.op_token), b + o, torch.full_like(a, self.eq_token),
                         torch.full_like(a, self.mask_token)], dim=1)  # (N, 5)
        y = torch.full((n, SEQ_LEN), IGNORE_INDEX, dtype=torch.long)
        y[:, ANSWER_POSITION] = self.answer(a, b) + o
        return x, y

    def split_pairs(self, split: str) -> torch.Tensor:
        check_split(split, SPLIT_OFFSETS)
        return self.pairs["train" if split == "train" else "val"]

    def batch(self, split: str, index: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `index` of `split`: `batch_size` pairs drawn uniformly (with replacement) from the split."""
        check_batch_args(split, index, batch_size, SPLIT_OFFSETS)
        pairs = self.split_pairs(split)
        g = torch.Generator().manual_seed((seed * 7_919_993 + SPLIT_OFFSETS[split] + index * 104_729) % 2**63)
        pick = torch.randint(0, pairs.shape[0], (batch_size,), generator=g)
        return self.encode(pairs[pick])

    def full(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Every pair of the split once (full-batch training and exact accuracy, as in Power et al.)."""
        return self.encode(self.split_pairs(split))
