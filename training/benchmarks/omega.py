"""Omega-rule memory op (`scripts/bench.py --op omega`): reference vs optimized, and on CUDA the long-context rows
against the sliding-window attention peers (flex-attention with a sliding-window block mask, full causal SDPA).

The optimized rows name the code path (`omega_dispatch`: "triton-fused" on CUDA, "torch-blocked-gram" on CPU).
Issue 8's goal: at L = 32K, window 1024, H = 16, Dh = 64, bf16 the Omega forward costs ≤ 2× flex-attention's
sliding-window attention at the same window; the long-context rows print that ratio, forward and forward +
backward (Triton kernels both ways on CUDA; fwd+bwd is not part of the goal).

Floor: the larger of the memory floor (read q, k, gate, write q' once at 3.0 TB/s, the H100's measured copy
rate) and the compute floor (the banded Gram and weighted-sum matmuls, 4·B·H·L·c·Dh FLOPs, at 781 TFLOP/s bf16
or 51 TFLOP/s fp32).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F

import optimized.omega as opt
import reference.omega as ref
from training.benchmarks import BenchArgs, BenchRow, register, time_fn

GOAL_RATIO = 2.0  # issue 8: Omega forward ≤ 2× flex-attention SWA at the same window

BANDWIDTH = 3.0e12  # bytes/s
FLOPS = {torch.bfloat16: 781e12, torch.float16: 781e12, torch.float32: 51e12, torch.float64: 51e12 / 2}


def _inputs(B: int, H: int, L: int, Dh: int, dtype: torch.dtype,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, L, Dh, generator=g, device=device).to(dtype)
    k = torch.randn(B, H, L, Dh, generator=g, device=device).to(dtype)
    gate = torch.rand(B, H, L, generator=g, device=device).to(dtype)
    return q, k, gate


def floor_ms(B: int, H: int, L: int, Dh: int, c: int, dtype: torch.dtype) -> float:
    size = torch.empty((), dtype=dtype).element_size()
    memory = (3 * B * H * L * Dh + B * H * L) * size / BANDWIDTH
    compute = 4 * B * H * L * min(c, L) * Dh / FLOPS[dtype]
    return max(memory, compute) * 1e3


def _rows(args: BenchArgs, B: int, H: int, L: int, Dh: int, c: int, dtype: torch.dtype,
          with_reference: bool) -> list[BenchRow]:
    device = args.device
    q, k, gate = _inputs(B, H, L, Dh, dtype, device)
    params = f"B={B} H={H} L={L} Dh={Dh} c={c} {str(dtype).removeprefix('torch.')}"
    floor = floor_ms(B, H, L, Dh, c, dtype)
    rows: list[BenchRow] = []

    def row(impl: str, ms: float, dispatch: str, note: str = "") -> BenchRow:
        return BenchRow("omega", impl, params, ms, dispatch, f"{B * L / ms * 1e3:.3g} tok/s",
                        floor / ms if impl == "optimized" and device.type == "cuda" else None, note)

    with torch.no_grad():
        ms_opt = time_fn(lambda: opt.omega_memory(q, k, gate, c), device, repeat=args.repeat)
        rows.append(row("optimized", ms_opt, opt.omega_dispatch(q), f"floor {floor:.3f} ms"))
        if with_reference:
            ms_ref = time_fn(lambda: ref.omega_memory(q, k, gate, c), device, warmup=1, repeat=1)
            rows.append(row("reference", ms_ref, "torch-loop-over-t", f"optimized is {ms_ref / ms_opt:.0f}x faster"))
    return rows


def _fwd_bwd(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], object]:
    """One forward + backward of `fn(*inputs)` against a fixed cotangent (gradients for every input)."""
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    out = fn(*leaves).detach()
    cot = torch.randn(out.shape, generator=torch.Generator(device=out.device).manual_seed(1), device=out.device,
                      dtype=torch.float32).to(out.dtype)
    return lambda: torch.autograd.grad(fn(*leaves), leaves, cot)


def _flex_swa(L: int, window: int, device: torch.device) -> Callable[..., torch.Tensor]:
    """Compiled flex-attention with a causal sliding-window block mask: (q, k, v) -> out (raises ImportError
    where flex-attention is missing)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def sliding(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    mask = create_block_mask(sliding, B=None, H=None, Q_LEN=L, KV_LEN=L, device=str(device))
    flex = torch.compile(flex_attention)

    def swa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flex(q, k, v, block_mask=mask)
    return swa


def _long_context_rows(args: BenchArgs, B: int, H: int, L: int, Dh: int, window: int,
                       dtype: torch.dtype) -> list[BenchRow]:
    """Ours (forward; forward + backward) next to sliding-window attention at the same window: flex-attention
    (compiled, block mask) and causal SDPA; each Omega row notes its ratio to flex SWA and the goal."""
    device = args.device
    q, k, gate = _inputs(B, H, L, Dh, dtype, device)
    v = k.clone()
    params = f"B={B} H={H} L={L} Dh={Dh} c={window} {str(dtype).removeprefix('torch.')}"
    floor = floor_ms(B, H, L, Dh, window, dtype)

    def tok(ms: float) -> str:
        return f"{B * L / ms * 1e3:.3g} tok/s"

    def omega(q: torch.Tensor, k: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return opt.omega_memory(q, k, gate, window)

    with torch.no_grad():
        ms_fwd = time_fn(lambda: omega(q, k, gate), device, repeat=args.repeat)
    ms_both = time_fn(_fwd_bwd(omega, [q, k, gate]), device, repeat=args.repeat)
    ours = [BenchRow("omega", "optimized", params + " fwd", ms_fwd, opt.omega_dispatch(q), tok(ms_fwd),
                     floor / ms_fwd, f"floor {floor:.3f} ms"),
            BenchRow("omega", "optimized", params + " fwd+bwd", ms_both, opt.omega_dispatch(q),
                     tok(ms_both), None, "")]
    peers: list[BenchRow] = []
    with torch.no_grad():
        ms = time_fn(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), device, repeat=args.repeat)
    peers.append(BenchRow("omega", "peer:sdpa-causal", params + " fwd", ms, "sdpa", tok(ms),
                          note="full causal attention"))
    try:
        swa = _flex_swa(L, window, device)
    except ImportError as exc:
        peers.append(BenchRow("omega", "peer:flex-swa", params, float("nan"), note=f"unavailable: {exc}"))
        return ours + peers
    with torch.no_grad():
        flex_fwd = time_fn(lambda: swa(q, k, v), device, repeat=args.repeat)
    flex_both = time_fn(_fwd_bwd(swa, [q, k, v]), device, repeat=args.repeat)
    peers.append(BenchRow("omega", "peer:flex-swa", params + " fwd", flex_fwd, "flex_attention (compiled)",
                          tok(flex_fwd), note="sliding-window attention, same window"))
    peers.append(BenchRow("omega", "peer:flex-swa", params + " fwd+bwd", flex_both, "flex_attention (compiled)",
                          tok(flex_both), note="sliding-window attention, same window"))
    for row, ref_ms in ((ours[0], flex_fwd), (ours[1], flex_both)):
        ratio = row.ms / ref_ms
        goal = f"; goal <= {GOAL_RATIO:g}x: {'met' if ratio <= GOAL_RATIO else 'NOT met'}" if row is ours[0] else ""
        row.note += f"; {ratio:.2f}x flex SWA{goal}"
    return ours + peers


@register("omega")
def bench_omega(args: BenchArgs) -> list[BenchRow]:
    if args.device.type != "cuda":
        if args.quick:
            return _rows(args, 1, 2, 128, 16, 32, torch.float32, with_reference=True)
        return (_rows(args, 1, 4, 512, 32, 64, torch.float32, with_reference=True)
                + _rows(args, 1, 4, 2048, 64, 256, torch.float32, with_reference=False))
    rows = _rows(args, 4, 8, 2048, 64, 256, torch.bfloat16, with_reference=True)
    rows += _rows(args, 4, 8, 2048, 64, 256, torch.float32, with_reference=False)
    rows += _long_context_rows(args, 1, 16, 32768, 64, 1024, torch.bfloat16)
    return rows


@register("omega_sweep")
def bench_omega_sweep(args: BenchArgs) -> list[BenchRow]:
    """CUDA only (no rows on CPU): the Omega forward's launch settings at issue 8's long-context shape (B=1, H=16,
    Dh=64, window 1024, bf16; L = 32K, 4K with --quick). flex-attention's sliding window first (the goal's
    yardstick, same call), the default launch, then query block × key block (≥ 64: `_check_blocks` refuses smaller
    half-precision key blocks) × warps × stages (20 launches; 4 with --quick, since each launch is one more Triton
    compile), each checked
    against the default's output (max |Δ| / max |y|) and given its ratio to flex; a launch that fails to compile
    or run is a row, not an error. Then the backward's dk launches (`_backward_sweep`)."""
    if args.device.type != "cuda":
        return []
    from optimized.kernels.omega import omega_triton

    B, H, L, Dh, window, dtype = 1, 16, 4096 if args.quick else 32768, 64, 1024, torch.bfloat16
    device = args.device
    q, k, gate = _inputs(B, H, L, Dh, dtype, device)
    params = f"B={B} H={H} L={L} Dh={Dh} c={window} bfloat16 fwd"
    rows: list[BenchRow] = []
    flex_ms = float("nan")
    try:
        swa = _flex_swa(L, window, device)
        with torch.no_grad():
            flex_ms = time_fn(lambda: swa(q, k, k), device, repeat=args.repeat)
        rows.append(BenchRow("omega_sweep", "peer:flex-swa", params, flex_ms, "flex_attention (compiled)",
                             note="sliding-window attention, same window"))
    except ImportError as exc:
        rows.append(BenchRow("omega_sweep", "peer:flex-swa", params, float("nan"), note=f"unavailable: {exc}"))

    def forward(block_m: int | None = None, block_n: int | None = None, warps: int | None = None,
                stages: int | None = None) -> torch.Tensor:
        return omega_triton(q, k, gate, window, 0.95, block_m=block_m, block_n=block_n, num_warps=warps,
                            num_stages=stages)[0]

    with torch.no_grad():
        default_out = forward().float()
        scale = default_out.abs().max().item() or 1.0
        default_ms = time_fn(forward, device, repeat=args.repeat)
    rows.append(BenchRow("omega_sweep", "optimized (default launch)", params, default_ms, "triton-fused",
                         note=f"{default_ms / flex_ms:.2f}x flex SWA"))
    grid = ((64, 128), (64,), (4,), (2, 3)) if args.quick else ((64, 128, 256), (64, 128), (4, 8), (2, 3))
    for bm, bn, warps, stages in itertools.product(*grid):
        if bm % bn:
            continue
        label = f"{params} block_m={bm} block_n={bn} warps={warps} stages={stages}"

        def launch(bm: int = bm, bn: int = bn, warps: int = warps, stages: int = stages) -> torch.Tensor:
            return forward(bm, bn, warps, stages)

        def deviation(launch: Callable[[], torch.Tensor] = launch) -> float:
            return (launch().float() - default_out).abs().max().item() / scale

        rows.append(_launch_row(args, "optimized:triton", label, launch, deviation,
                                lambda ms, error: f"{ms / flex_ms:.2f}x flex SWA; max |Δ| / max |y| vs default "
                                                  f"{error:.1e}"))
    return rows + _backward_sweep(args, q, k, gate, window, params.replace(" fwd", " bwd"))


def _backward_sweep(args: BenchArgs, q: torch.Tensor, k: torch.Tensor, gate: torch.Tensor, window: int,
                    params: str) -> list[BenchRow]:
    """The backward's launches (`omega_triton_backward`: dq through the forward kernel at its default, the dk/dgate
    kernel at each (block_m keys, block_n queries, warps) with 2 stages: 8 launches, 2 with --quick): the default
    first, then each launch's time and its largest deviation from the default's dk and dgate (max |Δ| / max |·|)."""
    from optimized.kernels.omega import omega_triton, omega_triton_backward

    device = args.device
    with torch.no_grad():
        out, den = omega_triton(q, k, gate, window, 0.95, return_den=True)
        assert den is not None
        grad_out = torch.randn(out.shape, generator=torch.Generator(device=device).manual_seed(1), device=device,
                               dtype=out.dtype)

        def backward(dk_blocks: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            _, dk, dgate, _, _ = omega_triton_backward(grad_out, q, k, gate, out, den, window, 0.95,
                                                       dk_blocks=dk_blocks)
            return dk, dgate

        default_dk, default_dgate = (t.float() for t in backward())
        default_ms = time_fn(backward, device, repeat=args.repeat)
    rows = [BenchRow("omega_sweep", "optimized backward (default launch)", params, default_ms, "triton-fused")]
    grid = ((64, 128), (32,), (8,), (2,)) if args.quick else ((64, 128), (32, 64), (4, 8), (2,))
    for launch in itertools.product(*grid):
        label = f"{params} dk block_m={launch[0]} block_n={launch[1]} warps={launch[2]} stages={launch[3]}"

        def timed(launch: tuple[int, ...] = launch) -> tuple[torch.Tensor, torch.Tensor]:
            return backward(launch)

        def deviation(timed: Callable[[], tuple[torch.Tensor, torch.Tensor]] = timed) -> float:
            dk, dgate = timed()
            return max(((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
                       for got, want in ((dk, default_dk), (dgate, default_dgate)))

        rows.append(_launch_row(args, "optimized:triton-bwd", label, timed, deviation,
                                lambda ms, error: f"{ms / default_ms:.2f}x the default backward; max |Δ| / max vs "
                                                  f"default {error:.1e}"))
    return rows


def _launch_row(args: BenchArgs, impl: str, label: str, run: Callable[[], object], deviation: Callable[[], float],
                note: Callable[[float, float], str]) -> BenchRow:
    """One sweep launch as a row: its deviation from the default launch's result, then its time (`note(ms,
    deviation)`); a launch that does not compile or fit is a failed row, not an error."""
    try:
        with torch.no_grad():
            error = deviation()
            ms = time_fn(run, args.device, repeat=args.repeat)
    except Exception as failure:  # reported, not fatal
        return BenchRow("omega_sweep", impl, label, float("nan"), "triton-fused",
                        note=f"failed: {type(failure).__name__}: {failure}"[:200])
    return BenchRow("omega_sweep", impl, label, ms, "triton-fused", note=note(ms, error))
