"""Benchmark registry for `scripts/bench.py`.

Each module in this package registers one or more ops with `@register("name")`; a benchmark is a function
`(BenchArgs) -> list[BenchRow]`. Modules are discovered automatically, so adding a benchmark never edits a
shared file.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["BenchArgs", "BenchRow", "copy_bandwidth", "copy_row", "discover", "format_table", "register", "sync_device",
           "time_fn"]


PROGRESS = {"enabled": False}  # print each BenchRow to stderr when it is made (set by scripts/bench.py)


@dataclass(frozen=True)
class BenchArgs:
    device: torch.device
    quick: bool = False
    repeat: int = 10
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchRow:
    op: str
    impl: str  # "reference", "optimized", or "peer:<name>"
    params: str  # the sizes, e.g. "B=4 L=1024 D=64 w=128"
    ms: float
    dispatch: str = ""  # which code path ran (e.g. "sdpa-blocked", "triton", "mamba_ssm.cuda")
    throughput: str = ""  # e.g. "512 GB/s" or "1.2e6 tok/s"
    floor_fraction: float | None = None  # fraction of the hardware floor, where one is defined
    note: str = ""

    def __post_init__(self) -> None:
        # Progress (`scripts/bench.py` turns it on): every row goes to stderr as soon as it is measured, so a run
        # cut off by a time limit keeps the rows it finished (the Markdown table comes at the end of each op).
        if not PROGRESS["enabled"]:
            return
        ms = f"{self.ms:.3f} ms" if self.ms == self.ms else "—"
        print(f"# row: {self.op} | {self.impl} | {self.params} | {ms} | {self.dispatch} | {self.throughput} | "
              f"{self.note}", file=sys.stderr, flush=True)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Bench = Callable[[BenchArgs], list[BenchRow]]
_REGISTRY: dict[str, Bench] = {}


def register(name: str) -> Callable[[Bench], Bench]:
    def deco(fn: Bench) -> Bench:
        if name in _REGISTRY:
            raise ValueError(f"benchmark {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn
    return deco


def discover() -> dict[str, Bench]:
    """Import every module of this package and return the registry."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return dict(sorted(_REGISTRY.items()))


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, *, warmup: int = 2, repeat: int = 10,
            streamed: bool = False) -> float:
    """Median wall time of `fn()` in milliseconds (CUDA-synchronised on GPU after each call).

    `streamed` (CUDA): the calls are issued back to back, as a training loop issues them, and timed by CUDA events
    in 5 rounds of `repeat` calls (the median round's mean): the host's Python work for one call overlaps the
    device's work on the previous one, so a kernel's row measures the device, not its launcher, wherever the device
    takes longer than the host."""
    for _ in range(warmup):
        fn()
    sync_device(device)
    if streamed and device.type == "cuda":
        rounds = []
        for _ in range(5):
            first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            first.record()
            for _ in range(max(1, repeat)):
                fn()
            last.record()
            last.synchronize()
            rounds.append(first.elapsed_time(last) / max(1, repeat))
        return sorted(rounds)[2]
    times = []
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        fn()
        sync_device(device)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(device: torch.device, repeat: int, streamed: bool = False) -> float:
    """Device copy bandwidth in GB/s (read + write), `dst.copy_(src)` on 256 MiB of float32: the memory floor's
    bandwidth, measured in the run whose rows it divides (timed as they are: `time_fn`'s `streamed`)."""
    src = torch.empty(2**26, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device, repeat=repeat, streamed=streamed)
    return 2 * src.numel() * 4 / (ms / 1e3) / 1e9


def copy_row(op: str, device: torch.device, repeat: int, streamed: bool = False) -> tuple[BenchRow, float]:
    """`copy_bandwidth` measured now, and the row that reports it (the floor of the op's rows that follow)."""
    gbps = copy_bandwidth(device, repeat, streamed)
    return BenchRow(op=op, impl="peer:copy", params="256 MiB fp32", ms=2 * 2**28 / gbps / 1e6,
                    dispatch="dst.copy_(src)", throughput=f"{gbps:.0f} GB/s", floor_fraction=1.0,
                    note="read + write; the floor for the rows below"), gbps


def format_table(rows: list[BenchRow]) -> str:
    headers = ["op", "impl", "params", "ms", "dispatch", "throughput", "floor", "note"]
    cells = [[r.op, r.impl, r.params, f"{r.ms:.3f}" if r.ms == r.ms else "—", r.dispatch, r.throughput,
              "" if r.floor_fraction is None else f"{r.floor_fraction:.2f}", r.note] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    return "\n".join([line, sep, *body])
