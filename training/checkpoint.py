"""Atomic checkpoints: write to a temporary file in the same folder, fsync, then rename over the target.

A crash mid-write leaves the previous checkpoint intact. Loading uses `torch.load(weights_only=True)`, so a
checkpoint can hold tensors and plain containers only (no pickled code).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from reference.validation import ConfigError

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "memarch-checkpoint-v1"


def config_hash(config: dict[str, Any]) -> str:
    """A stable hash of a plain config dict (sorted-key JSON), stored in every checkpoint."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


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
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        raise ConfigError(f"{p}: truncated or corrupt checkpoint ({type(exc).__name__}: {str(exc)[:200]}); "
                          f"delete it to start over, or restore an earlier copy") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"{p}: not a memarch checkpoint (expected format {FORMAT!r})")
    missing = [k for k in ("model", "config", "config_hash", "model_name", "step") if k not in state]
    if missing:
        raise ConfigError(f"{p}: checkpoint lacks {', '.join(missing)}; it is incomplete")
    if config_hash(state["config"]) != state["config_hash"]:
        raise ConfigError(f"{p}: the stored config does not match its hash; the checkpoint is corrupt")
    return state


def load_model_weights(model: torch.nn.Module, state: dict[str, Any], model_name: str) -> None:
    """Load a checkpoint's weights into `model` (either implementation), refusing another model's weights."""
    if state["model_name"] != model_name:
        raise ConfigError(f"checkpoint holds a {state['model_name']!r} model, not {model_name!r}; "
                          f"build the model from the checkpoint's own config")
    result = model.load_state_dict(state["model"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(f"checkpoint weights do not fit this {model_name!r} model: missing "
                          f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")


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
