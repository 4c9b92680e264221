"""Host syncs in the backward pass: an `item()` (a device-to-host copy) in backward stops a GPU from running ahead
of the host for the rest of the step. The optimized non-DEQ models' backward must make none; the profiler sees
them on the CPU as `aten::_local_scalar_dense`. (Forward input checks sync on purpose — token-id range — and the
DEQ models' solvers check convergence by design; torch's cumprod backward was the sync this test was written
for: `optimized.vsa.decay_products`.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from training import load_experiment
from training.registry import build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("config", "vocab"), [("gru_text_tiny.yaml", 30), ("atlas_mag_tiny.yaml", 30),
                                               ("hamt_recall_cpu.yaml", 30), ("atlas_modular_cpu.yaml", 20)])
def test_optimized_backward_makes_no_host_sync(config: str, vocab: int) -> None:
    torch.manual_seed(0)
    model = build_model(load_experiment(ROOT / "configs" / config).model, "optimized")
    out = model(torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(0)))
    logits = out["logits"] if isinstance(out, dict) else out
    aux = out.get("aux_loss") if isinstance(out, dict) else None
    loss = logits.float().mean() + (aux if isinstance(aux, torch.Tensor) else 0.0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss.backward()
    syncs = [e.cpu_parent.name if e.cpu_parent is not None else "" for e in prof.events()
             if e.name == "aten::_local_scalar_dense"]
    assert not syncs, syncs
    assert any(p.grad is not None for p in model.parameters())
