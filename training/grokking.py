"""Grokking metrics and a full-batch grokking run (spec: `specs/titans.md`, [TITANS-20]–[TITANS-22]).

Nanda et al. (2023) show that a network that groks modular addition represents each number a by a few
Fourier features cos(2πfa/p), sin(2πfa/p). We measure it on the number embeddings E (p, d): the fraction of
their (centred) energy in the top-k frequencies ([TITANS-20]), and how far they are from one circle
([TITANS-21]); the phase detector ([TITANS-22]) applies the seed's thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from reference.validation import ShapeError
from training.optim import apply_perp_grad_, task_loss
from training.tasks.modular import ModularTask

__all__ = [
    "PHASES",
    "circular_fit",
    "default_top_k",
    "detect_phase",
    "fourier_concentration",
    "fourier_spectrum",
    "number_embeddings",
    "run_grokking",
]

PHASES: tuple[str, ...] = ("memorization", "circuit_formation", "cleanup", "grokking")


def fourier_spectrum(embeddings: Tensor) -> Tensor:
    """[TITANS-20] Energy of the centred number embeddings E (p, d) per frequency f = 1 … ⌊p/2⌋.

    P_f = Σ_d (⟨c_f, E_{:,d}⟩² / ‖c_f‖² + ⟨s_f, E_{:,d}⟩² / ‖s_f‖²) with c_f(a) = cos(2πfa/p), s_f(a) = sin(2πfa/p)
    (s_f is dropped at f = p/2, where it vanishes). The basis is orthogonal, so Σ_f P_f = ‖E − mean‖_F².
    """
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ShapeError(f"fourier_spectrum: embeddings must have shape (p, d) with p >= 2, got "
                         f"{tuple(embeddings.shape)}")
    E = embeddings.detach().to(torch.float64)
    E = E - E.mean(dim=0, keepdim=True)  # the DC component carries nothing about a mod p
    p = E.shape[0]
    a = torch.arange(p, dtype=torch.float64)
    powers = []
    for f in range(1, p // 2 + 1):
        power = E.new_zeros(())
        for basis in (torch.cos(2 * math.pi * f * a / p), torch.sin(2 * math.pi * f * a / p)):
            norm_sq = (basis * basis).sum()
            if float(norm_sq) > 1e-9:
                power = power + ((basis @ E) ** 2).sum() / norm_sq
        powers.append(power)
    return torch.stack(powers)  # (⌊p/2⌋,)


def default_top_k(p: int) -> int:
    """⌈⌊p/2⌋ / 10⌉ frequencies: 5 for p = 97, 6 for p = 113 (Nanda et al. find ~5), 2 for p = 23."""
    return max(1, math.ceil((p // 2) / 10))


def fourier_concentration(embeddings: Tensor, top_k: int | None = None) -> float:
    """[TITANS-20] Fraction of the centred embedding energy in the `top_k` strongest frequencies, in [0, 1].

    1.0 for an embedding built from ≤ top_k frequencies; ≈ top_k / ⌊p/2⌋ for random embeddings (each frequency
    gets the same expected energy), slightly more from order statistics at small d.
    """
    spectrum = fourier_spectrum(embeddings)
    k = default_top_k(embeddings.shape[0]) if top_k is None else top_k
    total = spectrum.sum()
    if float(total) <= 0:
        return 0.0
    return float(spectrum.sort(descending=True).values[:k].sum() / total)


def circular_fit(embeddings: Tensor) -> float:
    """[TITANS-21] Relative least-squares residual of the best one-frequency circle fit, in [0, 1]:

        min_f min_{u,w} ‖E − 1 mᵀ − c_f uᵀ − s_f wᵀ‖² / ‖E − 1 mᵀ‖² = 1 − max_f P_f / Σ_f P_f

    0 for points on a circle at uniform angles 2πfa/p; ≈ 1 − 1/⌊p/2⌋ (near 1) for random embeddings.
    """
    spectrum = fourier_spectrum(embeddings)
    total = spectrum.sum()
    if float(total) <= 0:
        return 1.0
    return float(1 - spectrum.max() / total)


def detect_phase(fourier: float, math_accuracy: float, previous_fourier: float | None = None, *,
                 rise: float = 0.02) -> str:
    """[TITANS-22] The seed's phase table, checked from the last phase down:

    grokking: F > 0.8 and acc > 0.9; cleanup: F > 0.6 and acc > 0.7; memorization: F < 0.3 and F not rising
    (not more than `rise` above `previous_fourier`); circuit formation otherwise (structure emerging).
    `math_accuracy` is the validation accuracy of the math task (generalisation, not memorisation).
    """
    if fourier > 0.8 and math_accuracy > 0.9:
        return "grokking"
    if fourier > 0.6 and math_accuracy > 0.7:
        return "cleanup"
    rising = previous_fourier is not None and fourier > previous_fourier + rise
    if fourier < 0.3 and not rising:
        return "memorization"
    return "circuit_formation"


def number_embeddings(model: nn.Module, task: ModularTask) -> Tensor:
    """The rows of the model's token embedding (`model.embed`) for the numbers 0 … p − 1, (p, d)."""
    embed = getattr(model, "embed", None)
    if not isinstance(embed, nn.Embedding):
        raise ShapeError(f"number_embeddings: the model needs an `embed` nn.Embedding, got {type(embed).__name__}")
    return embed.weight[task.number_tokens().to(embed.weight.device)].detach()


def run_grokking(model: nn.Module, task: ModularTask, *, steps: int, lr: float = 1e-3, weight_decay: float = 1.0,
                 betas: tuple[float, float] = (0.9, 0.98), loss: str = "cross_entropy", perp_grad: bool = False,
                 grad_clip: float = 1.0, eval_every: int = 50,
                 on_record: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Full-batch AdamW on every training pair (Power et al., 2022), optional StableMax loss and ⊥Grad.

    Every `eval_every` steps records step, train/val loss and accuracy, Fourier concentration, circular fit and
    the detected phase; returns the records (the curve).
    """
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas)
    x_train, y_train = (t.to(device) for t in task.full("train"))
    x_val, y_val = (t.to(device) for t in task.full("val"))
    records: list[dict[str, Any]] = []
    previous: float | None = None

    def logits_of(x: Tensor) -> Tensor:
        out = model(x)
        result: Tensor = out["logits"] if isinstance(out, dict) else out
        return result

    for step in range(steps + 1):
        on_step = getattr(model, "on_step", None)
        if callable(on_step):
            on_step(step, steps)
        if step % eval_every == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                train_loss, train_acc = task_loss(logits_of(x_train), y_train, loss)
                val_loss, val_acc = task_loss(logits_of(x_val), y_val, loss)
            model.train()
            emb = number_embeddings(model, task)
            fourier = fourier_concentration(emb)
            record = {"step": step, "train_loss": float(train_loss), "train_accuracy": float(train_acc),
                      "val_loss": float(val_loss), "val_accuracy": float(val_acc), "fourier_concentration": fourier,
                      "circular_fit": circular_fit(emb),
                      "grokking_phase": detect_phase(fourier, float(val_acc), previous)}
            previous = fourier
            records.append(record)
            if on_record is not None:
                on_record(record)
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        value, _ = task_loss(logits_of(x_train), y_train, loss)
        value.backward()
        if perp_grad:
            apply_perp_grad_(model.parameters())
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
    return records
