"""Atomic checkpoints: write to a temporary file in the same folder, fsync, then rename over the target.

A crash mid-write leaves the previous checkpoint intact. Loading uses `torch.load(weights_only=True)`, so a
checkpoint can hold tensors and plain containers only (no pickled code).
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from reference.validation import ConfigError

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically write `state` to `path`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` (weights_only=True, onto the CPU)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"checkpoint not found: {str(p)!r}; start without --resume or point --out at the "
                          f"run folder that holds {CHECKPOINT_NAME}")
    state = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ConfigError(f"{p}: not a memarch checkpoint (top level is {type(state).__name__})")
    return state


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop can touch (torch CPU/CUDA and Python's `random`)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
