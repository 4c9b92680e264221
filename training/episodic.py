"""Episodic storage → retrieval training (the seed's regime; spec: `specs/titans.md`, [TITANS-25]).

One optimizer step per episode: the model stores `storage_batches` unmasked batches in its memory (state carried
across batches), then answers the same batches masked from the frozen memory; the retrieval loss is weighted by
`retrieval_penalty`. Batches are pure functions of (split, step·N + i, seed), so a resumed run continues exactly.

The model must accept `model(input_ids, state, update=...)` and return a mapping with `logits`, `state` and
optional `metrics` (AtlasOmega does). The task is a `MultiTask` (math/language per batch), a `ModularTask` or a
`MaskedWordsTask`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.validation import ConfigError
from training.checkpoint import (
    CHECKPOINT_NAME,
    FORMAT,
    config_hash,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from training.config import ExperimentConfig, require
from training.grokking import circular_fit, detect_phase, fourier_concentration, number_embeddings
from training.registry import Task, build_model, get_task_spec, model_name_of, task_name_of
from training.schedules import lr_factor
from training.tasks.masked_words import MaskedWordsTask, exact_word_accuracy
from training.tasks.modular import ModularTask
from training.tasks.multitask import MultiTask
from training.tasks.needle import IGNORE_INDEX

__all__ = ["EpisodicConfig", "run_episode", "train_episodic"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpisodicConfig:
    """The `episodic:` section of an experiment (the seed: 10 storage batches, 10× retrieval penalty)."""

    storage_batches: int = 10
    retrieval_penalty: float = 10.0
    storage_weight: float = 1.0
    fourier_every: int = 100

    def __post_init__(self) -> None:
        require(self.storage_batches >= 1, "storage_batches", self.storage_batches, "an integer >= 1")
        require(self.retrieval_penalty > 0, "retrieval_penalty", self.retrieval_penalty, "a number > 0")
        require(self.storage_weight >= 0, "storage_weight", self.storage_weight, "a number >= 0")
        require(self.fourier_every >= 1, "fourier_every", self.fourier_every, "an integer >= 1")


def _kind(task: Task, split: str, index: int, seed: int) -> str:
    if isinstance(task, MultiTask):
        return task.kind(split, index, seed)
    if isinstance(task, ModularTask):
        return "math"
    if isinstance(task, MaskedWordsTask):
        return "language"
    raise ConfigError(f"episodic training needs a multitask, modular or masked_words task, got {type(task).__name__}")


def _math_task(task: Task) -> ModularTask | None:
    return task.math if isinstance(task, MultiTask) else task if isinstance(task, ModularTask) else None


def run_episode(model: nn.Module, task: Task, cfg: EpisodicConfig, *, split: str, episode: int, batch_size: int,
                seed: int, device: torch.device) -> tuple[Tensor, dict[str, float]]:
    """[TITANS-25] One storage → retrieval episode: returns the total loss (with its graph) and the metrics."""
    N = cfg.storage_batches
    batches = []
    for i in range(N):
        x, y = task.batch(split, episode * N + i, batch_size, seed)
        batches.append((_kind(task, split, episode * N + i, seed), x.to(device), y.to(device)))
    state = None
    storage_losses: list[Tensor] = []
    extra: dict[str, float] = {}
    for _, x, y in batches:  # STORAGE: unmasked sequences, memory written, state carried
        full = torch.where(y != IGNORE_INDEX, y, x)  # (B, L) the masked positions filled with their answers
        out = model(full, state, update=True)
        state = out["state"]
        logits = out["logits"]
        storage_losses.append(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                              full[:, 1:].reshape(-1)))
    counts = {"math": [0, 0], "language": [0, 0], "all": [0, 0]}
    retrieval_losses: list[Tensor] = []
    for kind, x, y in batches:  # RETRIEVAL: masked sequences, memory frozen at the stored state
        out = model(x, state, update=False)
        logits = out["logits"]
        retrieval_losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                                                ignore_index=IGNORE_INDEX))
        pred = logits.argmax(dim=-1)
        mask = y != IGNORE_INDEX
        right, total = int(((pred == y) & mask).sum()), int(mask.sum())
        counts["all"][0] += right
        counts["all"][1] += total
        if kind == "math":
            counts["math"][0] += right
            counts["math"][1] += total
        else:
            words_right, words = exact_word_accuracy(pred.cpu(), y.cpu())
            counts["language"][0] += words_right
            counts["language"][1] += words
        extra = {k: float(v) for k, v in dict(out.get("metrics") or {}).items()}
    storage = torch.stack(storage_losses).mean()
    retrieval = torch.stack(retrieval_losses).mean()
    loss = cfg.storage_weight * storage + cfg.retrieval_penalty * retrieval
    metrics = {"storage_loss": float(storage.detach()), "retrieval_loss": float(retrieval.detach()), **extra}
    for name, key in (("math_accuracy", "math"), ("masked_word_accuracy", "language"), ("overall_accuracy", "all")):
        right, n = counts[key]
        metrics[name] = right / n if n else float("nan")
    return loss, metrics


def train_episodic(exp: ExperimentConfig, episodic: EpisodicConfig, *, impl: str, device: torch.device,
                   out_dir: str | Path, max_steps: int | None = None, resume: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Train `exp` episodically: `exp.train.steps` episodes, one AdamW step each (LR schedule, clipping,
    `on_step`, seed as in `training.loop.train`). Writes `metrics.jsonl`, `checkpoint.pt` and `summary.json` to
    `out_dir` and returns the summary. `progress` is accepted for signature parity (nothing is printed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tc = exp.train
    torch.manual_seed(tc.seed)
    task = get_task_spec(task_name_of(exp.task)).build(exp.task)
    math_task = _math_task(task)
    model = build_model(exp.model, impl).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, total=tc.steps, warmup=tc.warmup_steps, kind=tc.schedule, min_ratio=tc.min_lr_ratio))
    ckpt_path, metrics_path = out / CHECKPOINT_NAME, out / "metrics.jsonl"
    config = exp.as_dict()  # what generate.py / evaluate.py rebuild the model from
    episodic_dict = {k: getattr(episodic, k) for k in episodic.__dataclass_fields__}
    step = 0
    if resume:
        state = load_checkpoint(ckpt_path)
        if state.get("config") != config or state.get("episodic") != episodic_dict:
            raise ConfigError(f"--resume: the config differs from the one {ckpt_path} was trained with")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step = int(state["step"])
    elif metrics_path.exists():
        metrics_path.unlink()
    stop_at = tc.steps if max_steps is None else min(tc.steps, max_steps)
    t0 = time.perf_counter()
    first: float | None = None
    record: dict[str, Any] = {}
    previous_fourier: float | None = None
    model.train()
    with metrics_path.open("a") as metrics_file:
        while step < stop_at:
            on_step = getattr(model, "on_step", None)
            if callable(on_step):
                on_step(step, tc.steps)
            optimizer.zero_grad(set_to_none=True)
            loss, metrics = run_episode(model, task, episodic, split="train", episode=step,
                                        batch_size=tc.batch_size, seed=tc.seed, device=device)
            value = float(loss.detach())
            skipped = not math.isfinite(value)
            if not skipped:
                loss.backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf")))
                skipped = not math.isfinite(grad_norm)
            if skipped:
                optimizer.zero_grad(set_to_none=True)
                log.warning("episode %d: non-finite loss or gradient; step skipped", step)
            else:
                optimizer.step()
            scheduler.step()
            step += 1
            first = value if first is None else first
            record = {"step": step, "loss": value, "lr": optimizer.param_groups[0]["lr"], "skipped": skipped,
                      **metrics}
            if math_task is not None and (step % episodic.fourier_every == 0 or step == stop_at):
                emb = number_embeddings(model, math_task)
                fourier = fourier_concentration(emb)
                record.update(fourier_concentration=fourier, circular_fit=circular_fit(emb),
                              grokking_phase=detect_phase(fourier, metrics["math_accuracy"]
                                                          if math.isfinite(metrics["math_accuracy"]) else 0.0,
                                                          previous_fourier))
                previous_fourier = fourier
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if step % tc.checkpoint_every == 0 or step == stop_at:
                save_checkpoint(ckpt_path, {
                    "format": FORMAT, "model_name": model_name_of(exp.model), "config_hash": config_hash(config),
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rng_state(), "step": step, "skipped_steps": 0,
                    "config": config, "episodic": episodic_dict, "impl": impl})
    summary: dict[str, Any] = {"status": "completed" if stop_at == tc.steps else "stopped at --max-steps",
                               "steps": step, "first_loss": first, "final_loss": record.get("loss"),
                               **{k: v for k, v in record.items() if k not in ("step", "loss")},
                               "wall_time_s": time.perf_counter() - t0, "config": config, "episodic": episodic_dict,
                               "source": exp.source}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
