"""The slot memory's chunked decayed sum: `scripts/bench.py --op cumsum`.

`optimized.vsa.decayed_cumsum` (the recurrence M_t = λ_t M_{t−1} + u_t behind HAMT's HCM and EMMA's VSAMemory) in
its two schedules ([VSA-16b] in specs/vsa.md) side by side, forward + backward, at HAMT's default memory shape
(B=1, S=8 slots, X=2048, chunks of 64) for L ∈ {1K, 4K, 16K} on CUDA; on the CPU and with --quick the shape is
smaller (S=4, X=256, L ∈ {256, 1024}). The literal per-step reference is timed at the shortest L. Each row names
its schedule in `dispatch`; the batched row's note gives its speed relative to the loop's in the same run.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from unittest import mock

import torch

import optimized.vsa as opt
import reference.vsa as ref
from training.benchmarks import BenchArgs, BenchRow, register, time_fn

OP = "cumsum"


def _fwd_bwd(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], u: torch.Tensor, lam: torch.Tensor,
             grad: torch.Tensor) -> None:
    out = fn(u, lam)
    torch.autograd.grad(out, (u, lam), grad)


@register(OP)
def bench_cumsum(args: BenchArgs) -> list[BenchRow]:
    device = args.device
    small = args.quick or device.type != "cuda"
    slots, width = (4, 256) if small else (8, 2048)
    lengths = (256, 1024) if small else (1024, 4096, 16384)
    rows: list[BenchRow] = []
    for length in lengths:
        gen = torch.Generator(device=device).manual_seed(length)
        u = torch.randn(1, length, slots, width, device=device, generator=gen, requires_grad=True)
        lam = (0.9 + 0.1 * torch.rand(1, length, slots, device=device, generator=gen)).requires_grad_()
        grad = torch.randn(1, length, slots, width, device=device, generator=gen)
        params = f"B=1 L={length} S={slots} X={width} C=64 fp32 fwd+bwd"
        times: dict[str, float] = {}
        for method in ("loop", "batched"):
            with mock.patch.dict(os.environ, {"MEMARCH_DECAYED_CUMSUM": method}):
                times[method] = time_fn(functools.partial(_fwd_bwd, opt.decayed_cumsum, u, lam, grad), device,
                                        repeat=args.repeat)
            note = (f"{times['loop'] / times['batched']:.2f}x the loop's speed" if method == "batched"
                    else "one chunk after another")
            rows.append(BenchRow(OP, "optimized", params, times[method], f"decayed_cumsum:{method}",
                                 throughput=f"{length / times[method] * 1e3:.3g} tok/s", note=note))
        if length == lengths[0]:
            ms = time_fn(functools.partial(_fwd_bwd, ref.decayed_cumsum, u, lam, grad), device, warmup=1,
                         repeat=max(1, min(args.repeat, 3)))
            best = min(times.values())
            rows.append(BenchRow(OP, "reference", params, ms, "loop over t",
                                 throughput=f"{length / ms * 1e3:.3g} tok/s",
                                 note=f"the faster schedule is {ms / best:.0f}x faster"))
    return rows
