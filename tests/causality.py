"""Causality helper usable on any sequence op or model: perturbing inputs at positions >= t never changes
outputs at positions < t."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tests.equivalence import flatten_tensors


def perturb_from(x: torch.Tensor, t: int, *, time_dim: int = 1, seed: int = 0,
                 vocab_size: int | None = None) -> torch.Tensor:
    """A copy of `x` whose entries at time positions >= t are replaced (floats: fresh normals scaled
    like x; integer tokens: a different token, uniformly drawn, needs `vocab_size`)."""
    g = torch.Generator().manual_seed(seed)
    y = x.detach().clone()
    index = [slice(None)] * x.ndim
    index[time_dim] = slice(t, None)
    tail = y[tuple(index)]
    if x.dtype.is_floating_point:
        noise = torch.randn(tail.shape, generator=g, dtype=torch.float64).to(x.dtype)
        y[tuple(index)] = noise * (x.detach().abs().mean().clamp_min(1e-3))
    else:
        if vocab_size is None or vocab_size < 2:
            raise ValueError("integer inputs need vocab_size >= 2 to be perturbed")
        shift = torch.randint(1, vocab_size, tail.shape, generator=g).to(x.dtype)
        y[tuple(index)] = (tail + shift) % vocab_size
    return y


def assert_causal(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, t: int, *, time_dim: int = 1,
                  out_time_dim: int | None = None, seed: int = 0, vocab_size: int | None = None,
                  atol: float = 0.0, require_change: bool = True) -> None:
    """Assert outputs before `t` are unchanged (within `atol`) when inputs from `t` on are perturbed.

    With `require_change` the perturbation must also change some output at positions >= t, so that a
    function that ignores its input cannot pass.
    """
    otd = time_dim if out_time_dim is None else out_time_dim
    with torch.no_grad():
        y0 = flatten_tensors(fn(x))
        y1 = flatten_tensors(fn(perturb_from(x, t, time_dim=time_dim, seed=seed, vocab_size=vocab_size)))
    changed = False
    for i, (a, b) in enumerate(zip(y0, y1, strict=True)):
        if a.ndim <= otd:
            continue
        before = [slice(None)] * a.ndim
        before[otd] = slice(0, t)
        pa, pb = a[tuple(before)].double(), b[tuple(before)].double()
        diff = float((pa - pb).abs().max()) if pa.numel() else 0.0
        if diff > atol:
            raise AssertionError(f"output[{i}] at positions < {t} changed by {diff:.3e} when inputs >= {t} "
                                 f"were perturbed: the op leaks the future")
        after = [slice(None)] * a.ndim
        after[otd] = slice(t, None)
        if not torch.equal(a[tuple(after)], b[tuple(after)]):
            changed = True
    if require_change and not changed:
        raise AssertionError(f"perturbing inputs >= {t} changed no output at all: the check is vacuous")
