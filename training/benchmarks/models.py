"""Training-step throughput of registered models: `scripts/bench.py --model NAME|all`.

One step = forward + backward + AdamW update on random tokens. Reported per (impl, compile, autocast, L):
median ms per step, tokens/s, and peak memory (CUDA only). Reference models run a Python loop over time, so
they are timed once, eager fp32, at the lengths in `--ref-seq-lens` only; `summarize` states the
optimized/reference ratio and how the optimized cost per token grows with L.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import yaml

from training.benchmarks import BenchArgs, BenchRow, time_fn
from training.loop import compile_model, loss_and_accuracy, split_output
from training.registry import MODELS, build_model, get_model_spec

BENCH_VOCAB = 256
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's modes


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings (`--set`) -> {key: YAML-parsed value}; a malformed item raises ValueError."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set memory_size=5000")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({err})") from err
    return out


def model_config(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """The model's default config with a small vocabulary (and any overrides); unknown fields raise ValueError."""
    cls = get_model_spec(name).config_cls
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides or {}) - fields)
    if unknown:
        raise ValueError(f"model {name!r} has no config field {unknown[0]!r}; its fields: {', '.join(sorted(fields))}")
    data: dict[str, Any] = {"vocab_size": BENCH_VOCAB} if "vocab_size" in fields else {}
    data.update(overrides or {})
    return cls(**data)


REFERENCE_WARMUP_LEN = 128  # the reference models' warm-up step length (see `time_training_step`)


def step_label(compiled: bool, compile_mode: str | None, amp: bool) -> str:
    """A training step's row label: eager, compile or compile[mode] (a mode other than the default), +bf16."""
    mode = f"[{compile_mode}]" if compile_mode not in (None, "default") else ""
    return (f"compile{mode}" if compiled else "eager") + ("+bf16" if amp else "")


