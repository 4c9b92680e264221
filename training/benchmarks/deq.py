"""Deep-equilibrium solvers (`scripts/bench.py --op deq`).

Three tables in one op:
- iterations to tolerance: plain iteration vs Anderson vs Broyden (optimized solvers) on EMMA's FixedPointBlock and
  on a random contractive block f(z) = tanh(W z + u), W symmetric with eigenvalues spread over [−L, L] (so
  ‖W‖₂ = ρ(W) = L), at L ∈ {0.5, 0.9, 0.99}; a summary row checks the issue's requirement that Anderson needs at
  most half the iterations of plain iteration at L = 0.9;
- wall time per solve, reference vs optimized, at B=32, d=64 on CPU and B=256, d=512 on CUDA;
- on CUDA the optimized solve runs its per-iteration bookkeeping in `optimized.kernels.deq` (one launch per
  iteration instead of a few dozen); a row with `MEMARCH_DISABLE_KERNELS=deq` times the torch bookkeeping;
- host synchronisation: the optimized solve with a sync every iteration, every 4, and none until the end, and the
  fraction of its wall time spent in blocking device→host reads (`aten::_local_scalar_dense` in the profiler).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

import optimized.deq as opt
import optimized.deq_solvers as fast_solvers
import reference.deq as ref
from training.benchmarks import BenchArgs, BenchRow, register, time_fn


@contextmanager
def disabled_kernels(name: str) -> Iterator[None]:
    """`MEMARCH_DISABLE_KERNELS` extended by `name` inside the block."""
    old = os.environ.get("MEMARCH_DISABLE_KERNELS")
    os.environ["MEMARCH_DISABLE_KERNELS"] = ",".join(filter(None, [old, name]))
    try:
        yield
    finally:
        if old is None:
            del os.environ["MEMARCH_DISABLE_KERNELS"]
        else:
            os.environ["MEMARCH_DISABLE_KERNELS"] = old


Map = Callable[[torch.Tensor], torch.Tensor]
TOL = 1e-5


def contractive_block(B: int, d: int, L: float, device: torch.device, seed: int = 0) -> Map:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    W = (Q @ torch.diag(torch.linspace(-L, L, d, dtype=torch.float64)) @ Q.T).float().to(device)
    u = (0.1 * torch.randn(B, d, generator=g)).to(device)
    return lambda z: torch.tanh(z @ W.T + u)


def emma_block(B: int, d: int, device: torch.device) -> Map:
    block = ref.FixedPointBlock(d, d, lipschitz=0.9, sigma_method="exact").to(device).eval()
    g = torch.Generator().manual_seed(1)
    x, mem = torch.randn(B, d, generator=g).to(device), torch.randn(B, d, generator=g).to(device)
    with torch.no_grad():
        return block.map(x, mem, mem_scale=0.5)


def sync_fraction(fn: Callable[[], object], device: torch.device) -> float:
    """Fraction of one call's wall time spent blocked in device→host scalar reads."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    with profile(activities=activities) as prof:
        fn()
    events = prof.key_averages()
    total = max(sum(e.self_cpu_time_total for e in events), 1e-9)
    synced = sum(e.self_cpu_time_total for e in events if e.key in ("aten::_local_scalar_dense", "aten::item"))
    return synced / total


