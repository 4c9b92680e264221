"""Benchmark "scan": the selective scan (mamba-ssm layout: variable B/C, with D, z, delta_bias, softplus).

Rows: the reference (a Python loop over time; run once, only where it is affordable), the optimized scan (its
branch in the `dispatch` column: cpu-compiled on CPU where a C compiler is found, else torch-chunked;
mamba_ssm.cuda or triton on CUDA), on CPU the torch-chunked scan called directly and the same three timed forward
+ backward, and on CUDA our Triton kernel called directly and mamba-ssm's `selective_scan_fn` as a peer when it
loads, and (CUDA) our kernel and mamba-ssm's without z, the issue's floor case. Throughput is the achieved
bandwidth over the memory floor's bytes (read u, delta, z, B, C; write out; without z, u, delta, B, C and out);
`floor` is the floor time (those bytes at the device copy bandwidth measured in the same run, the "copy" row) over
the measured time. The note gives each row's speed-up over the reference, or its ratio to mamba-ssm. On CUDA
every timed row (the copy too) is `time_fn(streamed=True)`: calls issued back to back and timed by CUDA events,
so a row is the device's time per call, not the Python launcher's; our kernel's row is also timed synchronised
after each call (the launcher's cost shows as the difference).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import cast
from unittest import mock

import torch

import optimized.ssm as opt
import reference.ssm as ref
from training.benchmarks import BenchArgs, BenchRow, copy_bandwidth, copy_row, register, time_fn

OP = "scan"


def _inputs(batch: int, dim: int, n_state: int, length: int, dtype: torch.dtype, device: torch.device,
            generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    A = -torch.arange(1, n_state + 1, dtype=torch.float32).repeat(dim, 1).to(device)  # S4D-real init, fp32
    D = torch.ones(dim, device=device)
    delta_bias = torch.full((dim,), -4.0, device=device)  # softplus ≈ 0.018: Mamba's typical step sizes
    return (randn(batch, dim, length), randn(batch, dim, length), A, randn(batch, n_state, length),
            randn(batch, n_state, length), D, randn(batch, dim, length), delta_bias)


def _device_ms(fn: Callable[[], object], args: BenchArgs) -> float:
    """`time_fn` as every CUDA row here is timed: streamed (calls back to back, CUDA events; plain on a CPU)."""
    return time_fn(fn, args.device, repeat=args.repeat, streamed=True)


def _floor_bytes(batch: int, dim: int, n_state: int, length: int, dtype: torch.dtype, gate: bool = True) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    # u, delta, z, out (B, D, L); B, C (B, N, L)
    return size * length * batch * ((4 if gate else 3) * dim + 2 * n_state)


def _rows_at(args: BenchArgs, batch: int, dim: int, n_state: int, length: int, dtype: torch.dtype,
             with_reference: bool, generator: torch.Generator, copy_gbps: float | None) -> list[BenchRow]:
    device = args.device
    u, delta, A, B, C, D, z, delta_bias = _inputs(batch, dim, n_state, length, dtype, device, generator)
    params = f"B={batch} D={dim} N={n_state} L={length} {str(dtype).removeprefix('torch.')}"

    def row(impl: str, ms: float, dispatch: str, note: str = "", gate: bool = True) -> BenchRow:
        floor_bytes = _floor_bytes(batch, dim, n_state, length, dtype, gate)
        return BenchRow(op=OP, impl=impl, params=params + ("" if gate else " no z"), ms=ms, dispatch=dispatch,
                        throughput=f"{floor_bytes / (ms * 1e6):.1f} GB/s",
                        floor_fraction=None if copy_gbps is None else floor_bytes / (copy_gbps * 1e6) / ms, note=note)

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
        ms = _device_ms(lambda: opt.selective_scan(u, delta, A, B, C, D, z, delta_bias, True), args)
        note = f"{ref_ms / ms:.1f}x reference" if ref_ms is not None else ""
        rows.append(row("optimized", ms, opt.scan_dispatch(u), note))
        if device.type == "cpu" and opt.scan_dispatch(u) != "torch-chunked":
            ms = _device_ms(lambda: opt.chunked_scan(u, delta, A, B, C, D, z, delta_bias, True, None), args)
            note = f"{ref_ms / ms:.1f}x reference" if ref_ms is not None else ""
            rows.append(row("optimized:torch-chunked", ms, "torch-chunked", note))
        if device.type == "cuda":
            mamba_fn = opt._load_mamba_ssm()[0]
            mamba_ms = None
            if mamba_fn is not None:
                mamba_ms = _device_ms(lambda: mamba_fn(u, delta, A, B, C, D, z, delta_bias, True), args)
                rows.append(row("peer:mamba_ssm", mamba_ms, "mamba_ssm.cuda"))
            from optimized.kernels.selective_scan import selective_scan_triton

            ms = _device_ms(lambda: selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, True), args)
            note = (f"{ms / mamba_ms:.2f}x mamba_ssm time" if mamba_ms is not None
                    else f"mamba_ssm absent: {opt.mamba_ssm_unavailable_reason()}")
            rows.append(row("optimized:triton", ms, "triton", note))
            synced = time_fn(lambda: selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, True), device,
                             repeat=args.repeat)
            rows.append(row("optimized:triton", synced, "triton", "synchronised after each call (launcher included)"))
            mamba_plain_ms = None
            if mamba_fn is not None:
                mamba_plain_ms = _device_ms(lambda: mamba_fn(u, delta, A, B, C, D, None, delta_bias, True), args)
                rows.append(row("peer:mamba_ssm", mamba_plain_ms, "mamba_ssm.cuda", "without z", gate=False))
            ms = _device_ms(lambda: selective_scan_triton(u, delta, A, B, C, D, None, delta_bias, True), args)
            note = "without the gate z (the issue's floor case)" + (
                f"; {ms / mamba_plain_ms:.2f}x mamba_ssm time" if mamba_plain_ms is not None else "")
            rows.append(row("optimized:triton", ms, "triton", note, gate=False))
    # forward + backward: on a CPU beside the reference; on CUDA once, at the shortest length in fp32 (the Triton
    # scan's backward recomputes with the torch chunked scan: this row says what that costs)
    if device.type == "cpu" or (with_reference and dtype == torch.float32):
        rows += _training_rows(args, params, (u, delta, A, B, C, D, z, delta_bias),
                               with_reference and device.type == "cpu")
    return rows


def _training_rows(args: BenchArgs, params: str, inputs: tuple[torch.Tensor, ...],
                   with_reference: bool) -> list[BenchRow]:
    """Forward + backward (the gradient of out.sum() for every input): the reference (once, when asked), the
    optimized scan, and the torch chunked scan where the optimized one is another branch."""
    leaves = tuple(x.detach().clone().requires_grad_(True) for x in inputs)

    def step(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for x in leaves:
                x.grad = None
            fn(*leaves).sum().backward()
        return run

    def chunked(*x: torch.Tensor) -> torch.Tensor:
        u, delta, A, B, C, D, z, bias = x
        return opt.chunked_scan(u, delta, A, B, C, D, z, bias, True, None)[0]

    def optimized(*x: torch.Tensor) -> torch.Tensor:
        u, delta, A, B, C, D, z, bias = x
        return cast(torch.Tensor, opt.selective_scan(u, delta, A, B, C, D, z, bias, True))

    def reference(*x: torch.Tensor) -> torch.Tensor:
        u, delta, A, B, C, D, z, bias = x
        return cast(torch.Tensor, ref.selective_scan(u, delta, A, B, C, D, z, bias, True))

    rows: list[BenchRow] = []
    ref_ms: float | None = None
    if with_reference:
        start = time.perf_counter()
        step(reference)()
        ref_ms = (time.perf_counter() - start) * 1e3
        rows.append(BenchRow(op=OP, impl="reference fwd+bwd", params=params, ms=ref_ms, dispatch="python-loop",
                             note="run once"))
    timed: list[tuple[str, Callable[..., torch.Tensor], str]] = [
        ("optimized fwd+bwd", optimized, opt.scan_dispatch(inputs[0]))]
    if timed[0][2] != "torch-chunked":
        timed.append(("optimized:torch-chunked fwd+bwd", chunked, "torch-chunked"))
    for impl, fn, dispatch in timed:
        ms = _device_ms(step(fn), args)
        rows.append(BenchRow(op=OP, impl=impl, params=params, ms=ms, dispatch=dispatch,
                             note=f"{ref_ms / ms:.1f}x reference" if ref_ms is not None else ""))
    from optimized.kernels import kernel_available
    from optimized.kernels.selective_scan import selective_scan_triton_autograd, triton_backward_supported

    u, _, _, B, C, *_ = leaves
    if kernel_available(u, "scan") and triton_backward_supported(u, B, C):
        # the Triton forward and backward kernels, whichever branch the default takes (mamba-ssm's where it is
        # built): A/B in the same call
        def triton_both(*x: torch.Tensor) -> torch.Tensor:
            u, delta, A, B, C, D, z, bias = x
            return selective_scan_triton_autograd(u, delta, A, B, C, D, z, bias, True, None)[0]

        with mock.patch.dict(os.environ, {"MEMARCH_SCAN_BACKWARD": "triton"}):
            ms = _device_ms(step(triton_both), args)
        default_ms = rows[-len(timed)].ms
        rows.append(BenchRow(op=OP, impl="optimized:triton fwd+bwd (Triton backward)", params=params, ms=ms,
                             dispatch="triton", note=f"{default_ms / ms:.2f}x the default fwd+bwd's speed"))
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
    copy_gbps = None
    if args.device.type == "cuda":
        row, copy_gbps = copy_row(OP, args.device, args.repeat, streamed=True)
        rows.append(row)
    for dtype in dtypes:
        for batch, dim, n_state, length in sizes:
            rows += _rows_at(args, batch, dim, n_state, length, dtype, length <= reference_max, generator, copy_gbps)
    return rows


def _triton_out(inputs: tuple[torch.Tensor, ...], block_d: int, block_l: int, warps: int,
                stages: int | None = None) -> torch.Tensor:
    from optimized.kernels.selective_scan import selective_scan_triton

    u, delta, A, B, C, D, z, delta_bias = inputs
    return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, True, block_d=block_d, block_l=block_l,
                                 num_warps=warps, stages=stages)[0]


@register("scan_sweep")
def bench_scan_sweep(args: BenchArgs) -> list[BenchRow]:
    """CUDA only: our Triton scan at B=8 D=2048 N=16 fp32 over its launch knobs (channels per program, steps per
    tile, warps per program; and the software-pipelined kernel's stages, `selective_scan_triton(stages=…)`), each
    checked against the double-buffered kernel's default launch; the fastest three are then timed at L=8192. For
    choosing `pipelined_blocks`, `DEFAULT_STAGES` and `default_blocks` on a new GPU; no rows on CPU."""
    if args.device.type != "cuda":
        return []
    from optimized.kernels.selective_scan import DEFAULT_STAGES, default_blocks, pipelined_blocks

    generator = torch.Generator().manual_seed(0)
    rows: list[BenchRow] = []
    timed: list[tuple[float, int, int, int, int]] = []  # (ms, block_d, block_l, warps, stages; 0: double-buffered)
    copy_gbps = copy_bandwidth(args.device, args.repeat, streamed=True)
    lengths = [256] if args.quick else [2048, 8192]
    for length in lengths:
        inputs = _inputs(8, 2048 if not args.quick else 64, 16, length, torch.float32, args.device, generator)
        floor_bytes = _floor_bytes(inputs[0].shape[0], inputs[0].shape[1], 16, length, torch.float32)
        floor_ms = floor_bytes / (copy_gbps * 1e6)
        expected = _triton_out(inputs, *default_blocks(16), 1)  # the double-buffered kernel's default launch
        pipelined = ([(8, 4, 1, 3), (8, 8, 1, 3)] if args.quick
                     else [(bd, bl, 1, st) for bd in (8, 16) for bl in (4, 8) for st in (2, 3, 4)])
        configs = ([(bd, bl, w, 0) for bd in (4, 8, 16) for bl in (2, 4, 8) for w in (1, 2)] + pipelined
                   if length == lengths[0] else [(bd, bl, w, st) for _, bd, bl, w, st in sorted(timed)[:3]])
        for block_d, block_l, warps, stages in configs:
            call = functools.partial(_triton_out, inputs, block_d, block_l, warps, stages or None)
            params = f"L={length} block_d={block_d} block_l={block_l} warps={warps}" + (
                f" stages={stages} (pipelined)" if stages else "")
            try:
                error = (call() - expected).abs().max().item()
                ms = _device_ms(call, args)
            except Exception as failure:  # a configuration that does not compile or run: reported, not fatal
                rows.append(BenchRow(op="scan_sweep", impl="optimized:triton", ms=float("nan"), params=params,
                                     dispatch="triton", note=f"failed: {type(failure).__name__}: {failure}"[:200]))
                continue
            if length == lengths[0]:
                timed.append((ms, block_d, block_l, warps, stages))
            default = (block_d, block_l, warps, stages) == (*pipelined_blocks(16), 1, DEFAULT_STAGES)
            rows.append(BenchRow(op="scan_sweep", impl="optimized:triton", ms=ms, dispatch="triton", params=params,
                                 throughput=f"{floor_bytes / (ms * 1e6):.1f} GB/s", floor_fraction=floor_ms / ms,
                                 note=f"max |Δ| vs double-buffered {error:.1e}{'; the default' if default else ''}"))
    return rows
