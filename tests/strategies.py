"""Hypothesis strategies for tensors.

Shapes, dtypes and seeds are drawn by Hypothesis (so failures shrink); the values themselves come from a
seeded `torch.Generator`, which is far faster than drawing every element and still reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from hypothesis import strategies as st

FLOAT_DTYPES_CPU: tuple[torch.dtype, ...] = (torch.float64, torch.float32)

seeds = st.integers(min_value=0, max_value=2**31 - 1)


def dims(min_value: int = 1, max_value: int = 16) -> st.SearchStrategy[int]:
    return st.integers(min_value=min_value, max_value=max_value)


def shapes(min_dims: int = 1, max_dims: int = 4, min_side: int = 1, max_side: int = 8) -> st.SearchStrategy[
        tuple[int, ...]]:
    return st.lists(dims(min_side, max_side), min_size=min_dims, max_size=max_dims).map(tuple)


def make_tensor(shape: Sequence[int], seed: int, *, dtype: torch.dtype = torch.float64, scale: float = 1.0,
                distribution: str = "normal", requires_grad: bool = False,
                nonfinite: str | None = None) -> torch.Tensor:
    """A reproducible tensor: `distribution` is "normal" or "uniform" (on [-scale, scale]).

    `nonfinite` in {"nan", "inf", "-inf"} injects one such value at a seeded position.
    """
    g = torch.Generator().manual_seed(seed)
    if distribution == "normal":
        x = torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale
    elif distribution == "uniform":
        x = (torch.rand(tuple(shape), generator=g, dtype=torch.float64) * 2 - 1) * scale
    else:
        raise ValueError(f"distribution must be 'normal' or 'uniform', got {distribution!r}")
    if nonfinite is not None and x.numel() > 0:
        idx = int(torch.randint(0, x.numel(), (1,), generator=g))
        x.view(-1)[idx] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[nonfinite]
    x = x.to(dtype)
    if requires_grad:
        x.requires_grad_(True)
    return x


@st.composite
def tensors(draw: st.DrawFn, shape: Sequence[int] | st.SearchStrategy[tuple[int, ...]] | None = None, *,
            dtype: torch.dtype | st.SearchStrategy[torch.dtype] = torch.float64, scale: float = 1.0,
            allow_nonfinite: bool = False) -> torch.Tensor:
    """A tensor of a drawn (or given) shape and dtype; optionally NaN/inf injected at a drawn position."""
    if shape is None:
        shp = draw(shapes())
    elif isinstance(shape, st.SearchStrategy):
        shp = draw(shape)
    else:
        shp = tuple(shape)
    dt = draw(dtype) if isinstance(dtype, st.SearchStrategy) else dtype
    bad = draw(st.sampled_from([None, "nan", "inf", "-inf"])) if allow_nonfinite else None
    return make_tensor(shp, draw(seeds), dtype=dt, scale=scale, nonfinite=bad)


def float_dtypes(include_half: bool = False) -> st.SearchStrategy[torch.dtype]:
    options = list(FLOAT_DTYPES_CPU)
    if include_half:
        options.append(torch.bfloat16)
    return st.sampled_from(options)
