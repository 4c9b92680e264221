"""The selective state-space scan (Mamba's S6), literally: a loop over time.

Signature, argument names, shapes and semantics follow mamba-ssm's `selective_scan_fn` / `selective_scan_ref`
(`u, delta: (B, D, L)`, `A: (D, N)` real, `B, C: (D, N) | (B, N, L) | (B, G, N, L)`, `D: (D,)`,
`z: (B, D, L)`, `delta_bias: (D,)`), so ours drops in where theirs is used. Two differences, both documented
in `specs/ssm.md`: the math runs in the inputs' dtype (float64 in, float64 math; half inputs accumulate in
float32), and a keyword-only `initial_state` (B, D, N) extends the signature so that a sequence can be
scanned in pieces. The argument checks (`validate_*`) are shared with `optimized/ssm.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.validation import ShapeError, check_floating, check_rank, check_size

__all__ = ["selective_scan", "selective_scan_step", "validate_selective_scan", "validate_selective_scan_step"]


# ---------------------------------------------------------------------------------------------- checks

def _check_channel_vector(x: Tensor | None, name: str, dim: int, fn: str) -> None:
    if x is None:
        return
    check_floating(x, name, fn=fn)
    check_rank(x, name, 1, fn=fn, layout="(D,)")
    check_size(x, name, 0, dim, fn=fn, what="D, the channel dim of u")


def _check_input_matrix(x: Tensor, name: str, batch: int, dim: int, state: int, length: int | None,
                        fn: str) -> None:
    """B or C: (D, N) shared over time, or (B, N, L) / (B, G, N, L) per step; for one step (length None)
    (D, N), (B, N) or (B, G, N)."""
    check_floating(x, name, fn=fn)
    timed: tuple[int, ...] = () if length is None else (length,)
    if length is None:
        layouts = f"(D, N) = {(dim, state)}, (B, N) = {(batch, state)} or (B, G, N) with G dividing D = {dim}"
    else:
        layouts = f"(D, N) = {(dim, state)}, (B, N, L) = {(batch, state, length)} or (B, G, N, L) with G dividing D"
    check_rank(x, name, (2, 2 + len(timed), 3 + len(timed)), fn=fn, layout=layouts)
    shape = tuple(x.shape)
    if shape == (dim, state) or shape == (batch, state, *timed):
        return
    if x.ndim == 3 + len(timed) and shape[0] == batch and shape[2:] == (state, *timed) and shape[1] >= 1 \
            and dim % shape[1] == 0:
        return
    raise ShapeError(f"{fn}: {name} must have shape {layouts}, got {shape}")


def validate_selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                            z: Tensor | None, delta_bias: Tensor | None, initial_state: Tensor | None,
                            fn: str = "selective_scan") -> None:
    """Raise ShapeError/DTypeError naming the argument unless the inputs follow mamba-ssm's layout."""
    check_floating(u, "u", fn=fn)
    check_rank(u, "u", 3, fn=fn, layout="(B, D, L)")
    batch, dim, length = u.shape
    if length < 1:
        raise ShapeError(f"{fn}: u must hold at least one time step (L >= 1), got shape {tuple(u.shape)}")
    check_floating(delta, "delta", fn=fn)
    if tuple(delta.shape) != tuple(u.shape):
        raise ShapeError(f"{fn}: delta must have the shape of u (B, D, L) = {tuple(u.shape)}, got "
                         f"{tuple(delta.shape)}")
    check_floating(A, "A", fn=fn)
    check_rank(A, "A", 2, fn=fn, layout="(D, N)")
    check_size(A, "A", 0, dim, fn=fn, what="D, the channel dim of u")
    state = A.shape[1]
    _check_input_matrix(B, "B", batch, dim, state, length, fn)
    _check_input_matrix(C, "C", batch, dim, state, length, fn)
    _check_channel_vector(D, "D", dim, fn)
    _check_channel_vector(delta_bias, "delta_bias", dim, fn)
    if z is not None:
        check_floating(z, "z", fn=fn)
        if tuple(z.shape) != tuple(u.shape):
            raise ShapeError(f"{fn}: z must have the shape of u (B, D, L) = {tuple(u.shape)}, got {tuple(z.shape)}")
    if initial_state is not None:
        check_floating(initial_state, "initial_state", fn=fn)
        if tuple(initial_state.shape) != (batch, dim, state):
            raise ShapeError(f"{fn}: initial_state must have shape (B, D, N) = {(batch, dim, state)}, got "
                             f"{tuple(initial_state.shape)}")


