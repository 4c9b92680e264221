"""Graph breaks under `torch.compile`: the attention-free models whose forward has no data-dependent control flow
trace into one graph (a break splits the compiled step and, on a GPU, costs a host round trip per break).
`torch._dynamo.explain` traces without compiling, so this runs on the CPU in seconds. The DEQ models (EMMA,
unified) break by design at their solvers' convergence checks; the GRU baseline at `nn.GRU` (dynamo does not
trace the cuDNN RNN)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training import load_experiment
from training.registry import build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("config", "vocab"), [("hamt_recall_cpu.yaml", 30), ("atlas_mag_tiny.yaml", 30),
                                               ("atlas_modular_cpu.yaml", 20)])
def test_optimized_forward_traces_without_graph_breaks(config: str, vocab: int) -> None:
    import torch._dynamo as dynamo

    dynamo.reset()
    model = build_model(load_experiment(ROOT / "configs" / config).model, "optimized")
    x = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(0))

    def loss(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        aux = out.get("aux_loss")
        return out["logits"].float().mean() + (aux if isinstance(aux, torch.Tensor) else 0.0)

    report = dynamo.explain(loss)(x)
    reasons = [(str(r.reason).splitlines()[0], r.user_stack[-1].filename if r.user_stack else "")
               for r in report.break_reasons]
    assert report.graph_break_count == 0, reasons
