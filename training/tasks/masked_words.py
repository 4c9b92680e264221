"""Masked-word prediction on a local text file with the byte tokenizer (spec: `specs/titans.md`, [TITANS-23]).

A window of `seq_len` bytes is drawn at a seeded offset; `mask_words` whole words in it (maximal runs of ASCII
letters, at least `min_word_len` long, entirely inside the window) have every byte replaced by MASK; the targets
are the original bytes at those positions (IGNORE_INDEX elsewhere). "To be or [MASK] to be" becomes
"To be or ▮▮▮ to be" with targets "not" at the three MASK positions. The file is read on first use, so a config
naming a corpus that is not on this machine still loads (training then fails with a clear message).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from training.config import require
from training.tasks import check_batch_args, check_split
from training.tasks.needle import IGNORE_INDEX
from training.tasks.text import load_tokens
from training.tokenizer import ByteTokenizer

SPLIT_OFFSETS = {"train": 0, "val": 1_000_003, "test": 2_000_006}
MAX_TRIES = 16  # windows redrawn (deterministically) until one holds a word


@dataclass(frozen=True)
class MaskedWordsConfig:
    """The seed's language task (Shakespeare / Dumas); `file` is a local .txt (or .jsonl/.parquet) file."""

    file: str
    seq_len: int = 128
    mask_words: int = 1
    min_word_len: int = 2
    val_fraction: float = 0.1
    text_field: str = "text"

    def __post_init__(self) -> None:
        require(bool(self.file), "file", self.file, "a local text file path")
        require(self.seq_len >= 2, "seq_len", self.seq_len, "an integer >= 2")
        require(self.mask_words >= 1, "mask_words", self.mask_words, "an integer >= 1")
        require(self.min_word_len >= 1, "min_word_len", self.min_word_len, "an integer >= 1")
        require(self.seq_len >= self.min_word_len, "seq_len", self.seq_len,
                f"at least min_word_len = {self.min_word_len}")
        require(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "a number in (0, 1)")


def _is_letter(token: int) -> bool:
    return 65 <= token <= 90 or 97 <= token <= 122


def word_spans(tokens: list[int], min_len: int) -> list[tuple[int, int]]:
    """[TITANS-23] (start, end) of every maximal run of ASCII letters of length >= min_len; a run touching either
    edge of the window may be cut, so it is skipped."""
    spans: list[tuple[int, int]] = []
    start = None
    for i, t in enumerate([*tokens, -1]):
        if i < len(tokens) and _is_letter(t):
            start = i if start is None else start
        elif start is not None:
            if i - start >= min_len and start > 0 and i < len(tokens):
                spans.append((start, i))
            start = None
    return spans


def exact_word_accuracy(predictions: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """(words predicted exactly, words) where a word is a maximal run of counted targets in a row; predictions
    and targets (B, L). The seed's `masked_word_accuracy` is their ratio."""
    correct = total = 0
    for pred_row, target_row in zip(predictions.tolist(), targets.tolist(), strict=True):
        ok, inside = True, False
        for p, t in zip(pred_row, target_row, strict=True):
            if t != IGNORE_INDEX:
                ok = (ok if inside else True) and p == t
                inside = True
            elif inside:
                correct, total, inside = correct + ok, total + 1, False
        if inside:
            correct, total = correct + ok, total + 1
    return correct, total


class MaskedWordsTask:
    """[TITANS-23] Windows of `seq_len` bytes with whole words masked; targets only at the masked bytes."""

    def __init__(self, cfg: MaskedWordsConfig) -> None:
        self.cfg = cfg
        self.tokenizer = ByteTokenizer()
        self.vocab_size = self.tokenizer.vocab_size
        self.mask_id = self.tokenizer.mask_id

    @cached_property
    def tokens(self) -> torch.Tensor:
        return load_tokens(self.cfg.file, "byte", self.cfg.text_field)

    def split_tokens(self, split: str) -> torch.Tensor:
        check_split(split, SPLIT_OFFSETS)
        cut = len(self.tokens) - int(len(self.tokens) * self.cfg.val_fraction)
        part = self.tokens[:cut] if split == "train" else self.tokens[cut:]
        if len(part) <= self.cfg.seq_len:
            raise ValueError(f"task.file: the {split} part of {self.cfg.file} holds {len(part)} bytes, fewer than "
                             f"seq_len + 1 = {self.cfg.seq_len + 1}; use a longer file or a shorter seq_len")
        return part

    def batch(self, split: str, index: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `index` of `split`, a pure function of its arguments; input_ids and targets (B, seq_len)."""
        check_batch_args(split, index, batch_size, SPLIT_OFFSETS)
        tokens = self.split_tokens(split)
        L = self.cfg.seq_len
        g = torch.Generator().manual_seed((seed * 7_919_993 + SPLIT_OFFSETS[split] + index * 104_729) % 2**63)
        xs, ys = [], []
        for _ in range(batch_size):
            for _ in range(MAX_TRIES):
                start = int(torch.randint(0, len(tokens) - L, (1,), generator=g))
                window = tokens[start:start + L].tolist()
                spans = word_spans(window, self.cfg.min_word_len)
                if spans:
                    break
            x = torch.tensor(window, dtype=torch.long)
            y = torch.full((L,), IGNORE_INDEX, dtype=torch.long)
            order = torch.randperm(len(spans), generator=g)[: self.cfg.mask_words].tolist() if spans else []
            for j in order:
                a, b = spans[j]
                y[a:b] = x[a:b]
                x[a:b] = self.mask_id
            xs.append(x)
            ys.append(y)
        return torch.stack(xs), torch.stack(ys)
