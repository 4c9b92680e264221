"""Train any registered model on its task.

    python scripts/train.py --impl optimized                       # embedded default: GRU on a small needle task
    python scripts/train.py --impl optimized --config configs/needle_tiny.yaml --device auto --out runs/tiny
    python scripts/train.py --config configs/needle_tiny.yaml --out runs/tiny --resume   # continue a run
    python scripts/train.py --config configs/needle_tiny.yaml --set model.hidden_dim=256 --set train.lr=1e-3
    torchrun --nproc-per-node 4 scripts/train.py --config configs/atlas_mag_small.yaml [--fsdp]   # DDP / FSDP2

Writes `metrics.jsonl` (one line per step), `checkpoint.pt` (atomic, every `train.checkpoint_every` steps,
at the end and on Ctrl-C/SIGTERM) and `summary.json` to `--out`, and prints the final task accuracy.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reference.validation import MemarchError
from training.config import apply_overrides, load_experiment, load_yaml
from training.device import resolve_device
from training.distributed import init_distributed, shutdown
from training.loop import train

# Finishes on a 2-core laptop CPU in about a minute and reaches > 90% validation accuracy.
DEFAULT_CONFIG: dict[str, Any] = {
    "model": {"name": "gru", "embed_dim": 64, "hidden_dim": 128, "num_layers": 1},
    "task": {"name": "needle", "n_needles": 2, "seq_len": 24, "num_keys": 8, "num_values": 8, "num_filler": 8},
    "train": {"steps": 3000, "batch_size": 64, "lr": 3e-3, "warmup_steps": 50, "schedule": "cosine",
              "eval_every": 500, "eval_batches": 8, "checkpoint_every": 500, "seed": 0},
}


# The flags of the seeds' own training scripts, mapped onto config keys.
ALIASES: dict[str, tuple[str, type]] = {
    "batch-size": ("train.batch_size", int),
    "gradient-accumulation-steps": ("train.grad_accum_steps", int),
    "lr": ("train.lr", float),
    "steps": ("train.steps", int),
    # Atlas-MAG's train_smollm.py
    "dim": ("model.dim", int),
    "layers": ("model.num_layers", int),
    "heads": ("model.num_heads", int),
    "disable-memory": ("model.disable_memory", bool),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=("reference", "optimized"), default="optimized")
    p.add_argument("--config", type=Path, default=None, help="experiment YAML (default: the embedded config)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps (default auto)")
    p.add_argument("--max-steps", type=int, default=None, help="stop at this global step (schedule unchanged)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--seed", type=int, default=None, help="override train.seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters with FSDP2 fully_shard instead of DDP")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set model.hidden_dim=256 (repeatable)")
    seed_flags = p.add_argument_group("seed-script aliases (shorthands for --set)")
    for flag, (key, kind) in ALIASES.items():
        if kind is bool:
            seed_flags.add_argument(f"--{flag}", action="store_true", default=None, help=f"--set {key}=true")
        else:
            seed_flags.add_argument(f"--{flag}", type=kind, default=None, help=f"--set {key}=VALUE")
    seed_flags.add_argument("--output-dir", type=Path, default=None, help="same as --out")
    return p.parse_args(argv)


def overrides_from(args: argparse.Namespace) -> list[str]:
    """--set items plus the alias flags that were given, in that order (aliases win)."""
    items = list(args.overrides)
    for flag, (key, kind) in ALIASES.items():
        value = getattr(args, flag.replace("-", "_"))
        if value is not None:
            items.append(f"{key}={'true' if kind is bool else value}")
    return items


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        raw = load_yaml(args.config) if args.config is not None else DEFAULT_CONFIG
        source = str(args.config) if args.config else "<embedded default>"
        exp = load_experiment(apply_overrides(raw, overrides_from(args)), seed=args.seed, source=source)
        out = args.out or args.output_dir or Path("runs") / (args.config.stem if args.config else "default")
        dist, device_name = init_distributed(args.device, fsdp=args.fsdp)
        device = resolve_device(device_name)
        try:
            summary = train(exp, impl=args.impl, device=device, out_dir=out, max_steps=args.max_steps,
                            resume=args.resume, progress=not args.no_progress, dist=dist)
        finally:
            shutdown(dist)
    except MemarchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not dist.is_main:
        return 0
    short = {k: summary[k] for k in ("status", "steps", "impl", "device", "model", "final_loss",
                                     "val_loss", "val_accuracy", "wall_time_s",
                                     "train_tokens_per_s", "peak_memory_mib") if k in summary}
    print(json.dumps(short, indent=2))
    if "val_accuracy" in summary:
        print(f"task accuracy (val): {summary['val_accuracy']:.4f}  — run folder: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
