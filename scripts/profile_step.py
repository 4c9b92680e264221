"""Profile one training step of a registered model (forward + backward + AdamW) and print the top kernels.

    python scripts/profile_step.py --model unified --seq-len 1024 --batch-size 2 [--device cuda] [--impl optimized]
    python scripts/profile_step.py --model atlas_mag --set vocab_size=32000 --seq-len 2048 --autocast --compile

Where `scripts/bench.py --model` says a model is slow, this says which ops the time goes to: the top ops by self
time on the device (CUDA) or the CPU, and how much of the step the device was busy (a step whose device time is
far below its wall time is bound by the host: launches, Python, syncs).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd import DeviceType  # type: ignore[attr-defined]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.benchmarks import sync_device, time_fn
from training.benchmarks.models import (
    BENCH_VOCAB,
    COMPILE_MODES,
    model_config,
    parse_overrides,
    step_label,
    training_step,
)
from training.device import resolve_device
from training.registry import MODELS, build_model


def host_and_wall_ms(step: Callable[[], None], device: torch.device, repeat: int) -> tuple[float, float]:
    """Median (host, wall) ms of `step()`: host until it returns, wall until the device has finished too."""
    host, wall = [], []
    for _ in range(repeat):
        sync_device(device)
        start = time.perf_counter()
        step()
        host.append((time.perf_counter() - start) * 1e3)
        sync_device(device)
        wall.append((time.perf_counter() - start) * 1e3)
    return sorted(host)[repeat // 2], sorted(wall)[repeat // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--impl", default="optimized", choices=("reference", "optimized"))
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast (CUDA), as bench.py's +bf16 rows")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model, as bench.py's compile rows")
    parser.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                        help="torch.compile's mode (implies --compile), as bench.py --compile-mode")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the model's config (YAML value); repeatable")
    args = parser.parse_args(argv)
    if args.seq_len < 1 or args.batch_size < 1:
        parser.error("--seq-len and --batch-size must be >= 1")
    try:
        cfg = model_config(args.model, parse_overrides(args.overrides))
    except ValueError as err:
        parser.error(str(err))
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = build_model(cfg, args.impl).to(device)
    x = torch.randint(0, BENCH_VOCAB, (args.batch_size, args.seq_len), device=device)
    y = torch.randint(0, BENCH_VOCAB, (args.batch_size, args.seq_len), device=device)
    if args.autocast and device.type != "cuda":
        parser.error("--autocast profiles bf16 autocast on CUDA; this device is " + device.type)
    compile_mode = args.compile_mode
    compiled = args.compile or compile_mode is not None
    step = training_step(model, x, y, device=device, amp=args.autocast, compiled=compiled, compile_mode=compile_mode)
    for _ in range(3):  # warm up (and compile; CUDA graphs record on their second call)
        step()
    host, wall = host_and_wall_ms(step, device, repeat=5)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        ms = time_fn(step, device, warmup=0, repeat=1)
    label = step_label(compiled, compile_mode, args.autocast)
    print(f"# {args.model} {args.impl} {label} B={args.batch_size} L={args.seq_len} on {device}: "
          f"{wall:.1f} ms per step ({ms:.1f} ms under the profiler)")
    # the host returns from a step once it has queued the step's kernels: a step whose host time is close to its
    # wall time was paced by Python and the launches, not by the device
    print(f"# host issued the step in {host:.1f} ms of its {wall:.1f} ms ({host / wall:.0%})")
    events = prof.key_averages()
    if device.type == "cuda":
        # the kernels' own rows only: an op's row repeats its kernels' time as its own self device time
        busy = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e3
        print(f"# device busy {busy:.1f} ms of the profiled step's {ms:.1f} ms ({busy / ms:.0%})")
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=key, row_limit=args.rows, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
