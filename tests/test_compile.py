"""Graph breaks under `torch.compile`: the attention-free models whose forward has no data-dependent control flow
trace into one graph (a break splits the compiled step and, on a GPU, costs a host round trip per break).
`torch._dynamo.explain` traces without compiling, so this runs on the CPU in seconds. The DEQ models (EMMA,
unified) break by design at their solvers' convergence checks; the GRU baseline at `nn.GRU` (dynamo does not
trace the cuDNN RNN)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from training import load_experiment
from training.registry import build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("config", "vocab"), [("hamt_recall_cpu.yaml", 30), ("atlas_mag_tiny.yaml", 30),
                                               ("atlas_modular_cpu.yaml", 20)])
def test_optimized_forward_traces_without_graph_breaks(config: str, vocab: int) -> None:
    assert_no_graph_breaks(config, vocab, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize(("config", "vocab"), [("hamt_recall_cpu.yaml", 30), ("atlas_mag_tiny.yaml", 30),
                                               ("atlas_modular_cpu.yaml", 20)])
def test_optimized_forward_traces_without_graph_breaks_on_cuda(config: str, vocab: int) -> None:
    """On CUDA the memories take their Triton kernels (Omega, Titans) and the batched memory schedule: a
    compiled training step should still be one graph."""
    assert_no_graph_breaks(config, vocab, torch.device("cuda"))


def assert_no_graph_breaks(config: str, vocab: int, device: torch.device) -> None:
    import torch._dynamo as dynamo

    dynamo.reset()
    model = build_model(load_experiment(ROOT / "configs" / config).model, "optimized").to(device)
    x = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(0)).to(device)

    def loss(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        aux = out.get("aux_loss")
        return out["logits"].float().mean() + (aux if isinstance(aux, torch.Tensor) else 0.0)

    report = dynamo.explain(loss)(x)
    reasons = [(str(r.reason).splitlines()[0], r.user_stack[-1].filename if r.user_stack else "")
               for r in report.break_reasons]
    assert report.graph_break_count == 0, reasons


@pytest.mark.parametrize("method", ["loop", "batched"])
def test_hamt_memory_schedules_trace_without_graph_breaks(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both `decayed_cumsum` schedules ([VSA-16b]; the batched one is the GPU default) over several chunks: 60
    positions in chunks of 8 (a padded last chunk, then the batched form's second level over the chunk ends)."""
    import torch._dynamo as dynamo

    monkeypatch.setenv("MEMARCH_DECAYED_CUMSUM", method)
    dynamo.reset()
    config = dataclasses.replace(load_experiment(ROOT / "configs" / "hamt_recall_cpu.yaml").model, chunk_size=8)
    model = build_model(config, "optimized")
    x = torch.randint(0, 30, (1, 60), generator=torch.Generator().manual_seed(0))
    report = dynamo.explain(lambda x: model(x)["logits"].float().mean())(x)
    assert report.graph_break_count == 0, [str(r.reason).splitlines()[0] for r in report.break_reasons]
