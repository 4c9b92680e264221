"""Benchmark ops and models: reference vs optimized (and installed peers), one Markdown table per op.

    python scripts/bench.py --op swa            # one op
    python scripts/bench.py --op all --json out.json
    python scripts/bench.py --model gru         # training-step throughput of a registered model (or `all`)
    python scripts/bench.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from training.benchmarks import PROGRESS, BenchArgs, discover, format_table
from training.benchmarks.models import (
    COMPILE_MODES,
    bench_models,
    model_config,
    parse_overrides,
    registered_models,
    summarize,
)
from training.device import resolve_device


def main(argv: list[str] | None = None) -> int:
    registry = discover()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", default=None, help=f"one of: all, {', '.join(registry)} (default all, unless --model)")
    parser.add_argument("--model", default=None,
                        help=f"model throughput: all or one of {', '.join(registered_models())}")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None, help="sequence lengths for --model")
    parser.add_argument("--ref-seq-lens", type=int, nargs="+", default=None,
                        help="--model: lengths at which the (slow) reference model is timed (default: 2048 on CUDA)")
    parser.add_argument("--no-reference", action="store_true",
                        help="--model: optimized rows only (the reference was timed in an earlier run)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size for --model")
    parser.add_argument("--tokens-per-step", type=int, default=None, metavar="N",
                        help="--model: batch N // L at each length L instead of one batch size, so that every "
                             "length does the same work per step (cost per token without a fixed per-step cost)")
    parser.add_argument("--ref-autocast", action="store_true",
                        help="--model: also time the reference under bf16 autocast (CUDA)")
    parser.add_argument("--no-compile", action="store_true", help="--model: skip the torch.compile rows")
    parser.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                        help="--model: torch.compile's mode for the compile rows (default: its default mode); "
                             "reduce-overhead replays the step's kernels as CUDA graphs, for steps bound by the host's "
                             "kernel launches")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="--model: override a field of the model's config (YAML value), e.g. --set "
                             "memory_size=5000 --set disable_memory=true; repeatable")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
    parser.add_argument("--quick", action="store_true", help="small sizes (for tests and smoke runs)")
    parser.add_argument("--repeat", type=int, default=10, help="timed repetitions (median reported)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--list", action="store_true", help="list the registered ops and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(registry))
        return 0
    op = args.op if args.op is not None else ("all" if args.model is None else None)
    names = [] if op is None else list(registry) if op == "all" else [op]
    unknown = [n for n in names if n not in registry]
    if unknown:
        parser.error(f"--op {unknown[0]!r} is not a registered benchmark; choose one of: all, {', '.join(registry)}")
    models = [] if args.model is None else registered_models() if args.model == "all" else [args.model]
    bad_models = [m for m in models if m not in registered_models()]
    if bad_models:
        parser.error(f"--model {bad_models[0]!r} is not registered; "
                     f"choose one of: all, {', '.join(registered_models())}")
    if args.tokens_per_step is not None:
        if args.batch_size is not None:
            parser.error("--tokens-per-step sets the batch at each length; leave out --batch-size")
        longest = max(args.seq_lens or [1])
        if args.tokens_per_step < longest:
            parser.error(f"--tokens-per-step {args.tokens_per_step} is less than the longest --seq-lens {longest}: "
                         "each step needs at least one whole sequence")
    try:
        overrides = parse_overrides(args.overrides)
        for name in models:
            model_config(name, overrides)  # unknown keys and bad values fail here, before any timing
    except ValueError as err:
        parser.error(str(err))
    device = resolve_device(args.device)
    PROGRESS["enabled"] = True
    bench_args = BenchArgs(device=device, quick=args.quick, repeat=args.repeat,
                           extra={"seq_lens": args.seq_lens, "batch_size": args.batch_size,
                                  "ref_seq_lens": args.ref_seq_lens, "no_compile": args.no_compile,
                                  "no_reference": args.no_reference, "model_overrides": overrides,
                                  "ref_autocast": args.ref_autocast, "tokens_per_step": args.tokens_per_step,
                                  "compile_mode": args.compile_mode})
    machine = (f"{platform.machine()} {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
               f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"# memarch bench on {machine}")
    # the MEMARCH_* switches change which code path runs (kernels off, the scan's backward, the memory schedule)
    settings = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MEMARCH_")}
    if settings:
        print("# settings: " + " ".join(f"{k}={v}" for k, v in settings.items()))
    all_rows = []
    for name in names:
        rows = registry[name](bench_args)
        all_rows.extend(rows)
        print(f"\n## {name}\n")
        print(format_table(rows) if rows else f"(no rows on {device.type}: this benchmark needs CUDA)", flush=True)
    for name in models:
        rows = bench_models([name], bench_args)
        all_rows.extend(rows)
        print(f"\n## model {name} (training step: forward + backward + AdamW)\n")
        print(format_table(rows))
        print("\n".join(f"- {line}" for line in summarize(rows)), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": machine, "device": str(device), "settings": settings,
                   "rows": [r.as_dict() for r in all_rows]}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
