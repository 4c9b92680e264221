"""The seed's multi-task loader: masked words and modular arithmetic, interleaved at random 50/50 by batch (spec:
`specs/titans.md`, [TITANS-24]).

One vocabulary: the byte tokenizer's 260 ids, then the math tokens (numbers, ∘, =, MASK) shifted past them, so
`math.token_offset` is set to 260 here whatever the config says. Each batch is one task (shapes differ: math
sequences have 5 tokens); which one is a seeded coin flip per (split, index), so batches stay pure functions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch

from training.config import require
from training.tasks import check_batch_args, check_split
from training.tasks.masked_words import SPLIT_OFFSETS, MaskedWordsConfig, MaskedWordsTask
from training.tasks.modular import ModularConfig, ModularTask

Kind = Literal["language", "math"]


@dataclass(frozen=True)
class MultiTaskConfig:
    language: MaskedWordsConfig
    math: ModularConfig = field(default_factory=ModularConfig)
    math_fraction: float = 0.5

    def __post_init__(self) -> None:
        require(0 <= self.math_fraction <= 1, "math_fraction", self.math_fraction, "a number in [0, 1]")


class MultiTask:
    """[TITANS-24] Batch `index` is math with probability `math_fraction` (a coin seeded by split, index, seed)."""

    def __init__(self, cfg: MultiTaskConfig) -> None:
        self.cfg = cfg
        self.language = MaskedWordsTask(cfg.language)
        self.math = ModularTask(dataclasses.replace(cfg.math, token_offset=self.language.vocab_size))
        self.vocab_size = self.math.vocab_size

    def kind(self, split: str, index: int, seed: int) -> Kind:
        check_split(split, SPLIT_OFFSETS)
        g = torch.Generator().manual_seed((seed * 15_485_863 + SPLIT_OFFSETS[split] + index * 32_452_843 + 17) % 2**63)
        return "math" if float(torch.rand((), generator=g, dtype=torch.float64)) < self.cfg.math_fraction \
            else "language"

    def batch(self, split: str, index: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        check_batch_args(split, index, batch_size, SPLIT_OFFSETS)
        task = self.math if self.kind(split, index, seed) == "math" else self.language
        return task.batch(split, index, batch_size, seed)