def validate_selective_scan_step(state: Tensor, u_t: Tensor, delta_t: Tensor, A: Tensor, B_t: Tensor, C_t: Tensor,
                                 D: Tensor | None, z_t: Tensor | None, delta_bias: Tensor | None,
                                 fn: str = "selective_scan_step") -> None:
    """The checks of `validate_selective_scan` for one time step (no L axis anywhere)."""
    check_floating(u_t, "u_t", fn=fn)
    check_rank(u_t, "u_t", 2, fn=fn, layout="(B, D)")
    batch, dim = u_t.shape
    check_floating(delta_t, "delta_t", fn=fn)
    if tuple(delta_t.shape) != (batch, dim):
        raise ShapeError(f"{fn}: delta_t must have the shape of u_t (B, D) = {(batch, dim)}, got "
                         f"{tuple(delta_t.shape)}")
    check_floating(A, "A", fn=fn)
    check_rank(A, "A", 2, fn=fn, layout="(D, N)")
    check_size(A, "A", 0, dim, fn=fn, what="D, the channel dim of u_t")
    n_state = A.shape[1]
    check_floating(state, "state", fn=fn)
    if tuple(state.shape) != (batch, dim, n_state):
        raise ShapeError(f"{fn}: state must have shape (B, D, N) = {(batch, dim, n_state)}, got "
                         f"{tuple(state.shape)}")
    _check_input_matrix(B_t, "B_t", batch, dim, n_state, None, fn)
    _check_input_matrix(C_t, "C_t", batch, dim, n_state, None, fn)
    _check_channel_vector(D, "D", dim, fn)
    _check_channel_vector(delta_bias, "delta_bias", dim, fn)
    if z_t is not None:
        check_floating(z_t, "z_t", fn=fn)
        if tuple(z_t.shape) != (batch, dim):
            raise ShapeError(f"{fn}: z_t must have the shape of u_t (B, D) = {(batch, dim)}, got {tuple(z_t.shape)}")


# ---------------------------------------------------------------------------------------------- helpers

def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The dtype the math runs in: the widest input dtype, at least float32 (half inputs accumulate in fp32)."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def channel_view(x_t: Tensor, dim: int, shared: bool) -> Tensor:
    """[SSM-6] B_t or C_t as (B or 1, D, N): a shared (D, N) matrix is the same at every step; (B, N) is shared
    by all channels; (B, G, N) is shared by the D/G consecutive channels of each group."""
    if shared:
        return x_t[None]  # (1, D, N)
    if x_t.ndim == 2:
        return x_t[:, None, :]  # (B, 1, N)
    return x_t.repeat_interleave(dim // x_t.shape[1], dim=1)  # (B, D, N)


def discretised_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, work: torch.dtype) -> Tensor:
    """[SSM-1] Δ = softplus(delta + delta_bias) (each part optional), in the compute dtype; delta (B, D[, L])."""
    dt = delta.to(work)
    if delta_bias is not None:
        bias = delta_bias.to(work)
        dt = dt + (bias if delta.ndim == 2 else bias[:, None])
    if delta_softplus:
        dt = F.softplus(dt)
    return dt


def recurrence_step(h: Tensor, u_t: Tensor, dt_t: Tensor, A: Tensor, b_t: Tensor, c_t: Tensor, D: Tensor | None,
                    z_t: Tensor | None) -> tuple[Tensor, Tensor]:
    """[SSM-2] [SSM-3] [SSM-4] [SSM-5] One step in the compute dtype: h (B, D, N); u_t, dt_t, z_t (B, D);
    A (D, N); b_t, c_t (B or 1, D or 1, N). Returns (y_t (B, D), h_t (B, D, N))."""
    A_bar = torch.exp(dt_t[..., None] * A)  # [SSM-2] (B, D, N)
    B_bar_u = dt_t[..., None] * b_t * u_t[..., None]  # [SSM-2] (B, D, N)
    h = A_bar * h + B_bar_u  # [SSM-3]
    y = (c_t * h).sum(dim=-1)  # [SSM-4] (B, D)
    if D is not None:
        y = y + D * u_t  # [SSM-4]
    if z_t is not None:
        y = y * F.silu(z_t)  # [SSM-5]
    return y, h


