"""Analyse an Atlas-MAG checkpoint: gate statistics and memory norms per layer, on a few validation batches.

    python scripts/analyze_checkpoint.py --model runs/atlas_54m [--batches 2] [--batch-size 4] [--device auto]

`--model` is a run folder holding checkpoint.pt or the checkpoint file itself. Prints JSON: per layer the MAG
gate g = σ(m) (mean, std, fraction < 0.1 or > 0.9, polarization mean(1 − |2g − 1|)), the mean γ gate of the
Omega rule, the persistent tokens' RMS, ‖M_persistent‖_F and norm_persistent ([MAG-4]); and the model-level
summary the trainer logs ([MAG-9]).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from reference.atlas_mag import AtlasMAG, AtlasMAGConfig, MAGBlock, gate_statistics
from reference.validation import ConfigError, MemarchError
from training.checkpoint import CHECKPOINT_NAME, load_checkpoint, load_model_weights
from training.config import load_experiment
from training.device import resolve_device
from training.registry import build_model, get_task_spec, model_name_of, task_name_of


def layer_report(block: MAGBlock, captured: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    report: dict[str, Any] = {"persistent_rms": float(block.persistent.pow(2).mean().sqrt())
                              if block.persistent.numel() else 0.0}
    memory = block.memory
    if memory is None:
        return report | {"memory": "disabled"}
    if block.persistent.shape[0] > 0:
        k_p = memory.k_proj(block.persistent).view(-1, memory.num_heads, memory.head_dim).transpose(0, 1)
        M_p, n_p = memory.persistent_fn(k_p)
        report["M_persistent_fro"] = [float(x) for x in M_p.flatten(1).norm(dim=1)]
        report["norm_persistent"] = [float(x) for x in n_p]
    gates = [torch.sigmoid(m) for m, _ in captured]
    report.update({k: float(v) for k, v in gate_statistics(gates).items()})
    report["omega_gate_mean"] = float(torch.cat([gg.reshape(-1) for _, gg in captured]).mean())
    return report


def analyze(model: AtlasMAG, batches: list[torch.Tensor]) -> dict[str, Any]:
    captured: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in range(len(model.blocks))}
    handles = []
    for i, block in enumerate(model.blocks):
        assert isinstance(block, MAGBlock)
        if block.memory is not None:
            def hook(module: torch.nn.Module, inputs: Any, output: Any, i: int = i) -> None:
                captured[i].append((output[0].detach().float(), output[1].detach().float()))
            handles.append(block.memory.register_forward_hook(hook))
    model.eval()
    summary: dict[str, float] = {}
    with torch.no_grad():
        for x in batches:
            out = model(x)
            metrics = out["metrics"]
            assert isinstance(metrics, dict)
            summary = {k: float(v) for k, v in metrics.items()}
    for h in handles:
        h.remove()
    layers = []
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            assert isinstance(block, MAGBlock)
            layers.append(layer_report(block, captured[i]))
    return {"layers": layers, "last_batch": summary}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="run folder holding checkpoint.pt, or the file")
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--impl", choices=("reference", "optimized"), default="optimized")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        path = args.model / CHECKPOINT_NAME if args.model.is_dir() else args.model
        state = load_checkpoint(path)
        exp = load_experiment(state["config"])
        if not isinstance(exp.model, AtlasMAGConfig):
            raise ConfigError(f"--model: {path} holds a {model_name_of(exp.model)!r} model, not atlas_mag")
        if args.batches < 1 or args.batch_size < 1:
            raise ConfigError(f"--batches and --batch-size must be >= 1, got {args.batches}, {args.batch_size}")
        device = resolve_device(args.device)
        model = build_model(exp, args.impl).to(device)
        load_model_weights(model, state, model_name_of(exp.model))
        assert isinstance(model, AtlasMAG)
        task = get_task_spec(task_name_of(exp.task)).build(exp.task)
        xs = [task.batch("val", i, args.batch_size, exp.train.seed)[0].to(device) for i in range(args.batches)]
        result = {"checkpoint": str(path), "step": state["step"], **analyze(model, xs)}
    except MemarchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
