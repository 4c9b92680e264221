"""Benchmark "swa": causal sliding-window attention at a fixed window over growing L.

Rows: the reference (a Python loop over queries; only at the smaller L, it is slow), the optimized blocked
SDPA (its dispatch path in the `dispatch` column), and full causal SDPA as a peer that ignores the window
(its cost grows quadratically, for contrast). `ms/1K tok` in the throughput column stays flat when the cost
grows linearly in L.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import optimized.attention as opt
import reference.attention as ref
from training.benchmarks import BenchArgs, BenchRow, register, time_fn

OP = "swa"


def _rows_at(args: BenchArgs, batch: int, heads: int, length: int, head_dim: int, window: int,
             dtype: torch.dtype, with_reference: bool, generator: torch.Generator) -> list[BenchRow]:
    device = args.device
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=generator).to(device=device, dtype=dtype)
               for _ in range(3))  # (B, H, L, Dh) each
    params = f"B={batch} H={heads} L={length} Dh={head_dim} w={window} {str(dtype).removeprefix('torch.')}"

    def row(impl: str, ms: float, dispatch: str, note: str = "") -> BenchRow:
        per_k_tokens = ms * 1000.0 / (batch * length)
        return BenchRow(op=OP, impl=impl, params=params, ms=ms, dispatch=dispatch,
                        throughput=f"{per_k_tokens:.4f} ms/1K tok", note=note)

    rows = []
    with torch.no_grad():
        if with_reference:
            ms = time_fn(lambda: ref.sliding_window_attention(q, k, v, window), device, warmup=1,
                         repeat=min(args.repeat, 3))
            rows.append(row("reference", ms, "python-loop"))
        ms = time_fn(lambda: opt.sliding_window_attention(q, k, v, window), device, repeat=args.repeat)
        rows.append(row("optimized", ms, opt.swa_dispatch(length, window)))
        ms = time_fn(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), device, repeat=args.repeat)
        rows.append(row("peer:sdpa-full-causal", ms, "sdpa-causal", "no window: quadratic in L"))
    return rows


@register(OP)
def bench_swa(args: BenchArgs) -> list[BenchRow]:
    dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    if args.quick:
        batch, heads, head_dim, window = 1, 2, 32, 32
        lengths, reference_max = [128, 256, 512], 256
    elif args.device.type == "cuda":
        batch, heads, head_dim, window = 4, 16, 64, 128
        lengths, reference_max = [1024, 2048, 4096, 8192, 16384, 32768], 1024
    else:
        batch, heads, head_dim, window = 1, 4, 64, 128
        lengths, reference_max = [512, 1024, 2048, 4096, 8192], 1024
    generator = torch.Generator().manual_seed(0)
    rows: list[BenchRow] = []
    for length in lengths:
        rows += _rows_at(args, batch, heads, length, head_dim, window, dtype, length <= reference_max, generator)
    return rows