# ---------------------------------------------------------------------------------------------- the scan

def selective_scan_step(state: Tensor, u_t: Tensor, delta_t: Tensor, A: Tensor, B_t: Tensor, C_t: Tensor,
                        D: Tensor | None = None, z_t: Tensor | None = None, delta_bias: Tensor | None = None,
                        delta_softplus: bool = False) -> tuple[Tensor, Tensor]:
    """[SSM-7] One step of the selective scan for recurrent inference ([SSM-1]..[SSM-5] at a single t).

    state (B, D, N) is h_{t−1}; u_t, delta_t, z_t (B, D); B_t, C_t (D, N) shared, (B, N) or (B, G, N).
    A matrix of shape (D, N) is read as the shared layout (when B == D, pass a per-batch one as (B, 1, N)).
    Returns (y_t (B, D) in u_t's dtype, new_state (B, D, N) in the compute dtype).
    """
    validate_selective_scan_step(state, u_t, delta_t, A, B_t, C_t, D, z_t, delta_bias)
    work = compute_dtype(u_t, delta_t, A, B_t, C_t, D, z_t, delta_bias, state)
    dim, n_state = A.shape
    dt = discretised_delta(delta_t, delta_bias, delta_softplus, work)  # (B, D)
    b_t = channel_view(B_t.to(work), dim, tuple(B_t.shape) == (dim, n_state))
    c_t = channel_view(C_t.to(work), dim, tuple(C_t.shape) == (dim, n_state))
    y, h = recurrence_step(state.to(work), u_t.to(work), dt, A.to(work), b_t, c_t,
                           None if D is None else D.to(work), None if z_t is None else z_t.to(work))
    return y.to(u_t.dtype), h


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, *,
                   initial_state: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """[SSM-1] [SSM-2] [SSM-3] [SSM-4] [SSM-5] [SSM-6] The selective scan as a literal loop over time.

    u, delta (B, D, L); A (D, N); B, C (D, N) | (B, N, L) | (B, G, N, L); D, delta_bias (D,); z (B, D, L);
    initial_state (B, D, N) = h_{−1} (zeros when None; keyword-only, an extension of mamba-ssm's signature).
    Returns out (B, D, L) in u's dtype, and with `return_last_state` also h_{L−1} (B, D, N) in the compute
    dtype (float32, or float64 for float64 inputs), as mamba-ssm does.
    """
    validate_selective_scan(u, delta, A, B, C, D, z, delta_bias, initial_state)
    work = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, dim, length = u.shape  # u: (B, D, L)
    n_state = A.shape[1]
    dt = discretised_delta(delta, delta_bias, delta_softplus, work)  # (B, D, L)
    A_w, B_w, C_w, u_w = A.to(work), B.to(work), C.to(work), u.to(work)
    D_w = None if D is None else D.to(work)
    z_w = None if z is None else z.to(work)
    h = (torch.zeros(batch, dim, n_state, dtype=work, device=u.device) if initial_state is None
         else initial_state.to(work))  # (B, D, N)
    outputs: list[Tensor] = []
    for t in range(length):
        b_t = channel_view(B_w if B.ndim == 2 else B_w[..., t], dim, B.ndim == 2)  # (B|1, D|1, N)
        c_t = channel_view(C_w if C.ndim == 2 else C_w[..., t], dim, C.ndim == 2)
        y_t, h = recurrence_step(h, u_w[:, :, t], dt[:, :, t], A_w, b_t, c_t, D_w,
                                 None if z_w is None else z_w[:, :, t])
        outputs.append(y_t)
    out = torch.stack(outputs, dim=2).to(u.dtype)  # (B, D, L)
    return (out, h) if return_last_state else out
