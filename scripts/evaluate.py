"""Evaluate a trained run on its task: loads OUT/checkpoint.pt and reports loss and accuracy per split.

    python scripts/evaluate.py --out runs/needle_tiny [--split val|test] [--batches 16] [--device auto]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reference.validation import ConfigError, MemarchError
from training.checkpoint import CHECKPOINT_NAME, load_checkpoint, load_model_weights
from training.config import load_experiment
from training.device import resolve_device
from training.loop import evaluate
from training.registry import build_model, get_task_spec, model_name_of, task_name_of


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="run folder holding checkpoint.pt")
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--batches", type=int, default=None, help="number of batches (default train.eval_batches)")
    p.add_argument("--impl", choices=("reference", "optimized"), default=None,
                   help="implementation to evaluate with (default: the one it was trained with)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        state = load_checkpoint(args.out / CHECKPOINT_NAME)
        exp = load_experiment(state["config"])
        if args.batches is not None:
            if args.batches < 1:
                raise ConfigError(f"--batches must be >= 1, got {args.batches}")
            exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, eval_batches=args.batches))
        device = resolve_device(args.device)
        impl = args.impl or str(state.get("impl", "optimized"))
        model = build_model(exp, impl).to(device)
        load_model_weights(model, state, model_name_of(exp.model))
        task = get_task_spec(task_name_of(exp.task)).build(exp.task)
        result = {"step": state["step"], "impl": impl, **evaluate(model, task, exp, device, split=args.split)}
    except MemarchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
