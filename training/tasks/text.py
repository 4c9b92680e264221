"""Next-token language modelling on local text corpora (.txt, .jsonl/.json, .parquet) through Hugging Face
`datasets`. Documents are tokenized once, joined with EOS, and windows of `seq_len + 1` tokens are drawn at
seeded offsets; several files mix with `weights`. The corpus must fit in memory (fine for the fixture
corpora and for Shakespeare/Dumas-sized texts); see specs/tasks.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from reference.validation import ConfigError
from training.config import require
from training.tasks import check_batch_args
from training.tokenizer import load_tokenizer

FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SPLIT_OFFSETS = {"train": 0, "val": 1_000_003, "test": 2_000_006}


@dataclass(frozen=True)
class TextConfig:
    files: tuple[str, ...] = ()
    seq_len: int = 256
    tokenizer: str = "byte"
    weights: tuple[float, ...] = ()
    text_field: str = "text"
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        require(len(self.files) >= 1, "files", self.files, "a list of at least one local text/jsonl/parquet file")
        require(self.seq_len >= 1, "seq_len", self.seq_len, "an integer >= 1")
        require(not self.weights or len(self.weights) == len(self.files), "weights", self.weights,
                f"empty or one weight per file ({len(self.files)})")
        require(all(w >= 0 for w in self.weights) and (not self.weights or sum(self.weights) > 0), "weights",
                self.weights, "non-negative numbers with a positive sum")
        require(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "a number in (0, 1)")
        for f in self.files:
            suffix = Path(f).suffix.lower()
            require(suffix in FORMATS, "files", f, f"a file ending in one of {', '.join(sorted(FORMATS))}")


def resolve_path(name: str) -> Path:
    """A local path, tried as given and relative to the repository root; anything else is a clear error."""
    for candidate in (Path(name), Path(__file__).resolve().parents[2] / name):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"task.files: {name!r} is not a local file; there is no dataset-hub access here, so download "
                      f"the corpus elsewhere and pass its local path (.txt, .jsonl or .parquet)")


@lru_cache(maxsize=16)
def load_tokens(path: str, tokenizer: str, text_field: str) -> torch.Tensor:
    """[TASK-4] Tokenize a whole local file: documents (lines for .txt, records for json/parquet) joined by EOS."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    p = resolve_path(path)
    fmt = FORMATS[p.suffix.lower()]
    ds = datasets.load_dataset(fmt, data_files=[str(p)], split="train")
    field = "text" if fmt == "text" else text_field
    if field not in ds.column_names:
        raise ConfigError(f"task.text_field: {p} has no column {field!r}; its columns are {ds.column_names}")
    tok = load_tokenizer(tokenizer)
    ids: list[int] = []
    for record in ds:
        text = str(record[field])
        if text:
            ids.extend(tok.encode(text))
            ids.append(tok.eos_id)
    return torch.tensor(ids, dtype=torch.long)


class TextTask:
    """[TASK-5] Windows of `seq_len` tokens; targets are the inputs shifted by one (next-token prediction)."""

    def __init__(self, cfg: TextConfig) -> None:
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.vocab_size = self.tokenizer.vocab_size
        self.sources = [load_tokens(f, cfg.tokenizer, cfg.text_field) for f in cfg.files]
        for name, tokens in zip(cfg.files, self.sources, strict=True):
            val = int(len(tokens) * cfg.val_fraction)
            if min(val, len(tokens) - val) < cfg.seq_len + 1:
                raise ConfigError(
                    f"task.seq_len: {name} holds {len(tokens)} tokens, too few for windows of {cfg.seq_len + 1} in "
                    f"both its train part and its val part ({cfg.val_fraction:.0%}); use a shorter seq_len")
        weights = cfg.weights or tuple(1.0 for _ in cfg.files)
        self.weights = torch.tensor(weights, dtype=torch.float64)

    def split_tokens(self, source: int, split: str) -> torch.Tensor:
        tokens = self.sources[source]
        cut = len(tokens) - int(len(tokens) * self.cfg.val_fraction)
        return tokens[:cut] if split == "train" else tokens[cut:]

    def batch(self, split: str, index: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        check_batch_args(split, index, batch_size, SPLIT_OFFSETS)
        split_key = "train" if split == "train" else "val"
        g = torch.Generator().manual_seed((seed * 7_919_993 + SPLIT_OFFSETS[split] + index * 104_729) % 2**63)
        which = torch.multinomial(self.weights, batch_size, replacement=True, generator=g)
        L = self.cfg.seq_len
        rows = []
        for source in which.tolist():
            tokens = self.split_tokens(source, split_key)
            start = int(torch.randint(0, len(tokens) - L, (1,), generator=g))
            rows.append(tokens[start : start + L + 1])
        window = torch.stack(rows)  # (B, L + 1)
        return window[:, :-1].clone(), window[:, 1:].clone()
