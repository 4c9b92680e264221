"""Synthetic tasks, generated in-process from a seed (no files, no network)."""

from __future__ import annotations

from collections.abc import Iterable

from reference.validation import ConfigError


def check_split(split: str, splits: Iterable[str]) -> None:
    """Raise ConfigError unless `split` is one of `splits`."""
    allowed = list(splits)
    if split not in allowed:
        raise ConfigError(f"split must be one of {', '.join(allowed)}, got {split!r}")


def check_batch_args(split: str, index: int, batch_size: int, splits: Iterable[str]) -> None:
    """The arguments every `Task.batch(split, index, batch_size, seed)` takes, checked once per call."""
    check_split(split, splits)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ConfigError(f"index must be an int >= 0 (the batch number), got {index!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
