"""Training-step throughput of registered models: `scripts/bench.py --model NAME|all`.

One step = forward + backward + AdamW update on random tokens. Reported per (impl, compile, autocast, L):
median ms per step, tokens/s, and peak memory (CUDA only). Reference models run a Python loop over time, so
they are timed with fewer repetitions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from training.benchmarks import BenchArgs, BenchRow, time_fn
from training.loop import loss_and_accuracy, split_output
from training.registry import MODELS, build_model, get_model_spec

BENCH_VOCAB = 256


def model_config(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """The model's default config with a small vocabulary (and any overrides)."""
    cls = get_model_spec(name).config_cls
    fields = {f.name for f in dataclasses.fields(cls)}
    data: dict[str, Any] = {"vocab_size": BENCH_VOCAB} if "vocab_size" in fields else {}
    data.update(overrides or {})
    return cls(**data)


def time_training_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, device: torch.device,
                       amp: bool, compiled: bool, warmup: int, repeat: int) -> float:
    """Median ms of one forward + backward + AdamW step of `model` on (x, y)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd = torch.compile(model) if compiled else model

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits, aux, _ = split_output(fwd(x))
            loss, _ = loss_and_accuracy(logits, y)
            if aux is not None:
                loss = loss + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return time_fn(step, device, warmup=warmup, repeat=repeat)


def bench_model(name: str, args: BenchArgs, *, seq_lens: Sequence[int], batch_size: int,
                impls: Sequence[str] = ("reference", "optimized"), compile_modes: Sequence[bool] = (False, True),
                autocast: Sequence[bool] = (False, True)) -> list[BenchRow]:
    device = args.device
    cfg = model_config(name, args.extra.get("model_overrides"))
    rows: list[BenchRow] = []
    for impl in impls:
        for compiled in compile_modes:
            if compiled and impl == "reference":
                continue  # compiling a Python time loop unrolls it; not a meaningful configuration
            for amp in autocast:
                if amp and device.type != "cuda":
                    continue
                for L in seq_lens:
                    torch.manual_seed(0)
                    model = build_model(cfg, impl).to(device)
                    x = torch.randint(0, BENCH_VOCAB, (batch_size, L), device=device)
                    y = torch.randint(0, BENCH_VOCAB, (batch_size, L), device=device)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    reference = impl == "reference"
                    ms = time_training_step(model, x, y, device=device, amp=amp, compiled=compiled,
                                            warmup=1 if reference else 2, repeat=1 if reference else args.repeat)
                    peak = (f"peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
                            if device.type == "cuda" else "")
                    rows.append(BenchRow(
                        op=f"model:{name}", impl=impl, params=f"B={batch_size} L={L}", ms=ms,
                        dispatch=("compile" if compiled else "eager") + ("+bf16" if amp else ""),
                        throughput=f"{batch_size * L / (ms / 1e3):,.0f} tok/s", note=peak))
    return rows


def bench_models(names: Sequence[str], args: BenchArgs) -> list[BenchRow]:
    if args.quick:
        seq_lens: Sequence[int] = (32, 64)
        batch = 2
    elif args.device.type == "cuda":
        seq_lens, batch = (1024, 2048, 4096), 8
    else:
        seq_lens, batch = (256, 512), 4
    seq_lens = args.extra.get("seq_lens") or seq_lens
    rows: list[BenchRow] = []
    for name in names:
        rows.extend(bench_model(name, args, seq_lens=seq_lens, batch_size=args.extra.get("batch_size") or batch,
                                compile_modes=(False,) if args.quick or args.extra.get("no_compile")
                                else (False, True)))
    return rows


def registered_models() -> list[str]:
    return sorted(MODELS)