def training_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, device: torch.device, amp: bool,
                  compiled: bool, compile_mode: str | None = None) -> Callable[..., None]:
    """One forward + backward + AdamW step of `model` on (x, y) (or on the (x, y) it is called with) as a
    closure. `compile_mode` is `torch.compile`'s mode (None or "default": its default; "reduce-overhead": the
    compiled forward and backward replayed as CUDA graphs)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd = compile_model(model, compile_mode or "default") if compiled else model
    graphs = compiled and compile_mode == "reduce-overhead"

    def step(x: torch.Tensor = x, y: torch.Tensor = y) -> None:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are dead: replay over them
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits, aux, _ = split_output(fwd(x))
            loss, _ = loss_and_accuracy(logits, y)
            if aux is not None:
                loss = loss + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_training_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, device: torch.device,
                       amp: bool, compiled: bool, warmup: int, repeat: int, warmup_len: int | None = None,
                       compile_mode: str | None = None) -> float:
    """Median ms of one `training_step`. With `warmup_len`, the warm-up steps run on the first `warmup_len`
    positions only (they load the kernels and the allocator's pools; the reference models' full-length steps take
    minutes, and a second one would only repeat the timed one)."""
    step = training_step(model, x, y, device=device, amp=amp, compiled=compiled, compile_mode=compile_mode)
    if warmup_len is not None and warmup_len < x.shape[1]:
        for _ in range(warmup):
            step(x[:, :warmup_len], y[:, :warmup_len])
        warmup = 0
    return time_fn(step, device, warmup=warmup, repeat=repeat)


def bench_model(name: str, args: BenchArgs, *, seq_lens: Sequence[int], batch_size: int,
                ref_seq_lens: Sequence[int] | None = None, compile_modes: Sequence[bool] = (False, True),
                autocast: Sequence[bool] = (False, True), tokens_per_step: int | None = None) -> list[BenchRow]:
    """Rows for the optimized model at every L in `seq_lens` (eager and compiled, fp32 and bf16 autocast on CUDA)
    and for the reference model at `ref_seq_lens` (eager fp32: its Python time loop makes every step slow, so it
    is timed once after one warm-up step at L = 128). A row that runs out of memory is reported as such, not raised.

    With `tokens_per_step` N each row's batch is N // L instead of `batch_size`, so every length does the same work
    per step and the cost per token compares lengths without a per-step fixed cost favouring the long ones."""
    device = args.device
    cfg = model_config(name, args.extra.get("model_overrides"))
    rows: list[BenchRow] = []
    ref_amp = (False, True) if args.extra.get("ref_autocast") and device.type == "cuda" else (False,)
    # the optimized rows first: they take seconds, the reference's minutes, so a run cut off by a time limit keeps
    # every optimized row and the reference rows it reached (shortest L first)
    plan: list[tuple[str, bool, bool, int]] = [
        ("optimized", compiled, amp, L) for compiled in compile_modes for amp in autocast for L in seq_lens
        if not (amp and device.type != "cuda")]
    plan += [("reference", False, amp, L) for amp in ref_amp for L in sorted(ref_seq_lens or seq_lens)
             if not args.extra.get("no_reference")]
    for impl, compiled, amp, L in plan:
        torch.manual_seed(0)
        reference = impl == "reference"
        compile_mode = args.extra.get("compile_mode")
        dispatch = step_label(compiled, compile_mode, amp)
        batch = max(1, tokens_per_step // L) if tokens_per_step else batch_size
        params = f"B={batch} L={L}"
        try:
            model = build_model(cfg, impl).to(device)
            x = torch.randint(0, BENCH_VOCAB, (batch, L), device=device)
            y = torch.randint(0, BENCH_VOCAB, (batch, L), device=device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ms = time_training_step(model, x, y, device=device, amp=amp, compiled=compiled,
                                    warmup=1 if reference else 2, repeat=1 if reference else args.repeat,
                                    warmup_len=REFERENCE_WARMUP_LEN if reference else None,
                                    compile_mode=compile_mode)
        except torch.OutOfMemoryError:
            rows.append(BenchRow(op=f"model:{name}", impl=impl, params=params, ms=float("nan"), dispatch=dispatch,
                                 note="out of memory"))
            model = x = y = None  # type: ignore[assignment]
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        peak = f"peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB" if device.type == "cuda" else ""
        print(f"# {name} {impl} {dispatch} {params}: {ms:.1f} ms {peak}", file=sys.stderr, flush=True)
        rows.append(BenchRow(op=f"model:{name}", impl=impl, params=params, ms=ms, dispatch=dispatch,
                             throughput=f"{batch * L / (ms / 1e3):,.0f} tok/s", note=peak))
        del model, x, y
    return rows


def summarize(rows: Sequence[BenchRow]) -> list[str]:
    """Lines stating, per model, optimized ÷ reference tokens/s at each L where both ran (eager fp32), and the
    optimized eager fp32 cost per token at each L relative to the shortest L (1.0 = flat, i.e. linear total
    cost)."""
    lines: list[str] = []
    for op in dict.fromkeys(r.op for r in rows):
        mine = [r for r in rows if r.op == op and r.dispatch == "eager" and r.ms == r.ms]
        ref = {r.params: r.ms for r in mine if r.impl == "reference"}
        opt = {r.params: r.ms for r in mine if r.impl == "optimized"}
        def tok_s(params: str, ms: float) -> float:
            b, length = (int(v.split("=")[1]) for v in params.split())
            return b * length / ms * 1e3

        for params, ms in ref.items():
            if params in opt:
                lines.append(f"{op} {params}: optimized {ms / opt[params]:.1f}x the reference's tokens/s (eager fp32)")
            for other in (p for p in opt if p != params and "L=2048" in p and not any("L=2048" in r for r in ref)):
                ratio = tok_s(other, opt[other]) / tok_s(params, ms)
                lines.append(f"{op}: optimized at {other} runs {ratio:.1f}x the tokens/s of the reference at {params} "
                             "(eager fp32; the reference's per-token cost does not fall with L)")
        bf16 = [r for r in rows if r.op == op and r.dispatch == "eager+bf16" and r.ms == r.ms]
        ref_bf16 = {r.params: r.ms for r in bf16 if r.impl == "reference"}
        for r in bf16:
            if r.impl == "optimized" and r.params in ref_bf16:
                lines.append(f"{op} {r.params}: optimized {ref_bf16[r.params] / r.ms:.1f}x the reference's tokens/s "
                             "(eager, bf16 autocast)")
        if len(opt) > 1:
            def per_token(params: str, opt: dict[str, float] = opt) -> float:
                b, length = (int(v.split("=")[1]) for v in params.split())
                return opt[params] / (b * length)

            base = min(opt, key=lambda p: int(p.split("L=")[1]))
            growth = ", ".join(f"{p.split()[1]}: {per_token(p) / per_token(base):.2f}"
                               for p in sorted(opt, key=lambda p: int(p.split("L=")[1])))
            lines.append(f"{op} optimized cost per token relative to {base.split()[1]} (eager fp32): {growth}")
    return lines


def bench_models(names: Sequence[str], args: BenchArgs) -> list[BenchRow]:
    if args.quick:
        seq_lens: Sequence[int] = (32, 64)
        batch, ref_lens = 2, [32]
    elif args.device.type == "cuda":
        seq_lens, batch, ref_lens = (1024, 2048, 4096, 16384), 2, [2048]
    else:
        seq_lens, batch, ref_lens = (256, 512), 4, [256]
    seq_lens = args.extra.get("seq_lens") or seq_lens
    ref_lens = args.extra.get("ref_seq_lens") or ref_lens
    rows: list[BenchRow] = []
    for name in names:
        rows.extend(bench_model(name, args, seq_lens=seq_lens, batch_size=args.extra.get("batch_size") or batch,
                                ref_seq_lens=ref_lens, tokens_per_step=args.extra.get("tokens_per_step"),
                                compile_modes=(False,) if args.quick or args.extra.get("no_compile")
                                else (False, True)))
    return rows


def registered_models() -> list[str]:
    return sorted(MODELS)
