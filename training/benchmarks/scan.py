"""Benchmark "scan": the selective scan (mamba-ssm layout: variable B/C, with D, z, delta_bias, softplus).

Rows: the reference (a Python loop over time; run once, only where it is affordable), the optimized scan (its
branch in the `dispatch` column: cpu-compiled on CPU, which is what inference without autograd runs, else
torch-chunked; mamba_ssm.cuda or triton on CUDA), on CPU the torch-chunked scan (the autograd path) called
directly, and on CUDA our Triton kernel called directly and mamba-ssm's `selective_scan_fn` as a peer when it
loads. Throughput is the achieved
bandwidth over the memory floor's bytes (read u, delta, z, B, C; write out); `floor` is the floor time (bytes at
the device's bandwidth) over the measured time. The note gives each row's speed-up over the reference, or its
ratio to mamba-ssm.
"""

from __future__ import annotations

import time

import torch

import optimized.ssm as opt
import reference.ssm as ref
from training.benchmarks import BenchArgs, BenchRow, register, time_fn

OP = "scan"
H100_BANDWIDTH_GBS = 3008.0  # measured device copy (read + write), ENVIRONMENT.md


def _inputs(batch: int, dim: int, n_state: int, length: int, dtype: torch.dtype, device: torch.device,
            generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    A = -torch.arange(1, n_state + 1, dtype=torch.float32).repeat(dim, 1).to(device)  # S4D-real init, fp32
    D = torch.ones(dim, device=device)
    delta_bias = torch.full((dim,), -4.0, device=device)  # softplus ≈ 0.018: Mamba's typical step sizes
    return (randn(batch, dim, length), randn(batch, dim, length), A, randn(batch, n_state, length),
            randn(batch, n_state, length), D, randn(batch, dim, length), delta_bias)


def _floor_bytes(batch: int, dim: int, n_state: int, length: int, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return size * length * batch * (4 * dim + 2 * n_state)  # u, delta, z, out (B, D, L); B, C (B, N, L)


def _rows_at(args: BenchArgs, batch: int, dim: int, n_state: int, length: int, dtype: torch.dtype,
             with_reference: bool, generator: torch.Generator) -> list[BenchRow]:
    device = args.device
    u, delta, A, B, C, D, z, delta_bias = _inputs(batch, dim, n_state, length, dtype, device, generator)
    params = f"B={batch} D={dim} N={n_state} L={length} {str(dtype).removeprefix('torch.')}"
    floor_bytes = _floor_bytes(batch, dim, n_state, length, dtype)
    floor_ms = floor_bytes / (H100_BANDWIDTH_GBS * 1e6) if device.type == "cuda" else None

    def row(impl: str, ms: float, dispatch: str, note: str = "") -> BenchRow:
        return BenchRow(op=OP, impl=impl, params=params, ms=ms, dispatch=dispatch,
                        throughput=f"{floor_bytes / (ms * 1e6):.1f} GB/s",
                        floor_fraction=None if floor_ms is None else floor_ms / ms, note=note)

    rows: list[BenchRow] = []
    ref_ms: float | None = None
    with torch.no_grad():
        if with_reference:  # once: the loop over time is slow
            start = time.perf_counter()
            ref.selective_scan(u, delta, A, B, C, D, z, delta_bias, True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ref_ms = (time.perf_counter() - start) * 1e3
            rows.append(row("reference", ref_ms, "python-loop", "run once"))
        ms = time_fn(lambda: opt.selective_scan(u, delta, A, B, C, D, z, delta_bias, True), device,
                     repeat=args.repeat)
        note = f"{ref_ms / ms:.1f}x reference" if ref_ms is not None else ""
        rows.append(row("optimized", ms, opt.scan_dispatch(u), note))
        if device.type == "cpu" and opt.scan_dispatch(u) != "torch-chunked":
            ms = time_fn(lambda: opt.chunked_scan(u, delta, A, B, C, D, z, delta_bias, True, None), device,
                         repeat=args.repeat)
            note = f"{ref_ms / ms:.1f}x reference; the autograd path" if ref_ms is not None else "the autograd path"
            rows.append(row("optimized:torch-chunked", ms, "torch-chunked", note))
        if device.type == "cuda":
            mamba_fn = opt._load_mamba_ssm()[0]
            mamba_ms = None
            if mamba_fn is not None:
                mamba_ms = time_fn(lambda: mamba_fn(u, delta, A, B, C, D, z, delta_bias, True), device,
                                   repeat=args.repeat)
                rows.append(row("peer:mamba_ssm", mamba_ms, "mamba_ssm.cuda"))
            from optimized.kernels.selective_scan import selective_scan_triton

            ms = time_fn(lambda: selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, True), device,
                         repeat=args.repeat)
            note = (f"{ms / mamba_ms:.2f}x mamba_ssm time" if mamba_ms is not None
                    else f"mamba_ssm absent: {opt.mamba_ssm_unavailable_reason()}")
            rows.append(row("optimized:triton", ms, "triton", note))
    return rows


@register(OP)
def bench_scan(args: BenchArgs) -> list[BenchRow]:
    generator = torch.Generator().manual_seed(0)
    if args.quick:
        sizes, dtypes, reference_max = [(1, 16, 4, 128), (1, 16, 4, 256)], [torch.float32], 256
    elif args.device.type == "cuda":
        sizes = [(8, 2048, 16, length) for length in (2048, 8192, 16384)]
        dtypes, reference_max = [torch.float32, torch.bfloat16], 2048
    else:
        sizes, dtypes, reference_max = [(1, 256, 16, 512), (1, 256, 16, 2048)], [torch.float32], 2048
    rows: list[BenchRow] = []
    for dtype in dtypes:
        for batch, dim, n_state, length in sizes:
            rows += _rows_at(args, batch, dim, n_state, length, dtype, length <= reference_max, generator)
    return rows
