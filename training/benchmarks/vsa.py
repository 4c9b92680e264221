"""VSA binding throughput: `scripts/bench.py --op bind` and `--op unbind`.

CPU: D = 4096 over 1024 pairs (float32): the literal reference (an O(D²) index sum) is timed on a few pairs and
scaled per pair (said in the `note` column); optimized is the rfft/irfft path; the speedup is in its note.
GPU: D ∈ {1024, 4096, 8192} with 256 MiB per operand; throughput counts 12 bytes per fp32 element (read a and b,
write c) and `floor` is the fraction of the device copy bandwidth measured in the same run (`dst.copy_(src)` on
256 MiB, read + write). Rows: optimized (the fused CUDA kernel where it builds), the torch.fft path called
directly, and torchhd's HRR bind when `torchhd` is importable; each timed streamed (`time_fn(streamed=True)`, the
copy too), the notes giving the optimized row's time over theirs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

import optimized.vsa as opt
import reference.vsa as ref
from training.benchmarks import BenchArgs, BenchRow, copy_row, register, time_fn

MIB = 2**20
BYTES_PER_ELEMENT = 12  # fp32: read a, read b, write c


def _torchhd() -> Any | None:
    try:
        return importlib.import_module("torchhd")
    except ImportError:
        return None


def _gbps(pairs: int, dim: int, ms: float) -> float:
    return BYTES_PER_ELEMENT * pairs * dim / (ms / 1e3) / 1e9


def _operands(pairs: int, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    a = ref.random_hrr(dim, (pairs,), generator=g, device=device)
    b = ref.random_hrr(dim, (pairs,), generator=g, device=device)
    return a, b


def bench_cpu(op: str, args: BenchArgs) -> list[BenchRow]:
    dim, pairs, ref_pairs = (256, 64, 4) if args.quick else (4096, 1024, 32)
    device = args.device
    a, b = _operands(pairs, dim, device)
    ref_fn: Callable[..., torch.Tensor] = getattr(ref, op)
    opt_fn: Callable[..., torch.Tensor] = getattr(opt, op)
    ms_opt = time_fn(lambda: opt_fn(a, b), device, repeat=args.repeat)
    ms_ref_few = time_fn(lambda: ref_fn(a[:ref_pairs], b[:ref_pairs]), device, warmup=1, repeat=1)
    ms_ref = ms_ref_few * pairs / ref_pairs
    params = f"D={dim} pairs={pairs} fp32"
    rows = [
        BenchRow(op=op, impl="reference", params=params, ms=ms_ref, dispatch="literal index sum",
                 throughput=f"{_gbps(pairs, dim, ms_ref):.3f} GB/s",
                 note=f"timed on {ref_pairs} pairs ({ms_ref_few:.1f} ms), scaled x{pairs // ref_pairs} per pair"),
        BenchRow(op=op, impl="optimized", params=params, ms=ms_opt, dispatch=opt.bind_dispatch(a, b),
                 throughput=f"{_gbps(pairs, dim, ms_opt):.2f} GB/s",
                 note=f"{ms_ref / ms_opt:.0f}x faster than reference ({torch.get_num_threads()} threads)"),
    ]
    hd = _torchhd()
    if hd is not None and op == "bind":
        ta, tb = a.as_subclass(hd.HRRTensor), b.as_subclass(hd.HRRTensor)
        ms_hd = time_fn(lambda: hd.bind(ta, tb), device, repeat=args.repeat)
        rows.append(BenchRow(op=op, impl="peer:torchhd", params=params, ms=ms_hd, dispatch="HRRTensor.bind",
                             throughput=f"{_gbps(pairs, dim, ms_hd):.2f} GB/s"))
    return rows


def bench_gpu(op: str, args: BenchArgs) -> list[BenchRow]:
    device = args.device
    row, copy_gbps = copy_row(op, device, args.repeat, streamed=True)
    rows = [row]
    for dim in (1024, 4096, 8192):
        rows.extend(_gpu_rows(op, dim, 16 if args.quick else 256, copy_gbps, args))
    return rows


def _gpu_rows(op: str, dim: int, operand_mib: int, copy_gbps: float, args: BenchArgs) -> list[BenchRow]:
    device = args.device
    pairs = operand_mib * MIB // (4 * dim)
    a, b = _operands(pairs, dim, device)
    params = f"D={dim} pairs={pairs} fp32 ({operand_mib} MiB/operand)"
    fn: Callable[..., Any] = getattr(opt, op)
    conjugate = op == "unbind"  # unbind(c, a) = a ⋆ c: the correlation
    candidates: list[tuple[str, str, Callable[[], Any]]] = [
        ("optimized", opt.bind_dispatch(a, b), lambda: fn(a, b)),
        ("optimized:torch.fft", "torch.fft", lambda: opt.torch_fft_bind(b if conjugate else a, a if conjugate else b,
                                                                         conjugate_a=conjugate))]
    hd = _torchhd()
    if hd is not None and op == "bind":
        ta, tb = a.as_subclass(hd.HRRTensor), b.as_subclass(hd.HRRTensor)
        candidates.append(("peer:torchhd", "HRRTensor.bind", lambda: hd.bind(ta, tb)))
    rows: list[BenchRow] = []
    for impl, dispatch, run in candidates:
        ms = time_fn(run, device, repeat=args.repeat, streamed=True)
        gbps = _gbps(pairs, dim, ms)
        note = "" if not rows else f"the optimized row takes {rows[0].ms / ms:.2f}x this time"
        rows.append(BenchRow(op=op, impl=impl, params=params, ms=ms, dispatch=dispatch,
                             throughput=f"{gbps:.0f} GB/s", floor_fraction=gbps / copy_gbps, note=note))
    return rows


@register("bind")
def bench_bind(args: BenchArgs) -> list[BenchRow]:
    return bench_gpu("bind", args) if args.device.type == "cuda" else bench_cpu("bind", args)


@register("unbind")
def bench_unbind(args: BenchArgs) -> list[BenchRow]:
    return bench_gpu("unbind", args) if args.device.type == "cuda" else bench_cpu("unbind", args)


@register("bind_sweep")
def bench_bind_sweep(args: BenchArgs) -> list[BenchRow]:
    """CUDA only (no rows on CPU): the fused bind kernel built with 8, 16 and 32 values per thread
    (`hrr_bind.cu`'s HRR_VALUES: fewer values, fewer registers and more threads, but more shared-memory stages)
    at D ∈ {1024, 2048, 4096, 8192}, 256 MiB per operand (16 with --quick), each checked against torch.fft on the
    same operands and timed beside torch.fft in the same run; the notes mark the kernel's default per D
    (`hrr_bind.default_values`), for choosing it on a new GPU."""
    if args.device.type != "cuda":
        return []
    from optimized.kernels import hrr_bind

    device = args.device
    row, copy_gbps = copy_row("bind_sweep", device, args.repeat, streamed=True)
    rows = [row]
    for dim in (1024, 2048, 4096, 8192):
        pairs = (16 if args.quick else 256) * MIB // (4 * dim)
        a, b = _operands(pairs, dim, device)
        expected = opt.torch_fft_bind(a, b)
        torch_ms = time_fn(partial(opt.torch_fft_bind, a, b), device, repeat=args.repeat, streamed=True)
        rows.append(BenchRow(op="bind_sweep", impl="optimized:torch.fft", params=f"D={dim} pairs={pairs} fp32",
                             ms=torch_ms, dispatch="torch.fft", throughput=f"{_gbps(pairs, dim, torch_ms):.0f} GB/s",
                             floor_fraction=_gbps(pairs, dim, torch_ms) / copy_gbps))
        for values in (8, 16, 32):
            params = f"D={dim} pairs={pairs} fp32 values={values}"
            reason = hrr_bind._library(torch.cuda.get_device_capability(device), values)[1]
            if reason:
                rows.append(BenchRow(op="bind_sweep", impl="optimized:cuda-fused", params=params, ms=float("nan"),
                                     note=f"failed: {reason}"[:200]))
                continue

            run = partial(hrr_bind._launch, a, b, False, values)
            error = ((run() - expected).abs().max() / expected.abs().max()).item()
            ms = time_fn(run, device, repeat=args.repeat, streamed=True)
            gbps = _gbps(pairs, dim, ms)
            default = " (the default)" if values == hrr_bind.default_values(dim) else ""
            rows.append(BenchRow(op="bind_sweep", impl="optimized:cuda-fused", params=params, ms=ms,
                                 dispatch="cuda-fused", throughput=f"{gbps:.0f} GB/s",
                                 floor_fraction=gbps / copy_gbps,
                                 note=f"{ms / torch_ms:.2f}x torch.fft's time; max |Δ| / max |c| {error:.1e}{default}"))
    return rows
