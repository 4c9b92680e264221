"""The training loop shared by every model and both implementations.

Data batches are pure functions of (split, step, seed), schedules pure functions of the step, and every
RNG state is checkpointed, so `--resume` continues bit-identically on CPU. See specs/training.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from reference.validation import ConfigError, MemarchError
from training.checkpoint import (
    CHECKPOINT_NAME,
    FORMAT,
    config_hash,
    load_checkpoint,
    load_model_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from training.config import ExperimentConfig
from training.distributed import (
    SINGLE,
    DistInfo,
    any_rank,
    barrier,
    full_state,
    global_count,
    load_full_state,
    shard_rows,
    unwrap,
    wrap_model,
)
from training.probes import run_probes
from training.registry import Task, build_model, get_task_spec, model_name_of, task_name_of
from training.schedules import lr_factor
from training.tasks.needle import IGNORE_INDEX

DTYPES = {"float32": torch.float32, "float64": torch.float64}

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"


class TrainingError(MemarchError, RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite steps)."""


def split_output(out: Any) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """A model returns logits (B, L, V), or a mapping with `logits`, optional `aux_loss` and `metrics`."""
    if isinstance(out, torch.Tensor):
        return out, None, {}
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        aux = out.get("aux_loss")
        metrics = {k: float(v) for k, v in dict(out.get("metrics") or {}).items()}
        return out["logits"], aux if isinstance(aux, torch.Tensor) else None, metrics
    raise TypeError(f"model output must be a logits tensor or a mapping with 'logits', got {type(out).__name__}")


