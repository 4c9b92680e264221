"""SmolLM-Corpus mixture from LOCAL files: cosmopedia-v2, fineweb-edu-dedup and python-edu, mixed 40/50/10
(the Atlas-MAG seed's weights), streamed through Hugging Face `datasets` and packed into fixed-length windows.
Spec: specs/atlas_mag.md ([MAG-13]).

Each subset is a stream of documents (local .jsonl/.json, .parquet or .txt files, read with
`load_dataset(fmt, data_files=…, streaming=True)`), tokenized, joined with EOS and cut into consecutive windows
of seq_len + 1 tokens; the stream restarts at its end (epochs). The first `val_sequences` windows of every
subset are the validation split; training starts after them. Which subset feeds a batch row is fixed by a
seeded, period-exact schedule (every period of 1000 slots holds exactly round(1000·w_s) slots of subset s, in a
seeded random order), so the n-th row of the run maps to a known window of a known subset: `batch` is a pure
function of (split, index, batch_size, seed) and resuming is exact. Reading is sequential; a resumed run
re-reads (and skips) what came before its checkpoint once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reference.validation import ConfigError
from training.config import require
from training.tasks import check_batch_args
from training.tokenizer import load_tokenizer

__all__ = ["SUBSETS", "SmolLMConfig", "SmolLMTask"]

SUBSETS = ("cosmopedia", "fineweb_edu", "python_edu")
FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
PERIOD = 1000
ROOT = Path(__file__).resolve().parents[2]


def resolve_local(name: str, key: str) -> Path:
    """A local file, as given or relative to the repository root; a hub name or a missing file fails at once."""
    for candidate in (Path(name), ROOT / name):
        if candidate.is_file():
            return candidate
    hub_like = re.fullmatch(r"[\w.-]+/[\w.-]+", name) and Path(name).suffix.lower() not in FORMATS
    if name.startswith(("hf://", "http://", "https://")) or hub_like:
        raise ConfigError(f"task.{key}: {name!r} looks like a dataset-hub name; there is no network here, so "
                          f"download the SmolLM-Corpus shards elsewhere and list their local paths "
                          f"(.jsonl, .parquet or .txt)")
    raise ConfigError(f"task.{key}: {name!r} is not a local file (tried it as given and under {ROOT})")


@dataclass(frozen=True)
class SmolLMConfig:
    cosmopedia: tuple[str, ...] = ()  # local files of cosmopedia-v2
    fineweb_edu: tuple[str, ...] = ()  # local files of fineweb-edu-dedup
    python_edu: tuple[str, ...] = ()  # local files of python-edu(-cleaned)
    weights: tuple[float, float, float] = (0.4, 0.5, 0.1)
    text_fields: tuple[str, str, str] = ("text", "text", "text")
    seq_len: int = 2048
    tokenizer: str = "byte"
    val_sequences: int = 64
    shuffle_buffer: int = 0  # >0: datasets' seeded streaming shuffle with this buffer

    def __post_init__(self) -> None:
        require(self.seq_len >= 1, "seq_len", self.seq_len, "an integer >= 1")
        require(self.val_sequences >= 1, "val_sequences", self.val_sequences, "an integer >= 1")
        require(self.shuffle_buffer >= 0, "shuffle_buffer", self.shuffle_buffer, "an integer >= 0")
        require(all(w >= 0 for w in self.weights) and sum(self.weights) > 0, "weights", self.weights,
                "three non-negative numbers (cosmopedia, fineweb_edu, python_edu) with a positive sum")
        for key, w in zip(SUBSETS, self.weights, strict=True):
            files: tuple[str, ...] = getattr(self, key)
            require(w == 0 or len(files) >= 1, key, files, "at least one local file (its weight is > 0)")
            for f in files:
                resolve_local(f, key)
                require(Path(f).suffix.lower() in FORMATS, key, f, f"files ending in {', '.join(sorted(FORMATS))}")


class PackedStream:
    """Consecutive windows of `length` tokens from one subset's document stream, restarted at its end."""

    def __init__(self, files: tuple[str, ...], key: str, text_field: str, length: int, tokenizer: str,
                 shuffle_buffer: int, seed: int) -> None:
        self.paths = [str(resolve_local(f, key)) for f in files]
        self.key, self.text_field, self.length = key, text_field, length
        self.tokenizer = load_tokenizer(tokenizer)
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.restart()

    def documents(self) -> Iterator[str]:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        import datasets

        datasets.disable_progress_bars()
        for path in self.paths:
            fmt = FORMATS[Path(path).suffix.lower()]
            ds: Any = datasets.load_dataset(fmt, data_files=[path], split="train", streaming=True)
            if self.shuffle_buffer > 0:
                ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            field = "text" if fmt == "text" else self.text_field
            for record in ds:
                if field not in record:
                    raise ConfigError(f"task.text_fields: {path} has no field {field!r}; it has {sorted(record)}")
                yield str(record[field])

    def restart(self) -> None:
        self.docs = self.documents()
        self.buffer: list[int] = []
        self.position = 0  # index of the next window
        self.epoch_tokens = 0

    def _fill(self) -> None:
        while len(self.buffer) < self.length:
            text = next(self.docs, None)
            if text is None:  # end of the stream: start the next epoch (same order, so windows stay fixed)
                if self.epoch_tokens == 0:
                    raise ConfigError(f"task.{self.key}: the files {self.paths} hold no text")
                self.docs, self.epoch_tokens = self.documents(), 0
                continue
            if text:
                ids = [*self.tokenizer.encode(text), self.tokenizer.eos_id]
                self.buffer.extend(ids)
                self.epoch_tokens += len(ids)

    def window(self, n: int) -> list[int]:
        """The n-th window (0-based) of the stream."""
        if n < self.position:
            self.restart()
        while True:
            self._fill()
            chunk, self.buffer = self.buffer[:self.length], self.buffer[self.length:]
            self.position += 1
            if self.position - 1 == n:
                return chunk


