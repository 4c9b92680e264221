"""Triton kernel for the Titans memory's chunk-to-chunk state passing (`optimized.titans` dispatches here on CUDA).

Implements `reference.titans.titans_memory_chunked` ([TITANS-7]) in the parallel chunk form of
`optimized.titans` (module docstring there). With the chunk's start state (M₀, S₀), R = K M₀ − V and the
state-independent coefficients W, m = A − λ W1, s, u, E_C of `optimized.titans.chunk_coefficients`:

    y   = P M₀ + Z S₀ + y_c,   P = diag(m) Q − 2 (W ⊙ Q Kᵀ) K,   Z = diag(s) Q,   y_c = 2 (W ⊙ Q Kᵀ) V
    M_C = m_C M₀ + s_C S₀ − 2 Kᵀ diag(W_C,·) R,      S_C = E_C S₀ − λ (Σ_j u_j) M₀ − 2 Kᵀ diag(u) R.

P, Z (C × d_k) and y_c (C × d_v) do not depend on the state: torch forms them for all chunks at once in batched
matmuls (the C × C scores never reach the kernel). The loss ‖M k − v‖² separates over value columns, so each
column block of (M, S) evolves on its own: one program per (batch·head, block of BLOCK_V value columns) keeps
M[:, vblk] and S[:, vblk] (d_k × BLOCK_V, float32) in registers and walks the chunks sequentially; per chunk
it loads K_n, P_n, Z_n (C × d_k), V_n[:, vblk], y_c[:, vblk] and the coefficient rows, makes five `tl.dot`s
(P M, Z S, K M, Kᵀ(−2 W_C ⊙ R), Kᵀ(−2 u ⊙ R), the scalar terms folded into their accumulators) and writes
y_n[:, vblk]; no per-chunk state is stored. C, d_k and BLOCK_V are padded to powers of two ≥ 16 (tl.dot's
smallest tile) with masked loads: zero rows and columns add nothing. A length that C does not divide ends
with one shorter chunk, run by the torch form (`optimized.titans.torch_chunked`) from the kernel's final state.

Precision: the state and every accumulation are float32. float32 inputs: exact float32 dots
(`input_precision="ieee"`: no TF32, slow on the GPU, correct). bfloat16/float16 inputs, and any inputs under
`torch.autocast` (q, k, v cast to the autocast dtype, as autocast does for matmuls): dot operands in that
dtype (M, S and R rounded to it per product) with float32 accumulation on the tensor cores. Tolerances against
the float64 reference: float32 1e-5 on short sequences (model tolerance 1e-4 over long scans), bfloat16 5e-2
(model tolerance).

Gradients (`titans_memory_triton_autograd`): the backward recomputes the forward with the torch chunked form
(`optimized.titans.torch_chunked`) under the forward's autocast state and differentiates that: correct, not fast.
Under `TRITON_INTERPRET=1` the kernel runs on CPU tensors (tests call `titans_memory_triton` directly);
`compile_for_gpu` compiles it for sm_90 without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["compile_for_gpu", "titans_memory_triton", "titans_memory_triton_autograd"]

_jit: Callable[[Callable[..., Any]], Any] = triton.jit  # typed alias: Triton's decorator carries no annotations


@_jit
def _titans_fwd(k_ptr, v_ptr, P_ptr, Z_ptr, yc_ptr, vec_ptr, scal_ptr, M0_ptr, S0_ptr, y_ptr, M_ptr, S_ptr,  # type: ignore[no-untyped-def]
                n_chunks, chunk, d_k, d_v, heads, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
                HAS_STATE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_V: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // heads
    h = bh % heads
    offs_c = tl.arange(0, BLOCK_C)  # positions in a chunk
    offs_k = tl.arange(0, BLOCK_K)  # key dimensions
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)  # this program's value columns
    mask_c = offs_c < chunk
    mask_k = offs_k < d_k
    mask_v = offs_v < d_v
    mask_kv = mask_k[:, None] & mask_v[None, :]
    mask_ck = mask_c[:, None] & mask_k[None, :]
    mask_cv = mask_c[:, None] & mask_v[None, :]
    state_offs = bh * d_k * d_v + offs_k[:, None] * d_v + offs_v[None, :]  # into (B·H, d_k, d_v)
    if HAS_STATE:
        M = tl.load(M0_ptr + state_offs, mask=mask_kv, other=0.0).to(tl.float32)  # (BLOCK_K, BLOCK_V)
        S = tl.load(S0_ptr + state_offs, mask=mask_kv, other=0.0).to(tl.float32)
    else:
        M = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
        S = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    k_offs = b * sk_b + h * sk_h + offs_c[:, None] * sk_l + offs_k[None, :] * sk_d  # (BLOCK_C, BLOCK_K)
    v_offs = b * sv_b + h * sv_h + offs_c[:, None] * sv_l + offs_v[None, :] * sv_d  # (BLOCK_C, BLOCK_V)
    pz_offs = bh * n_chunks * chunk * d_k + offs_c[:, None] * d_k + offs_k[None, :]  # P, Z: (B·H, N·C, d_k)
    y_offs = bh * n_chunks * chunk * d_v + offs_c[:, None] * d_v + offs_v[None, :]  # y, y_c: (B·H, N·C, d_v)
    for n in range(n_chunks):
        t0 = n * chunk
        row = bh * n_chunks + n  # this chunk's row of the coefficients
        K = tl.load(k_ptr + k_offs + t0 * sk_l, mask=mask_ck, other=0.0)  # (BLOCK_C, BLOCK_K), input dtype
        V = tl.load(v_ptr + v_offs + t0 * sv_l, mask=mask_cv, other=0.0).to(tl.float32)  # (BLOCK_C, BLOCK_V)
        P = tl.load(P_ptr + pz_offs + t0 * d_k, mask=mask_ck, other=0.0)  # (BLOCK_C, BLOCK_K), input dtype
        Z = tl.load(Z_ptr + pz_offs + t0 * d_k, mask=mask_ck, other=0.0)
        y = tl.load(yc_ptr + y_offs + t0 * d_v, mask=mask_cv, other=0.0)  # (BLOCK_C, BLOCK_V) float32
        w_row = tl.load(vec_ptr + row * 2 * chunk + offs_c, mask=mask_c, other=0.0)  # −2 W_C· (BLOCK_C,)
        u_row = tl.load(vec_ptr + row * 2 * chunk + chunk + offs_c, mask=mask_c, other=0.0)  # −2 u
        m_last = tl.load(scal_ptr + row * 4)  # scalars m_C, s_C, E_C, λ Σ u
        s_last = tl.load(scal_ptr + row * 4 + 1)
        e_last = tl.load(scal_ptr + row * 4 + 2)
        lam_u = tl.load(scal_ptr + row * 4 + 3)
        M_d = M.to(K.dtype)  # dot operands in the input dtype (a no-op for float32)
        S_d = S.to(K.dtype)
        y = tl.dot(P, M_d, acc=y, input_precision=PRECISION)  # y = P M₀ + Z S₀ + y_c
        y = tl.dot(Z, S_d, acc=y, input_precision=PRECISION)
        tl.store(y_ptr + y_offs + t0 * d_v, y.to(y_ptr.dtype.element_ty), mask=mask_cv)
        R = tl.dot(K, M_d, acc=-V, input_precision=PRECISION)  # (BLOCK_C, BLOCK_V) residuals K M₀ − V
        K_t = tl.trans(K)  # (BLOCK_K, BLOCK_C)
        M_next = tl.dot(K_t, (w_row[:, None] * R).to(K.dtype), acc=m_last * M + s_last * S,
                        input_precision=PRECISION)
        S = tl.dot(K_t, (u_row[:, None] * R).to(K.dtype), acc=e_last * S - lam_u * M, input_precision=PRECISION)
        M = M_next
    tl.store(M_ptr + state_offs, M, mask=mask_kv)
    tl.store(S_ptr + state_offs, S, mask=mask_kv)


def _blocks(chunk: int, d_k: int, d_v: int, block_v: int | None) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_K, BLOCK_V): powers of two ≥ 16 (tl.dot's smallest tile); by default BLOCK_V keeps each
    state tile at ≤ 4096 float32 elements (d_k = 128: 32 value columns)."""
    block_c = max(16, triton.next_power_of_2(chunk))
    block_k = max(16, triton.next_power_of_2(d_k))
    if block_v is None:
        block_v = min(triton.next_power_of_2(d_v), max(16, 4096 // block_k))
    return block_c, block_k, max(16, block_v)


def titans_memory_triton(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor, theta: Tensor, *,
                         chunk_size: int, global_decay: float = 0.0,
                         initial_state: tuple[Tensor, Tensor] | None = None, block_v: int | None = None,
                         num_warps: int = 4, num_stages: int = 2) -> tuple[Tensor, Tensor, Tensor]:
    """Forward only: (y (B, H, L, d_v), M, S (B, H, d_k, d_v)), all in v's dtype, as
    `optimized.titans.titans_memory_chunked` (inputs already validated). `block_v` value columns per program
    (a power of two; default: see `_blocks`)."""
    from optimized.titans import _compute_dtype, chunk_coefficients, torch_chunked

    out_dtype = v.dtype
    work = _compute_dtype(out_dtype)
    B, H, L, d_k = k.shape
    d_v = v.shape[-1]
    C = min(chunk_size, max(L, 1))
    N = L // C
    main = N * C
    lam = float(global_decay)
    if initial_state is None:
        M = torch.zeros(B, H, d_k, d_v, dtype=torch.float32, device=k.device)
        S = torch.zeros_like(M)
    else:
        M = initial_state[0].to(torch.float32).contiguous()
        S = initial_state[1].to(torch.float32).contiguous()
    y = v.new_zeros(B, H, 0, d_v)
    if N > 0:
        io = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)  # the dots' operand dtype
        if torch.is_autocast_enabled(k.device.type):
            io = torch.get_autocast_dtype(k.device.type)
        q_io, k_io, v_io = (t[:, :, :main].to(io) for t in (q, k, v))
        W, m_coef, s, u, e_last = chunk_coefficients(alpha[:, :, :main].float(), eta[:, :, :main].float(),
                                                      theta[:, :, :main].float(), C, lam)  # W: (B, H, N, C, C)
        # the state-independent part of y = (diag(m) Q − 2 scores K) M₀ + diag(s) Q S₀ + 2 scores V, all chunks
        Q_n = q_io.reshape(B, H, N, C, d_k)
        K_n = k_io.reshape(B, H, N, C, d_k)
        scores = (W * (Q_n @ K_n.transpose(-1, -2)).float()).to(io)  # (B, H, N, C, C)
        P = (m_coef[..., None] * Q_n.float() - 2 * (scores @ K_n).float()).to(io).contiguous()  # (B, H, N, C, d_k)
        Z = (s[..., None] * Q_n.float()).to(io).contiguous()
        y_c = (2 * (scores @ v_io.reshape(B, H, N, C, d_v)).float()).contiguous()  # (B, H, N, C, d_v)
        vecs = (-2 * torch.stack([W[..., -1, :], u], dim=-2)).contiguous()  # (B, H, N, 2, C)
        scalars = torch.stack([m_coef[..., -1], s[..., -1], e_last, lam * u.sum(dim=-1)], dim=-1).contiguous()
        y = torch.empty(B, H, main, d_v, dtype=out_dtype, device=v.device)
        M_out = torch.empty(B, H, d_k, d_v, dtype=torch.float32, device=k.device)
        S_out = torch.empty_like(M_out)
        block_c, block_k, bv = _blocks(C, d_k, d_v, block_v)
        grid = (B * H, triton.cdiv(d_v, bv))
        _titans_fwd[grid](
            k_io, v_io, P, Z, y_c, vecs, scalars, M, S, y, M_out, S_out, N, C, d_k, d_v, H, *k_io.stride(),
            *v_io.stride(), HAS_STATE=initial_state is not None, PRECISION="ieee" if io == torch.float32 else "tf32",
            BLOCK_C=block_c, BLOCK_K=block_k, BLOCK_V=bv, num_warps=num_warps, num_stages=num_stages)
        M, S = M_out, S_out
    if main == L:
        return y, M.to(out_dtype), S.to(out_dtype)
    # the last, shorter chunk: the torch path from the kernel's final state
    y_tail, M, S = torch_chunked(q[:, :, main:], k[:, :, main:], v[:, :, main:], alpha[:, :, main:],
                                 eta[:, :, main:], theta[:, :, main:], chunk_size=L - main, global_decay=lam,
                                 initial_state=(M.to(work), S.to(work)))
    return torch.cat([y, y_tail], dim=2), M, S


def compile_for_gpu(capability: int = 90, dtype: str = "bf16", *, chunk: int = 64, d_k: int = 128,
                    block_v: int | None = None, num_warps: int = 4, num_stages: int = 2,
                    precision: str = "ieee") -> Any:
    """Compile `_titans_fwd` ahead of time for CUDA compute capability `capability` (90: H100) with q, k, v, y in
    `dtype` ("fp32", "fp16", "bf16"), without a GPU (Triton's frontend, its passes and ptxas run on the CPU): the
    check `TRITON_INTERPRET=1` cannot make, so it must run in a process without that variable. Returns Triton's
    compiled kernel (its `n_regs` and `n_spills` tell the register pressure)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    block_c, block_k, bv = _blocks(chunk, d_k, d_k, block_v)
    names: list[str] = _titans_fwd.arg_names
    # as a launch specialises them: unit strides are constants, pointers and the other ints 16-divisible
    constexprs = {"sk_d": 1, "sv_d": 1, "HAS_STATE": True, "PRECISION": precision if dtype == "fp32" else "tf32",
                  "BLOCK_C": block_c, "BLOCK_K": block_k, "BLOCK_V": bv}
    io = {"k_ptr", "v_ptr", "P_ptr", "Z_ptr", "y_ptr"}  # in the input dtype; coefficients and states: fp32
    signature = {name: "constexpr" if name in constexprs else (f"*{dtype}" if name in io else "*fp32")
                 if name.endswith("_ptr") else "i32" for name in names}
    aligned = [name for name in names if name not in constexprs and name not in ("n_chunks", "heads")]
    source = ASTSource(fn=_titans_fwd, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constexprs.items()},
                       attrs={(names.index(name),): [["tt.divisibility", 16]] for name in aligned})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps,
                                                                              "num_stages": num_stages})


class _TritonTitans(torch.autograd.Function):
    """Forward by the kernel; backward by differentiating the torch chunked form (recomputed under grad, with the
    forward's autocast state)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor, theta: Tensor,
                M0: Tensor | None, S0: Tensor | None, chunk_size: int,
                global_decay: float) -> tuple[Tensor, Tensor, Tensor]:
        ctx.save_for_backward(q, k, v, alpha, eta, theta, M0, S0)
        ctx.chunk_size, ctx.global_decay = chunk_size, global_decay
        device = k.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        state = (M0, S0) if M0 is not None and S0 is not None else None
        return titans_memory_triton(q, k, v, alpha, eta, theta, chunk_size=chunk_size, global_decay=global_decay,
                                    initial_state=state)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, grad_M: Tensor, grad_S: Tensor) -> tuple[Tensor | None, ...]:
        from optimized.titans import torch_chunked

        inputs: list[Tensor | None] = [t.detach().requires_grad_(t.requires_grad) if t is not None else None
                                       for t in ctx.saved_tensors]
        q, k, v, alpha, eta, theta, M0, S0 = inputs
        assert q is not None and k is not None and v is not None
        assert alpha is not None and eta is not None and theta is not None
        state = (M0, S0) if M0 is not None and S0 is not None else None
        device, autocast, autocast_dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=autocast_dtype, enabled=autocast):
            outputs = torch_chunked(q, k, v, alpha, eta, theta, chunk_size=ctx.chunk_size,
                                    global_decay=ctx.global_decay, initial_state=state)
            wanted = [t for t in inputs if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(outputs, wanted, (grad_y, grad_M, grad_S), allow_unused=True))
        result = [next(grads) if t is not None and t.requires_grad else None for t in inputs]
        return (*result, None, None)


def titans_memory_triton_autograd(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor, theta: Tensor, *,
                                  chunk_size: int, global_decay: float = 0.0,
                                  initial_state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """`titans_memory_triton` with gradients (see the module docstring)."""
    apply = cast(Callable[..., tuple[Tensor, Tensor, Tensor]], _TritonTitans.apply)
    M0, S0 = initial_state if initial_state is not None else (None, None)
    return apply(q, k, v, alpha, eta, theta, M0, S0, chunk_size, float(global_decay))