def _iteration_rows(args: BenchArgs, B: int, d: int) -> list[BenchRow]:
    device, rows = args.device, []
    max_iter = 400 if args.quick else 2000
    mean_iters: dict[tuple[str, str], float] = {}
    blocks: list[tuple[str, Map]] = [("emma FixedPointBlock c=0.9", emma_block(B, d, device))]
    blocks += [(f"contractive L={L}", contractive_block(B, d, L, device)) for L in (0.5, 0.9, 0.99)]
    for name, f in blocks:
        z0 = torch.zeros(B, d, device=device)
        for method in opt.SOLVERS:
            def run(f: Map = f, z0: torch.Tensor = z0, method: str = method) -> object:
                return opt.solve(f, z0, method=method, tol=TOL, max_iter=max_iter)
            with torch.no_grad():
                _, info = opt.solve(f, z0, method=method, tol=TOL, max_iter=max_iter)
                ms = time_fn(run, device, warmup=1, repeat=max(1, args.repeat // 3))
            s = info.summary()
            mean_iters[(name, method)] = s["iterations"]
            rows.append(BenchRow("deq", "optimized", f"{name} B={B} d={d} tol={TOL:g} float32", ms, method,
                                 note=f"iterations mean {s['iterations']:.1f} max {int(info.iterations.max())}, "
                                      f"converged {s['converged']:.0%}"))
    ratio = mean_iters[("contractive L=0.9", "anderson")] / mean_iters[("contractive L=0.9", "fixed_point")]
    rows.append(BenchRow("deq", "optimized", f"contractive L=0.9 B={B} d={d}", float("nan"), "anderson/plain",
                         note=f"Anderson needs {ratio:.2f}x plain iteration's iterations (requirement <= 0.5: "
                              f"{'PASS' if ratio <= 0.5 else 'FAIL'})"))
    return rows


def _timing_rows(args: BenchArgs, B: int, d: int) -> list[BenchRow]:
    device, rows = args.device, []
    f = contractive_block(B, d, 0.9, device)
    z0 = torch.zeros(B, d, device=device)
    params = f"contractive L=0.9 B={B} d={d} tol=1e-4 max_iter=30 float32"
    for method in opt.SOLVERS:
        def run_opt(method: str = method, check_every: int = 4) -> object:
            return opt.solve(f, z0, method=method, tol=1e-4, max_iter=30, check_every=check_every)

        def run_ref(method: str = method) -> object:
            return ref.solve(f, z0, method=method, tol=1e-4, max_iter=30)
        with torch.no_grad():
            ms_opt = time_fn(run_opt, device, repeat=args.repeat)
            ms_ref = time_fn(run_ref, device, warmup=1, repeat=1 if args.quick else 3)
            frac_opt, frac_ref = sync_fraction(run_opt, device), sync_fraction(run_ref, device)
            rows.append(BenchRow("deq", "reference", params, ms_ref, method,
                                 note=f"host-sync {frac_ref:.0%} of time"))
            path = "triton bookkeeping" if fast_solvers.use_kernels(z0) else "torch"
            rows.append(BenchRow("deq", "optimized", params, ms_opt, f"{method} check_every=4 {path}",
                                 note=f"{ms_ref / ms_opt:.1f}x faster than reference; host-sync {frac_opt:.0%}"))
            if path != "torch":  # the same solve with the kernels switched off, for A/B
                with disabled_kernels("deq"):
                    ms_torch = time_fn(run_opt, device, repeat=args.repeat)
                rows.append(BenchRow("deq", "optimized", params, ms_torch, f"{method} check_every=4 torch",
                                     note=f"MEMARCH_DISABLE_KERNELS=deq: {ms_ref / ms_torch:.1f}x faster than "
                                          f"reference; the kernels make the solve {ms_torch / ms_opt:.1f}x faster"))
            for every in (1, 0):
                def run_every(method: str = method, every: int = every) -> object:
                    return run_opt(method, every)
                ms = time_fn(run_every, device, repeat=args.repeat)
                frac = sync_fraction(run_every, device)
                extra = " (runs all 30 iterations)" if every == 0 else ""
                rows.append(BenchRow("deq", "optimized", params, ms, f"{method} check_every={every}",
                                     note=f"host-sync {frac:.0%}{extra}"))
    return rows


@register("deq")
def bench_deq(args: BenchArgs) -> list[BenchRow]:
    cuda = args.device.type == "cuda"
    B, d = (256, 512) if cuda else (32, 64)
    threads = torch.get_num_threads()
    if not cuda:  # tiny CPU solves are dominated by thread hand-offs on a shared machine
        torch.set_num_threads(1)
    try:
        return _iteration_rows(args, B, d) + _timing_rows(args, B, d)
    finally:
        torch.set_num_threads(threads)
