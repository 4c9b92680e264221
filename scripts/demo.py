"""HAMT demo on CPU: build a model, run a forward pass, generate with the carried HCM state, train a few steps.

    python scripts/demo.py                                  # a small model (seconds)
    python scripts/demo.py --config configs/hamt_demo.yaml  # the seed's 21.08M-parameter demo model

Forward and generation use the byte tokenizer on a prompt; training runs `training.loop.train` for `--steps`
steps of the config's task (truncated BPTT when the config sets `train.tbptt_length`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from reference.validation import ConfigError, MemarchError
from training import build_model, load_experiment
from training.config import ExperimentConfig
from training.generation import generate
from training.loop import train
from training.registry import model_name_of
from training.tokenizer import load_tokenizer

SMALL = {
    "model": {"name": "hamt", "vocab_size": 260, "hidden_dim": 64, "hcm_dim": 256, "num_layers": 2, "num_slots": 4,
              "max_seq_len": 512},
    "task": {"name": "text", "files": ["tests/fixtures/tiny_corpus.txt"], "seq_len": 64, "tokenizer": "byte"},
    "train": {"steps": 20, "batch_size": 8, "tbptt_length": 16, "lr": 3e-3, "warmup_steps": 2, "eval_every": 10,
              "eval_batches": 1, "checkpoint_every": 20},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="a HAMT experiment YAML (default: a small model)")
    parser.add_argument("--impl", choices=("reference", "optimized"), default="optimized")
    parser.add_argument("--steps", type=int, default=10, help="training steps to run")
    parser.add_argument("--prompt", default="To be, or not to be")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        if args.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {args.steps}")
        if args.max_tokens < 0:
            raise ConfigError(f"--max-tokens must be >= 0, got {args.max_tokens}")
        exp = load_experiment(args.config if args.config is not None else SMALL)
        if model_name_of(exp.model) != "hamt":
            raise ConfigError(f"--config: the demo runs a HAMT model, got {model_name_of(exp.model)!r} "
                              f"(train other models with scripts/train.py)")
        return run(args, exp)
    except MemarchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, exp: ExperimentConfig) -> int:
    if exp.train.steps < args.steps:
        exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, steps=args.steps))
    torch.manual_seed(0)
    model = build_model(exp.model, args.impl)
    print(f"HAMT ({args.impl}): {sum(p.numel() for p in model.parameters()):,} parameters, {exp.model}")

    tokenizer = load_tokenizer("byte")
    prompt = torch.tensor([tokenizer.encode(args.prompt)])  # (1, P)
    start = time.perf_counter()
    out = model(prompt, return_state=True)
    print(f"forward: logits {tuple(out['logits'].shape)}, aux_loss {float(out['aux_loss'].detach()):.4f}, "
          f"state memory {tuple(out['state'].memory.shape)} in {time.perf_counter() - start:.2f} s")

    start = time.perf_counter()
    ids = generate(model, prompt, args.max_tokens, temperature=0.8, top_k=40, seed=0)
    text = tokenizer.decode(ids[0, prompt.shape[1]:].tolist())
    print(f"generate ({args.max_tokens} tokens with the carried state, untrained): {text!r} "
          f"in {time.perf_counter() - start:.2f} s")

    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        summary = train(exp, impl=args.impl, device=torch.device("cpu"), out_dir=out_dir, max_steps=args.steps,
                        progress=False)
        lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    print(f"train: {summary['steps']} steps in {time.perf_counter() - start:.1f} s, "
          f"loss {summary.get('final_loss')}, {len(lines)} metric records")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