class SmolLMTask:
    """[MAG-13] Next-token prediction on the packed SmolLM-Corpus mixture."""

    def __init__(self, cfg: SmolLMConfig) -> None:
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.vocab_size = self.tokenizer.vocab_size
        total = sum(cfg.weights)
        counts = [round(PERIOD * w / total) for w in cfg.weights]
        counts[max(range(3), key=lambda s: counts[s])] += PERIOD - sum(counts)  # exact period of PERIOD slots
        self.counts = counts
        self.streams: dict[tuple[str, int], PackedStream] = {}

    def stream(self, subset: int, split: str, seed: int) -> PackedStream:
        key = (f"{split}:{subset}", seed)
        if key not in self.streams:
            name = SUBSETS[subset]
            self.streams[key] = PackedStream(getattr(self.cfg, name), name, self.cfg.text_fields[subset],
                                             self.cfg.seq_len + 1, self.cfg.tokenizer, self.cfg.shuffle_buffer, seed)
        return self.streams[key]

    def pattern(self, period: int, seed: int) -> list[int]:
        """The seeded order of subsets within one period of PERIOD slots."""
        base = torch.tensor([s for s in range(3) for _ in range(self.counts[s])])
        g = torch.Generator().manual_seed((seed * 1_000_003 + period * 7919) % 2**63)
        return base[torch.randperm(PERIOD, generator=g)].tolist()

    def slot(self, j: int, seed: int) -> tuple[int, int]:
        """(subset, its window number) for global slot j: the mixture schedule."""
        period, offset = divmod(j, PERIOD)
        pattern = self.pattern(period, seed)
        subset = pattern[offset]
        return subset, period * self.counts[subset] + pattern[:offset].count(subset)

    def batch(self, split: str, index: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        check_batch_args(split, index, batch_size, ("train", "val", "test"))
        rows = []
        for r in range(batch_size):
            subset, n = self.slot(index * batch_size + r, seed)
            if split == "train":
                rows.append(self.stream(subset, "train", seed).window(self.cfg.val_sequences + n))
            else:
                rows.append(self.stream(subset, "val", seed).window(n % self.cfg.val_sequences))
        window = torch.tensor(rows, dtype=torch.long)  # (B, L + 1)
        return window[:, :-1].clone(), window[:, 1:].clone()
