"""`scripts/bench.py --op titans`: the Titans momentum memory (forward, forward + backward).

Rows: our literal per-token recurrence (reference), our parallel chunk form (optimized, dispatched by
`optimized.titans.titans_dispatch`: the Triton state-passing kernel on CUDA; beside it, on CUDA, the torch form
with its loop over chunks), and public peers when
importable: flash-linear-attention's `chunk_momentum_delta_rule` (Titans' linear memory with momentum) and
`chunk_gated_delta_rule` (the same without momentum), titans-pytorch's `NeuralMemory` (includes its own
projections). GPU sizes: B=4, H=8, d_k=d_v=128, L ∈ {2048, 8192}, chunk 64, bf16; CPU sizes are small.

Floor: the FLOPs of the chunk form, 2C³ + 2C²(d_k + d_v) + 12·C·d_k·d_v per chunk and head, at the bf16
matmul peak (781 TFLOP/s measured on the H100; `--extra peak_tflops=…` overrides).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from optimized import titans as opt
from reference import titans as ref
from training.benchmarks import BenchArgs, BenchRow, register, time_fn

H100_BF16_TFLOPS = 781.0


def _inputs(B: int, H: int, L: int, dk: int, dv: int, dtype: torch.dtype, device: torch.device,
            grad: bool) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    q = F.normalize(torch.randn(B, H, L, dk, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, H, L, dk, generator=g), dim=-1)
    v = torch.randn(B, H, L, dv, generator=g)
    alpha = torch.sigmoid(torch.randn(B, H, L, generator=g) - 4)
    eta = torch.sigmoid(torch.randn(B, H, L, generator=g) + 2)
    theta = torch.sigmoid(torch.randn(B, H, L, generator=g) - 2)
    return [t.to(device=device, dtype=dtype).requires_grad_(grad) for t in (q, k, v, alpha, eta, theta)]


def chunk_flops(B: int, H: int, L: int, dk: int, dv: int, C: int) -> float:
    chunks = -(-L // C)
    return float(B * H * chunks * (2 * C**3 + 2 * C**2 * (dk + dv) + 12 * C * dk * dv))


def _timed(fn: Callable[[], Any], args: BenchArgs, *, slow: bool = False) -> float:
    return time_fn(fn, args.device, warmup=1 if slow else 2, repeat=1 if slow else args.repeat)


def _fwd_bwd(fn: Callable[[], Any], inputs: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        out = fn()
        y = out[0] if isinstance(out, tuple) else out
        y.float().sum().backward()
        for t in inputs:
            t.grad = None
    return run


def _peer_rows(B: int, H: int, L: int, dk: int, dv: int, C: int, args: BenchArgs, params: str) -> list[BenchRow]:
    rows: list[BenchRow] = []
    device = args.device
    tokens = B * L
    if importlib.util.find_spec("fla") is not None:
        chunk_gated_delta_rule = importlib.import_module("fla.ops.gated_delta_rule").chunk_gated_delta_rule
        chunk_momentum_delta_rule = importlib.import_module("fla.ops.momentum_delta_rule").chunk_momentum_delta_rule

        g = torch.Generator(device="cpu").manual_seed(1)

        def bthd(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g).to(device=device, dtype=torch.bfloat16).requires_grad_(True)

        q, k, v = bthd(B, L, H, dk), bthd(B, L, H, dk), bthd(B, L, H, dv)
        log_alpha = F.logsigmoid(torch.randn(B, L, H, generator=g) + 4).to(device).requires_grad_(True)
        log_mu = F.logsigmoid(torch.randn(B, L, H, generator=g) + 2).to(device).requires_grad_(True)
        beta = torch.sigmoid(torch.randn(B, L, H, generator=g) - 2).to(device=device,
                                                                         dtype=torch.bfloat16).requires_grad_(True)
        peers: dict[str, Callable[[], Any]] = {
            "fla.chunk_momentum_delta_rule": lambda: chunk_momentum_delta_rule(
                q, k, v, log_alpha, log_mu, beta=beta, chunk_size=C),
            "fla.chunk_gated_delta_rule": lambda: chunk_gated_delta_rule(
                q, k, v, log_alpha, beta, use_qk_l2norm_in_kernel=True),
        }
        for name, fn in peers.items():
            for mode, run in (("fwd", fn), ("fwd+bwd", _fwd_bwd(fn, [q, k, v, log_alpha, log_mu, beta]))):
                try:
                    ms = _timed(run, args)
                except Exception as failure:  # e.g. fla refuses its gated backward on Hopper with Triton < 3.7.1
                    rows.append(BenchRow(op="titans", impl=f"peer:{name}", params=f"{params} {mode}",
                                         ms=float("nan"), dispatch="triton",
                                         note=f"failed: {type(failure).__name__}: {failure}"[:160]))
                    continue
                rows.append(BenchRow(op="titans", impl=f"peer:{name}", params=f"{params} {mode}", ms=ms,
                                     dispatch="triton", throughput=f"{tokens / ms / 1e3:.3f} Mtok/s"))
    else:
        rows.append(BenchRow(op="titans", impl="peer:fla", params=params, ms=float("nan"),
                             note="flash-linear-attention not importable"))
    if importlib.util.find_spec("titans_pytorch") is not None:
        neural_memory = importlib.import_module("titans_pytorch").NeuralMemory
        mem = neural_memory(dim=H * dk, chunk_size=C, heads=H, dim_head=dk).to(device)
        seq = torch.randn(B, L, H * dk, device=device)

        def titans_fwd() -> Any:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                return mem(seq)

        ms = _timed(titans_fwd, args)
        rows.append(BenchRow(op="titans", impl="peer:titans-pytorch.NeuralMemory", params=f"{params} fwd", ms=ms,
                             dispatch="torch", throughput=f"{tokens / ms / 1e3:.3f} Mtok/s",
                             note="includes its projections and MLP memory defaults"))
    else:
        rows.append(BenchRow(op="titans", impl="peer:titans-pytorch", params=params, ms=float("nan"),
                             note="titans-pytorch not importable"))
    return rows


@register("titans")
def bench_titans(args: BenchArgs) -> list[BenchRow]:
    cuda = args.device.type == "cuda"
    if cuda:
        B, H, dk, dv, C, dtype = 4, 8, 128, 128, 64, torch.bfloat16
        lengths = [2048] if args.quick else [2048, 8192]
        ref_lengths = {2048}
    else:
        B, H, dk, dv, C, dtype = 1, 2, 32, 32, 16, torch.float32
        lengths = [256] if args.quick else [256, 1024]
        ref_lengths = {256}
    peak = float(args.extra.get("peak_tflops", H100_BF16_TFLOPS)) * 1e12
    rows: list[BenchRow] = []
    for L in lengths:
        params = f"B={B} H={H} L={L} dk={dk} dv={dv} C={C} {str(dtype).removeprefix('torch.')}"
        tokens = B * L
        floor_ms = chunk_flops(B, H, L, dk, dv, C) / peak * 1e3
        for grad in (False, True):
            mode = "fwd+bwd" if grad else "fwd"
            inputs = _inputs(B, H, L, dk, dv, dtype, args.device, grad)

            def ours(inputs: list[torch.Tensor] = inputs) -> Any:
                return opt.titans_memory_chunked(*inputs, chunk_size=C)

            run = _fwd_bwd(ours, inputs) if grad else ours
            with torch.set_grad_enabled(grad):
                ms = _timed(run, args)
            dispatch = opt.titans_dispatch(inputs[1], chunk_size=C)
            rows.append(BenchRow(op="titans", impl="optimized", params=f"{params} {mode}", ms=ms,
                                 dispatch=dispatch, throughput=f"{tokens / ms / 1e3:.3f} Mtok/s",
                                 floor_fraction=(floor_ms * (3 if grad else 1)) / ms if cuda else None,
                                 note="backward: Triton kernel" if grad and dispatch == "triton" else ""))
            if dispatch != "torch-chunked":  # the torch form on the same device, for comparison
                def torch_form(inputs: list[torch.Tensor] = inputs) -> Any:
                    return opt.torch_chunked(*inputs, chunk_size=C)

                torch_run = _fwd_bwd(torch_form, inputs) if grad else torch_form
                with torch.set_grad_enabled(grad):
                    torch_ms = _timed(torch_run, args)
                rows.append(BenchRow(op="titans", impl="optimized (torch form)", params=f"{params} {mode}",
                                     ms=torch_ms, dispatch="torch-chunked",
                                     throughput=f"{tokens / torch_ms / 1e3:.3f} Mtok/s",
                                     note=f"{dispatch} is {torch_ms / ms:.1f}x faster"))
            if L in ref_lengths and not grad:
                def literal(inputs: list[torch.Tensor] = inputs) -> Any:
                    return ref.titans_memory_recurrent(*inputs)

                with torch.no_grad():
                    ref_ms = _timed(literal, args, slow=True)
                rows.append(BenchRow(op="titans", impl="reference", params=f"{params} {mode} (per-token)",
                                     ms=ref_ms, dispatch="torch-loop", throughput=f"{tokens / ref_ms / 1e3:.3f} Mtok/s",
                                     note=f"optimized is {ref_ms / ms:.0f}x faster"))
    # the peers last, every length: their autotuning takes minutes, and a run cut short still has all our rows
    for L in lengths if cuda else []:
        params = f"B={B} H={H} L={L} dk={dk} dv={dv} C={C} {str(dtype).removeprefix('torch.')}"
        rows.extend(_peer_rows(B, H, L, dk, dv, C, args, params))
    return rows


def _sweep_at(args: BenchArgs, L: int, knobs: bool) -> list[BenchRow]:
    """`titans_sweep`'s rows at one length (the launch knobs only when `knobs`)."""
    from optimized.kernels.titans import _io_dtype, _kernel_operands, _operands_triton, titans_memory_triton

    B, H, dk, dv, C = 4, 8, 128, 128, 64
    params = f"B={B} H={H} L={L} dk={dk} dv={dv} C={C} bfloat16 fwd"
    inputs = _inputs(B, H, L, dk, dv, torch.bfloat16, args.device, False)
    q, k, v, alpha, eta, theta = inputs
    rows: list[BenchRow] = []

    def operands() -> Any:
        return _kernel_operands(q, k, v, alpha, eta, theta, C, 0.0, _io_dtype(q, k, v))

    def operands_kernel() -> Any:
        return _operands_triton(q, k, v, alpha, eta, theta, C, 0.0, _io_dtype(q, k, v))

    def forward(block_v: int | None = None, warps: int = 4, stages: int = 2, how: str = "triton") -> Any:
        return titans_memory_triton(q, k, v, alpha, eta, theta, chunk_size=C, block_v=block_v, num_warps=warps,
                                    num_stages=stages, operands=how)

    with torch.no_grad():
        operands_ms = _timed(operands, args)
        kernel_ms = _timed(operands_kernel, args)
        default_out = forward()[0].float()
        scale = default_out.abs().max().item() or 1.0
        whole_ms = _timed(forward, args)
        torch_error = (forward(how="torch")[0].float() - default_out).abs().max().item() / scale
        torch_ms = _timed(lambda: forward(how="torch"), args)
    rows.append(BenchRow(op="titans_sweep", impl="optimized: torch operands", params=params, ms=operands_ms,
                         dispatch="torch", note=f"{operands_ms / torch_ms:.0%} of the forward with them"))
    rows.append(BenchRow(op="titans_sweep", impl="optimized: forward (operands=torch)", params=params, ms=torch_ms,
                         dispatch="triton", throughput=f"{B * L / torch_ms / 1e3:.3f} Mtok/s",
                         note=f"max |Δ| / max |y| vs default {torch_error:.1e}"))
    rows.append(BenchRow(op="titans_sweep", impl="optimized: Triton operands", params=params, ms=kernel_ms,
                         dispatch="triton", note=f"{operands_ms / kernel_ms:.1f}x faster than the torch operands"))
    rows.append(BenchRow(op="titans_sweep", impl="optimized: forward (default launch)", params=params, ms=whole_ms,
                         dispatch="triton", throughput=f"{B * L / whole_ms / 1e3:.3f} Mtok/s",
                         note=f"{torch_ms / whole_ms:.2f}x the speed with the torch operands"))
    if not knobs:
        return rows
    timed: list[tuple[float, int, int, int]] = []

    def launch(block_v: int, warps: int, stages: int) -> None:
        label = f"{params} block_v={block_v} warps={warps} stages={stages}"
        try:
            with torch.no_grad():
                error = (forward(block_v, warps, stages)[0].float() - default_out).abs().max().item() / scale
                ms = _timed(lambda: forward(block_v, warps, stages), args)
        except Exception as failure:  # a launch that does not compile or fit: reported, not fatal
            rows.append(BenchRow(op="titans_sweep", impl="optimized:triton", params=label, ms=float("nan"),
                                 dispatch="triton", note=f"failed: {type(failure).__name__}: {failure}"[:200]))
            return
        timed.append((ms, block_v, warps, stages))
        rows.append(BenchRow(op="titans_sweep", impl="optimized:triton", params=label, ms=ms, dispatch="triton",
                             throughput=f"{B * L / ms / 1e3:.3f} Mtok/s",
                             note=f"max |Δ| / max |y| vs default {error:.1e}"))

    for block_v in (16, 32, 64):
        for warps in (2, 4, 8):
            launch(block_v, warps, 2)
    if timed:  # num_stages=1 is refused by the kernels (it faulted on an H200: `_check_stages`)
        _, block_v, warps, _ = min(timed)
        launch(block_v, warps, 3)
    return rows


@register("titans_sweep")
def bench_titans_sweep(args: BenchArgs) -> list[BenchRow]:
    """CUDA only (no rows on CPU): where the Triton forward's time goes and which launch knobs suit this GPU.
    At B=4 H=8 d_k=d_v=128 C=64 bf16 and L ∈ {2048, 8192}: the torch part alone (`_kernel_operands`: the chunk
    coefficients and the state-independent P, Z, y_c) and the forward with them (`operands="torch"`), the same
    two with the operands formed by one Triton launch (the default); then at the longest length the
    forward over value columns per program × warps (2 stages), and the fastest of those at 3 stages, each
    checked against the default launch's output."""
    if args.device.type != "cuda":
        return []
    lengths = [2048] if args.quick else [2048, 8192]
    return [row for L in lengths for row in _sweep_at(args, L, knobs=L == lengths[-1])]