def loss_and_accuracy(logits: torch.Tensor, targets: torch.Tensor,
                      kind: str = "cross_entropy") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy (or StableMax cross-entropy, `kind="stablemax"`) and accuracy over positions whose
    target is not IGNORE_INDEX."""
    if kind != "cross_entropy":
        from training.optim import task_loss

        return task_loss(logits, targets, kind)
    V = logits.shape[-1]
    flat_logits = logits.reshape(-1, V)
    if flat_logits.dtype in (torch.float16, torch.bfloat16):
        flat_logits = flat_logits.float()  # the loss in at least fp32; float64 stays float64
    flat_targets = targets.reshape(-1)
    loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX)
    mask = flat_targets != IGNORE_INDEX
    correct = (flat_logits.argmax(dim=-1) == flat_targets) & mask
    accuracy = correct.sum().float() / mask.sum().clamp_min(1).float()
    return loss, accuracy


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, exp: ExperimentConfig, device: torch.device,
             split: str = "val") -> dict[str, float]:
    """Mean loss and accuracy over `train.eval_batches` fixed batches of `split`."""
    was_training = model.training
    model.eval()
    bs = exp.train.eval_batch_size or exp.train.batch_size
    losses, accs = [], []
    for i in range(exp.train.eval_batches):
        x, y = task.batch(split, i, bs, exp.train.seed)
        logits, _, _ = split_output(model(x.to(device)))
        loss, acc = loss_and_accuracy(logits, y.to(device), exp.train.loss)
        losses.append(float(loss))
        accs.append(float(acc))
    model.train(was_training)
    return {f"{split}_loss": sum(losses) / len(losses), f"{split}_accuracy": sum(accs) / len(accs)}


def detach_state(model: nn.Module, state: Any) -> Any:
    """Cut the gradient at a TBPTT segment boundary: `model.detach_state` if defined, else detach every tensor."""
    custom = getattr(model, "detach_state", None)
    if callable(custom):
        return custom(state)
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, Mapping):
        return {k: detach_state(model, v) for k, v in state.items()}
    if isinstance(state, (tuple, list)):
        return type(state)(detach_state(model, v) for v in state)
    return state


Segment = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, float], float]


def segment_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, length: int,
                   loss_kind: str = "cross_entropy") -> Iterator[Segment]:
    """[SCHED-2] Truncated BPTT: yield (loss, accuracy, aux, metrics, weight) per segment of `length` tokens.

    The model's recurrent state is carried from segment to segment with its gradient cut; `weight` is the
    segment's share of the batch's scored targets, so the weighted sum of segment losses is the full loss.
    A segment with no scored targets has weight 0 (its mean loss is undefined and is not used). The auxiliary
    loss is yielded already weighted by the segment's share of the sequence length, so the segment auxiliary
    losses sum to the full sequence's (token-mean) auxiliary loss.
    """
    total = int((y != IGNORE_INDEX).sum().clamp_min(1))
    state: Any = None
    for start in range(0, x.shape[1], length):
        xs, ys = x[:, start : start + length], y[:, start : start + length]
        out = model(xs, state=state, return_state=True)
        if not (isinstance(out, Mapping) and "state" in out):
            raise ConfigError("train.tbptt_length > 0 needs a model whose forward(input_ids, state=None, "
                              "return_state=True) returns a dict with 'state'; this model does not")
        state = detach_state(model, out["state"])
        logits, aux, extra = split_output(out)
        loss, acc = loss_and_accuracy(logits, ys, loss_kind)
        if aux is not None:
            aux = aux * (xs.shape[1] / x.shape[1])
        yield loss, acc, aux, extra, int((ys != IGNORE_INDEX).sum()) / total


def compile_model(model: nn.Module, mode: str) -> Callable[..., Any]:
    """`model` itself for mode "none", else `torch.compile(model)` in that mode ("default": torch's default)."""
    if mode == "none":
        return model
    return torch.compile(model, mode=None if mode == "default" else mode)


def forward_backward(model: nn.Module, task: Task, exp: ExperimentConfig, step: int, device: torch.device,
                     info: DistInfo = SINGLE, forward: Callable[[torch.Tensor], Any] | None = None
                     ) -> tuple[float, float, float, dict[str, float], bool]:
    """Accumulate gradients over `train.grad_accum_steps` micro-batches (batch indices step·k … step·k + k − 1),
    each split into truncated-BPTT segments when `train.tbptt_length` > 0.

    Under torch.distributed each rank takes its slice of every global batch and scales its loss by
    (its scored targets × world size / all scored targets), so the averaged gradient is the global-batch mean;
    gradient sync is skipped on all but the last micro-batch. Returns the global mean total loss, task loss and
    accuracy, the model's extra metrics (this rank, last segment), and whether any rank saw a non-finite loss
    (then no rank back-propagates it). `forward` (default: `model`) runs the whole-sequence forward pass: the
    compiled model under `train.compile`; truncated-BPTT segments always call `model`.
    """
    tc = exp.train
    k = tc.grad_accum_steps
    sums = torch.zeros(3, dtype=torch.float64)  # total, task loss, accuracy (weighted, this rank)
    extra: dict[str, float] = {}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.autocast == "bf16")
    for j in range(k):
        x, y = task.batch("train", step * k + j, tc.batch_size, tc.seed)
        x, y = shard_rows(x, info).to(device), shard_rows(y, info).to(device)
        local = int((y != IGNORE_INDEX).sum())
        scale = local * info.world_size / max(1, global_count(local, info, device))
        with sync_context(model, info, sync=j == k - 1), autocast:
            if tc.tbptt_length > 0:
                parts = segment_losses(model, x, y, tc.tbptt_length, tc.loss)
            else:
                logits, aux0, extra0 = split_output((model if forward is None else forward)(x))
                loss0, acc0 = loss_and_accuracy(logits, y, tc.loss)
                parts = iter([(loss0, acc0, aux0, extra0, 1.0)])
            for loss, acc, aux, extra, weight in parts:
                if weight == 0 and aux is None:
                    continue
                # aux arrives weighted (whole sequence: weight 1); a segment without scored targets has an
                # undefined (NaN) mean loss and weight 0, so only its auxiliary loss is used
                task_part = loss * weight if weight > 0 else loss.new_zeros(())
                total = (task_part + (aux if aux is not None else 0)) * scale
                if any_rank(not math.isfinite(float(total.detach())), info, device):
                    return float("nan"), float("nan"), float(acc), extra, True
                (total / k).backward()
                if weight > 0:
                    sums += torch.tensor([0.0, float(loss.detach()) * weight * scale,
                                          float(acc) * weight * scale], dtype=torch.float64) / k
                sums[0] += float(total.detach()) / k
    mean = all_mean(sums, info, device)
    return float(mean[0]), float(mean[1]), float(mean[2]), extra, False


