"""Modern Hopfield retrieval and the Unified Mamba–Hopfield–DEQ model (`scripts/bench.py --op hopfield`).

Rows: one retrieval ξ_new = Xᵀ softmax(β X ξ) forward + backward at N queries × M patterns × D, for the dense
reference, the fused optimized path (scaled_dot_product_attention) and the chunked online-log-sum-exp path, with
peak memory on CUDA; then (CUDA, not --quick) one training step (forward + backward) of the whole unified model at
the issue's size, d_model=512, L=2048, memory_size=5000, reference vs optimized: tokens/s and peak memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import optimized.hopfield as opt
import reference.hopfield as ref
from training.benchmarks import BenchArgs, BenchRow, register, time_fn

OP = "hopfield"


def _peak_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _retrieval_rows(args: BenchArgs, N: int, M: int, D: int, dtype: torch.dtype,
                    with_reference: bool) -> list[BenchRow]:
    device = args.device
    g = torch.Generator().manual_seed(0)
    xi = torch.randn(N, D, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    X = (torch.randn(M, D, generator=g) / D ** 0.5).to(device=device, dtype=dtype).requires_grad_(True)
    variants: list[tuple[str, str, Callable[[], torch.Tensor]]] = [
        ("optimized", "sdpa-fused", lambda: opt.hopfield_retrieve(xi, X, 2.0)),
        ("optimized", "chunked-1024", lambda: opt.hopfield_retrieve(xi, X, 2.0, chunk_size=1024)),
    ]
    if with_reference:
        variants.insert(0, ("reference", "dense", lambda: ref.hopfield_retrieve(xi, X, 2.0)))
    rows = []
    for impl, dispatch, fn in variants:
        def step(fn: Callable[[], torch.Tensor] = fn) -> None:
            fn().sum().backward()
        ms = time_fn(step, device, repeat=args.repeat)
        peak = _peak_mb(step, device)
        rows.append(BenchRow(op=OP, impl=impl, params=f"N={N} M={M} D={D} {str(dtype).removeprefix('torch.')}",
                             ms=ms, dispatch=dispatch, throughput=f"{N / ms * 1e3:.3g} queries/s",
                             note="fwd+bwd" + (f", peak {peak:.0f} MiB" if peak is not None else "")))
    return rows


def _model_rows(args: BenchArgs) -> list[BenchRow]:
    """The issue's GPU row: one training step of the unified model, d_model=512, L=2048, memory_size=5000."""
    import optimized.unified as opt_u
    import reference.unified as ref_u

    device, B, L = args.device, 1, 2048
    cfg = ref_u.UnifiedConfig(vocab_size=256, d_model=512, d_state=64, d_conv=4, n_layers=6, memory_size=5000,
                              max_iterations=30)
    x = torch.randint(0, 256, (B, L), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for impl, module in (("reference", ref_u), ("optimized", opt_u)):
        torch.manual_seed(0)
        model = module.UnifiedMambaHopfieldDEQ(cfg).to(device)

        def step(model: torch.nn.Module = model) -> None:
            model(x).float().pow(2).mean().backward()
        ms = time_fn(step, device, warmup=1, repeat=2 if impl == "reference" else 5)
        peak = _peak_mb(step, device)
        rows.append(BenchRow(op=OP, impl=impl, params=f"model B={B} L={L} d=512 M=5000 fp32", ms=ms,
                             dispatch="unified-train-step", throughput=f"{B * L / ms * 1e3:.3g} tok/s",
                             note="fwd+bwd" + (f", peak {peak:.0f} MiB" if peak is not None else "")))
    return rows


@register(OP)
def bench_hopfield(args: BenchArgs) -> list[BenchRow]:
    if args.quick:
        sizes, dtypes, ref_max = [(256, 512, 32)], [torch.float32], 10**9
    elif args.device.type == "cuda":
        sizes = [(16384, 5000, 512), (65536, 5000, 512), (16384, 65536, 128)]
        dtypes, ref_max = [torch.float32, torch.bfloat16], 16384 * 5000
    else:
        sizes, dtypes, ref_max = [(2048, 1024, 64), (8192, 5000, 64)], [torch.float32], 8192 * 5000
    rows: list[BenchRow] = []
    for N, M, D in sizes:
        for dtype in dtypes:
            rows += _retrieval_rows(args, N, M, D, dtype, N * M <= ref_max)
    if args.device.type == "cuda" and not args.quick:
        rows += _model_rows(args)
    return rows
