"""One error family and the argument checks shared by every public entry point.

Every message names the argument, what was given and what is allowed, so that a user can fix the call
without reading our code. Checks run once per call, before any loop; none of them syncs the host except
`check_finite`/`check_finite_all`, which callers use only where non-finite input would silently poison a result,
and the id range of `check_token_ids` (one reduction per model call).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "ConfigError",
    "ConvergenceError",
    "DTypeError",
    "MemarchError",
    "NonFiniteError",
    "ShapeError",
    "check_finite",
    "check_finite_all",
    "check_float64_mix",
    "check_floating",
    "check_in_range",
    "check_positive",
    "check_rank",
    "check_same_device",
    "check_size",
    "check_token_ids",
]


class MemarchError(ValueError):
    """Base class of every error memarch raises for bad input."""


class ShapeError(MemarchError):
    """A tensor has the wrong rank or a dimension does not match."""


class DTypeError(MemarchError, TypeError):
    """A tensor has a dtype the operation cannot take."""


class NonFiniteError(MemarchError):
    """NaN or inf where the math cannot take it."""


class ConfigError(MemarchError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


class ConvergenceError(MemarchError, RuntimeError):
    """An iterative solver did not converge and the policy says to raise."""


def _where(fn: str | None) -> str:
    return f"{fn}: " if fn else ""


def check_rank(x: torch.Tensor, name: str, ranks: int | Sequence[int], *, fn: str | None = None,
               layout: str | None = None) -> None:
    """Raise ShapeError unless `x.ndim` is one of `ranks`; `layout` (e.g. "(B, L, D)") goes in the message."""
    if not isinstance(x, torch.Tensor):
        raise DTypeError(f"{_where(fn)}{name} must be a torch.Tensor, got {type(x).__name__}")
    allowed = (ranks,) if isinstance(ranks, int) else tuple(ranks)
    if x.ndim not in allowed:
        want = " or ".join(str(r) for r in allowed)
        hint = f" {layout}" if layout else ""
        raise ShapeError(
            f"{_where(fn)}{name} must have {want} dimensions{hint}, got shape {tuple(x.shape)} ({x.ndim} dims)"
        )


def check_size(x: torch.Tensor, name: str, dim: int, expected: int, *, fn: str | None = None,
               what: str | None = None) -> None:
    """Raise ShapeError unless `x.shape[dim] == expected`; `what` names the expected quantity."""
    if x.shape[dim] != expected:
        label = f" ({what})" if what else ""
        raise ShapeError(
            f"{_where(fn)}{name}.shape[{dim}] must be {expected}{label}, got shape {tuple(x.shape)}"
        )


def check_floating(x: torch.Tensor, name: str, *, fn: str | None = None) -> None:
    """Raise DTypeError unless `x` has a floating-point dtype."""
    if not isinstance(x, torch.Tensor):
        raise DTypeError(f"{_where(fn)}{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise DTypeError(
            f"{_where(fn)}{name} must be a floating-point tensor (float16/bfloat16/float32/float64), "
            f"got {x.dtype}; convert with .float()"
        )


def check_same_device(*named: tuple[str, torch.Tensor], fn: str | None = None) -> None:
    """Raise MemarchError when tensors live on different devices."""
    devices = {t.device for _, t in named}
    if len(devices) > 1:
        listing = ", ".join(f"{n} on {t.device}" for n, t in named)
        raise MemarchError(f"{_where(fn)}all tensors must be on one device, got {listing}")


def check_float64_mix(*named: tuple[str, torch.Tensor | None], fn: str | None = None) -> None:
    """Raise DTypeError when a float64 tensor meets a tensor of another dtype in one call (`None` entries skipped).

    float64 is the dtype of exactness checks, so float64 next to float32 means one argument was not converted;
    left alone, one implementation raises a bare RuntimeError and the other silently computes in float32.
    Mixes of half precision and float32 are allowed: autocast produces them.
    """
    present = [(n, t) for n, t in named if t is not None]
    dtypes = {t.dtype for _, t in present}
    if torch.float64 in dtypes and len(dtypes) > 1:
        listing = ", ".join(f"{n} is {t.dtype}" for n, t in present)
        raise DTypeError(f"{_where(fn)}{', '.join(n for n, _ in present)} mix float64 with another dtype ({listing}); "
                         f"convert them to one dtype with .to(dtype)")


def check_token_ids(input_ids: torch.Tensor, vocab_size: int, *, name: str = "input_ids", fn: str | None = None,
                    layout: str = "(batch, seq_len)") -> None:
    """Token ids: an int64/int32 tensor of rank 2 `layout` with batch and length >= 1 and every id in
    [0, vocab_size). The range check is one reduction read back to the host; under torch.compile it is skipped (the
    embedding lookup still fails on a bad id, with a less helpful message)."""
    check_rank(input_ids, name, 2, fn=fn, layout=layout)
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise DTypeError(f"{_where(fn)}{name} must be int64/int32 token ids, got {input_ids.dtype}")
    if input_ids.shape[0] == 0:
        raise ShapeError(f"{_where(fn)}{name} has batch size 0, got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise ShapeError(f"{_where(fn)}{name} has seq_len 0; sequences must hold at least one token")
    if torch.compiler.is_compiling():
        return
    bounds = torch.aminmax(input_ids)
    low, high = int(bounds.min.item()), int(bounds.max.item())
    if low < 0 or high >= vocab_size:
        raise ShapeError(f"{_where(fn)}{name}: token ids must lie in [0, vocab_size={vocab_size}), got min {low}, "
                         f"max {high}")


def check_finite(x: torch.Tensor, name: str, *, fn: str | None = None) -> None:
    """Raise NonFiniteError if `x` holds NaN or inf (one host sync)."""
    if not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteError(f"{_where(fn)}{name} holds {n_bad} non-finite value(s) (NaN or inf)")


def check_finite_all(*named: tuple[str, torch.Tensor], fn: str | None = None) -> None:
    """`check_finite` for several tensors with one host sync; the message names the first one that fails."""
    tensors = [t for _, t in named]
    if bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        return
    for name, t in named:
        check_finite(t, name, fn=fn)


def check_positive(value: float, name: str, *, fn: str | None = None, allow_zero: bool = False) -> None:
    """Raise MemarchError unless `value` > 0 (or >= 0 with `allow_zero`)."""
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise MemarchError(f"{_where(fn)}{name} must be {bound}, got {value!r}")


def check_in_range(value: float, name: str, low: float, high: float, *, fn: str | None = None,
                   low_inclusive: bool = True, high_inclusive: bool = True) -> None:
    """Raise MemarchError unless `value` lies in the stated interval."""
    above = value >= low if low_inclusive else value > low
    below = value <= high if high_inclusive else value < high
    if not (above and below):
        interval = f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
        raise MemarchError(f"{_where(fn)}{name} must lie in {interval}, got {value!r}")
