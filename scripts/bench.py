"""Benchmark ops and models: reference vs optimized (and installed peers), one Markdown table per op.

    python scripts/bench.py --op swa            # one op
    python scripts/bench.py --op all --json out.json
    python scripts/bench.py --list
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from training.benchmarks import BenchArgs, discover, format_table
from training.device import resolve_device


def main(argv: list[str] | None = None) -> int:
    registry = discover()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", default="all", help=f"one of: all, {', '.join(registry)}")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
    parser.add_argument("--quick", action="store_true", help="small sizes (for tests and smoke runs)")
    parser.add_argument("--repeat", type=int, default=10, help="timed repetitions (median reported)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--list", action="store_true", help="list the registered ops and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(registry))
        return 0
    names = list(registry) if args.op == "all" else [args.op]
    unknown = [n for n in names if n not in registry]
    if unknown:
        parser.error(f"--op {unknown[0]!r} is not a registered benchmark; choose one of: all, {', '.join(registry)}")
    device = resolve_device(args.device)
    bench_args = BenchArgs(device=device, quick=args.quick, repeat=args.repeat)
    machine = (f"{platform.machine()} {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
               f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"# memarch bench on {machine}")
    all_rows = []
    for name in names:
        rows = registry[name](bench_args)
        all_rows.extend(rows)
        print(f"\n## {name}\n")
        print(format_table(rows), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": machine, "device": str(device), "rows": [r.as_dict() for r in all_rows]}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
