"""Needle-in-a-haystack key–value retrieval (EMMA's synthetic task; see specs/tasks.md).

A sequence of length L holds filler tokens with `n_needles` (key, value) pairs hidden at random,
non-overlapping positions; it ends with a QUERY token and one of the keys. The model must emit that key's
value at the last position. Only that position carries a target (others are -100, ignored).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.config import require
from training.tasks import check_batch_args

IGNORE_INDEX = -100
SPLIT_OFFSETS = {"train": 0, "val": 1_000_003, "test": 2_000_006}


@dataclass(frozen=True)
class NeedleConfig:
    """`n_needles` pairs in a sequence of `seq_len` tokens (the seed's recipes: n4_len512, n8_len1024)."""

    n_needles: int = 4
    seq_len: int = 64
    num_keys: int = 16
    num_values: int = 16
    num_filler: int = 16

    def __post_init__(self) -> None:
        require(self.n_needles >= 1, "n_needles", self.n_needles, "an integer >= 1")
        require(self.seq_len >= 1, "seq_len", self.seq_len, "an integer >= 1")
        require(self.seq_len >= 2 * self.n_needles + 2, "seq_len", self.seq_len,
                f"at least 2·n_needles + 2 = {2 * self.n_needles + 2} (each needle takes 2 tokens, the query 2)")
        require(self.num_keys >= self.n_needles, "num_keys", self.num_keys,
                f"at least n_needles = {self.n_needles} (keys in one sequence are distinct)")
        require(self.num_values >= 2, "num_values", self.num_values, "an integer >= 2")
        require(self.num_filler >= 1, "num_filler", self.num_filler, "an integer >= 1")


class NeedleTask:
    """[TASK-1] Token layout: [filler | keys | values | QUERY]."""

    def __init__(self, cfg: NeedleConfig) -> None:
        self.cfg = cfg
        self.key_offset = cfg.num_filler
        self.value_offset = cfg.num_filler + cfg.num_keys
        self.query_token = cfg.num_filler + cfg.num_keys + cfg.num_values
        self.vocab_size = self.query_token + 1

    def batch(self, split: str, index: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[TASK-2] [TASK-3] Batch `index` of `split`.

        A pure function of its arguments, so resuming at step k replays the data exactly.

        Returns input_ids (B, L) int64 and targets (B, L) int64 with IGNORE_INDEX except the last position.
        """
        check_batch_args(split, index, batch_size, SPLIT_OFFSETS)
        cfg = self.cfg
        g = torch.Generator().manual_seed((seed * 7_919_993 + SPLIT_OFFSETS[split] + index * 104_729) % 2**63)
        B, L, n = batch_size, cfg.seq_len, cfg.n_needles
        H = L - 2  # haystack length (the last two tokens are QUERY, key)
        x = torch.randint(0, cfg.num_filler, (B, L), generator=g)  # (B, L)
        keys = torch.rand(B, cfg.num_keys, generator=g).argsort(dim=1)[:, :n] + self.key_offset  # (B, n) distinct
        values = torch.randint(0, cfg.num_values, (B, n), generator=g) + self.value_offset  # (B, n)
        # n non-overlapping 2-token slots in [0, H): sorted distinct draws from H - n, then shift the i-th by i.
        slots = torch.rand(B, H - n, generator=g).argsort(dim=1)[:, :n].sort(dim=1).values
        starts = slots + torch.arange(n)  # (B, n), consecutive starts differ by >= 2
        rows = torch.arange(B).unsqueeze(1)
        x[rows, starts] = keys
        x[rows, starts + 1] = values
        which = torch.randint(0, n, (B,), generator=g)
        x[:, L - 2] = self.query_token
        x[:, L - 1] = keys[torch.arange(B), which]
        targets = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        targets[:, L - 1] = values[torch.arange(B), which]
        return x, targets