@contextmanager
def sync_context(model: nn.Module, info: DistInfo, *, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-batches (DDP `no_sync`, FSDP2 requires_gradient_sync)."""
    if sync or not info.enabled:
        yield
        return
    if info.fsdp:
        set_sync = cast(Any, model).set_requires_gradient_sync
        set_sync(False)
        try:
            yield
        finally:
            set_sync(True)
        return
    with cast(Any, model).no_sync():
        yield


def all_mean(values: torch.Tensor, info: DistInfo, device: torch.device) -> torch.Tensor:
    """Mean of a small float64 vector over ranks (one all-reduce)."""
    if not info.enabled:
        return values
    t = values.to(device)
    torch.distributed.all_reduce(t)
    return (t / info.world_size).cpu()


class _StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum


@contextmanager
def _catch_signals(flag: _StopFlag) -> Iterator[None]:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and exits cleanly."""
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, flag)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only metric records up to `step` (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a hard kill
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def atomic_write_text(path: Path, text: str) -> None:
    """Write-then-rename, so a kill during the write leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _resumed_losses(path: Path) -> tuple[float | None, dict[str, float]]:
    """The first logged loss and the last record's loss/accuracy of a resumed run (for its summary)."""
    if not path.exists():
        return None, {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if "loss" in r]
    if not records:
        return None, {}
    return records[0]["loss"], {k: records[-1][k] for k in ("loss", "accuracy") if k in records[-1]}


def train(exp: ExperimentConfig, *, impl: str, device: torch.device, out_dir: str | Path,
          max_steps: int | None = None, resume: bool = False, progress: bool = True,
          dist: DistInfo = SINGLE) -> dict[str, Any]:
    """Train `exp` and return the summary (also written to `out_dir/summary.json`).

    `max_steps` stops early (at that global step) without changing the schedule; `resume` continues from
    `out_dir/checkpoint.pt`. Under torch.distributed (`dist`), rank 0 alone logs, shows progress and writes
    files; checkpoints hold the gathered single-process state.
    """
    if max_steps is not None and max_steps < 0:
        raise ConfigError(f"--max-steps must be >= 0, got {max_steps}")
    if exp.episodic is not None:
        if dist.enabled:
            raise ConfigError("episodic training runs in one process; launch it without torchrun")
        if exp.train.compile != "none":
            raise ConfigError(f"train.compile: {exp.train.compile} applies to the standard trainer; episodic "
                              "training runs eager (set train.compile: none)")
        from training.episodic import train_episodic

        return train_episodic(exp, exp.episodic, impl=impl, device=device, out_dir=out_dir, max_steps=max_steps,
                              resume=resume, progress=progress)
    main = dist.is_main
    out = Path(out_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = out / CHECKPOINT_NAME, out / METRICS_NAME
    tc = exp.train
    torch.manual_seed(tc.seed)
    task = get_task_spec(task_name_of(exp.task)).build(exp.task)
    core = build_model(exp.model, impl).to(device=device, dtype=DTYPES[tc.dtype])
    config_dict = exp.as_dict()
    state: dict[str, Any] | None = None
    if resume:
        state = load_checkpoint(ckpt_path)
        if state.get("config") != config_dict:
            raise ConfigError(f"--resume: the config differs from the one {ckpt_path} was trained with; "
                              f"resume with the same config (saved: {state.get('config')})")
        load_model_weights(core, state, model_name_of(exp.model))
    model = wrap_model(core, dist, device)
    # the training forward compiled (evaluation, TBPTT segments and checkpoints use `model` itself); graphs: mark
    # each step's start, so the CUDA-graph replay may reuse the last step's (dead) outputs
    forward = compile_model(model, tc.compile)
    graphs = tc.compile == "reduce-overhead"
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)

    def factor(step: int) -> float:
        return lr_factor(step, total=tc.steps, warmup=tc.warmup_steps, kind=tc.schedule, min_ratio=tc.min_lr_ratio)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    start, skipped, elapsed_before = 0, 0, 0.0
    if state is not None:
        load_full_state(model, optimizer, state["model"], state["optimizer"], dist)
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start, skipped = int(state["step"]), int(state["skipped_steps"])
        elapsed_before = float(state.get("wall_time_s", 0.0))
        if main:
            _truncate_metrics(metrics_path, start)
        log.info("resumed from %s at step %d", ckpt_path, start)
    elif main and metrics_path.exists():
        metrics_path.unlink()
    stop_at = tc.steps if max_steps is None else min(tc.steps, max_steps)

    def checkpoint(step: int) -> None:
        model_state, optim_state = full_state(model, optimizer, dist)
        if main:
            save_checkpoint(ckpt_path, {
                "format": FORMAT, "model_name": model_name_of(exp.model), "config_hash": config_hash(config_dict),
                "model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                "rng": rng_state(), "step": step, "skipped_steps": skipped, "config": config_dict,
                "impl": impl, "wall_time_s": elapsed_before + time.perf_counter() - t0,
                "world_size": dist.world_size,
            })
        barrier(dist)

    flag = _StopFlag()
    t0 = time.perf_counter()
    model.train()
    step, consecutive_bad = start, 0
    first_loss: float | None = None
    last: dict[str, float] = {}
    if start > 0 and main:
        first_loss, last = _resumed_losses(metrics_path)
    evals: dict[str, float] = {}
    status = "completed"
    interactive = sys.stderr.isatty()
    bar = tqdm(total=stop_at, initial=start, disable=not (progress and main),
               desc=f"{model_name_of(exp.model)}[{impl}]", dynamic_ncols=True,
               mininterval=0.1 if interactive else 30.0)
    metrics_file = metrics_path.open("a") if main else None
    on_step = getattr(core, "on_step", None)
    if callable(on_step) and start > 0:  # a resumed model gets the schedule state of its last step back
        on_step(start - 1, tc.steps)
    probe_x, _ = task.batch("train", 0, 1, tc.seed)
    tokens_per_step = probe_x[0].numel() * tc.batch_size * tc.grad_accum_steps  # input tokens, whole batch
    train_time, timed_steps = 0.0, 0  # training steps only (no evaluation, checkpoints, logging)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with _catch_signals(flag):
        while step < stop_at:
            t_step = time.perf_counter()
            on_step = getattr(core, "on_step", None)
            if callable(on_step):  # schedules inside the model (gate floors, λ(t), mem_scale, …)
                on_step(step, tc.steps)
            optimizer.zero_grad(set_to_none=True)
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            total, loss, acc, extra, bad = forward_backward(model, task, exp, step, device, dist, forward)
            grad_norm = float("nan")
            if not bad:
                if tc.perp_grad:
                    from training.optim import apply_perp_grad_

                    apply_perp_grad_(model.parameters(), min_dim=tc.perp_grad_min_dim)
                max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
                bad = not math.isfinite(grad_norm)
            if bad:
                skipped += 1
                consecutive_bad += 1
                optimizer.zero_grad(set_to_none=True)
                log.warning("step %d: non-finite loss or gradient; step skipped (%d in a row)",
                            step, consecutive_bad)
                if consecutive_bad >= tc.max_bad_steps:
                    bar.close()
                    if metrics_file is not None:
                        metrics_file.close()
                    raise TrainingError(
                        f"{consecutive_bad} consecutive steps had a non-finite loss or gradient (step {step}); "
                        f"stopping. The last good checkpoint is {ckpt_path}. Lower train.lr or train.grad_clip.")
            else:
                consecutive_bad = 0
                optimizer.step()
            scheduler.step()
            step += 1
            train_time += time.perf_counter() - t_step  # the step ended in a host sync (the gradient norm)
            timed_steps += 1
            last = {"loss": total, "task_loss": loss, "accuracy": acc,
                    "grad_norm": grad_norm, "lr": optimizer.param_groups[0]["lr"], **extra}
            if first_loss is None:
                first_loss = last["loss"]
            record: dict[str, Any] = {"step": step, **last, "skipped": bad}
            if step % tc.eval_every == 0 or step == stop_at:
                evals = evaluate(model, task, exp, device)
                evals.update(run_probes(tc.probes, unwrap(model), exp, device))
                record.update(evals)
            if metrics_file is not None:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            bar.update(1)
            postfix = {"loss": f"{last['loss']:.4f}", "acc": f"{last['accuracy']:.3f}"}
            if evals:
                postfix["val_acc"] = f"{evals['val_accuracy']:.3f}"
            bar.set_postfix(postfix)
            stop_now = any_rank(flag.signal is not None, dist, device)
            if step % tc.checkpoint_every == 0 or step == stop_at or stop_now:
                checkpoint(step)
            if stop_now:
                name = signal.Signals(flag.signal).name if flag.signal is not None else "signal on another rank"
                status = f"interrupted ({name})"
                break
    # the final checkpoint is written; a signal from here on is noted, not raised, so the summary is finished
    with _catch_signals(flag):
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
        if status == "completed" and stop_at < tc.steps:
            status = "stopped at --max-steps"
        if start == stop_at and not evals:
            evals = evaluate(model, task, exp, device)
            evals.update(run_probes(tc.probes, unwrap(model), exp, device))
        wall = elapsed_before + time.perf_counter() - t0
        summary: dict[str, Any] = {
            "status": status, "steps": step, "planned_steps": tc.steps, "impl": impl, "device": str(device),
            "model": model_name_of(exp.model), "task": task_name_of(exp.task),
            "parameters": sum(p.numel() for p in core.parameters()) * (dist.world_size if dist.fsdp else 1),
            "first_loss": first_loss, "final_loss": last.get("loss"), "final_train_accuracy": last.get("accuracy"),
            **evals, "skipped_steps": skipped, "wall_time_s": wall, "world_size": dist.world_size,
            "train_tokens_per_s": tokens_per_step * timed_steps / train_time if train_time > 0 else None,
            "peak_memory_mib": (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                                else None),
            "config": config_dict, "source": exp.source,
        }
        if main:
            atomic_write_text(out / SUMMARY_NAME, json.dumps(summary, indent=2))
    return summary
