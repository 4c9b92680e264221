"""Generate text from a trained run (the seed's quick_inference):

    python scripts/generate.py --model runs/atlas_mag_cpu --prompt "The quick brown fox" --max-tokens 100

`--model` is a run folder (holding checkpoint.pt) or a checkpoint file. The tokenizer is the run's task
tokenizer (byte-level unless the config names a local tokenizer.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from reference.validation import ConfigError, MemarchError
from training.checkpoint import CHECKPOINT_NAME, load_checkpoint, load_model_weights
from training.config import load_experiment
from training.device import resolve_device
from training.generation import generate
from training.registry import build_model, model_name_of
from training.tokenizer import load_tokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="run folder or checkpoint.pt")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impl", choices=("reference", "optimized"), default="optimized")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        if args.max_tokens < 0:
            raise ConfigError(f"--max-tokens must be >= 0, got {args.max_tokens}")
        if args.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0 (0: no truncation), got {args.top_k}")
        if not args.temperature >= 0:
            raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
        path = args.model / CHECKPOINT_NAME if args.model.is_dir() else args.model
        state = load_checkpoint(path)
        exp = load_experiment(state["config"])
        tok_name = getattr(exp.task, "tokenizer", "byte")
        tokenizer = load_tokenizer(tok_name if isinstance(tok_name, str) else "byte")
        device = resolve_device(args.device)
        model = build_model(exp, args.impl).to(device)
        load_model_weights(model, state, model_name_of(exp.model))
        ids = [tokenizer.bos_id, *tokenizer.encode(args.prompt)]
        if max(ids) >= exp.model.vocab_size:
            raise ConfigError(f"the tokenizer's ids exceed the model's vocabulary ({exp.model.vocab_size}); "
                              f"this run was not trained on text with {tok_name!r}")
        prompt = torch.tensor([ids], device=device)
        out = generate(model, prompt, args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                       seed=args.seed, eos_id=tokenizer.eos_id)
    except MemarchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(args.prompt + tokenizer.decode(out[0, len(ids):].tolist()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
