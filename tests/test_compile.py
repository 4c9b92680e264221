"""Graph breaks under `torch.compile`: the attention-free models whose forward has no data-dependent control flow
trace into one graph (a break splits the compiled step and, on a GPU, costs a host round trip per break).
`torch._dynamo.explain` traces without compiling, so this runs on the CPU in seconds. The DEQ models (EMMA,
unified) break by design at their solvers' convergence checks; the GRU baseline at `nn.GRU` (dynamo does not
trace the cuDNN RNN)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
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


def model_and_tokens(config: str, vocab: int, device: torch.device) -> tuple[torch.nn.Module, torch.Tensor]:
    """The optimized model of `configs/<config>` on `device` and a (2, 48) batch of token ids below `vocab`."""
    model = build_model(load_experiment(ROOT / "configs" / config).model, "optimized").to(device)
    return model, torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(0)).to(device)


def assert_no_graph_breaks(config: str, vocab: int, device: torch.device) -> None:
    import torch._dynamo as dynamo

    dynamo.reset()
    model, x = model_and_tokens(config, vocab, device)

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


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize(("config", "vocab"), [("atlas_mag_tiny.yaml", 30), ("atlas_modular_cpu.yaml", 20),
                                               ("hamt_recall_cpu.yaml", 30)])
def test_compiled_training_step_matches_eager_on_cuda(config: str, vocab: int, amp: bool) -> None:
    """`torch.compile` (inductor) builds the Triton kernels' launches into its own code: the seventh session's
    compiled Atlas-MAG step failed to build (inductor passed the Omega kernel's Python-float arguments as float64
    scalars). The compiled loss and gradients equal eager ones. fp32: within inductor's reassociation of reductions,
    1e-4 relative on the loss and 1e-3 of the largest gradient entry per parameter. Under bf16 autocast the two
    round differently (inductor keeps some intermediates in float32 that eager rounds to bf16), and a small
    gradient that is a sum over every position with cancellation (a bias's) can differ by several percent between
    two bf16 runs (the eighth session's GPU run: 8e-5 of a 1e-3 gradient). So there, as flash-attention's tests do,
    both are measured against the fp32 eager step: the compiled error is at most twice eager's plus 1e-2 of the
    largest entry (a compiled step that computed something else is off by the order of the value itself)."""
    torch.manual_seed(0)
    model, x = model_and_tokens(config, vocab, torch.device("cuda"))

    def loss_fn(bf16: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        def loss(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                out = model(x)
                aux = out.get("aux_loss")
                return out["logits"].float().square().mean() + (aux if isinstance(aux, torch.Tensor) else 0.0)
        return loss

    def loss_and_grads(fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        value = fn(x)
        value.backward()
        return value.detach(), [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                                for p in model.parameters()]

    torch._dynamo.reset()
    eager, eager_grads = loss_and_grads(loss_fn(amp))
    compiled, compiled_grads = loss_and_grads(torch.compile(loss_fn(amp)))
    names = [name for name, _ in model.named_parameters()]
    if not amp:
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=0.0)
        for name, g_c, g_e in zip(names, compiled_grads, eager_grads, strict=True):
            assert (g_c - g_e).abs().max().item() <= 1e-3 * g_e.abs().max().item() + 1e-12, name
        return
    truth, truth_grads = loss_and_grads(loss_fn(False))
    assert (compiled - truth).abs().item() <= 2 * (eager - truth).abs().item() + 1e-2 * truth.abs().item()
    for name, g_c, g_e, g_t in zip(names, compiled_grads, eager_grads, truth_grads, strict=True):
        err_c, err_e = (g_c - g_t).abs().max().item(), (g_e - g_t).abs().max().item()
        assert err_c <= 2 * err_e + 1e-2 * g_t.abs().max().item() + 1e-12, (name, err_c, err_e)


@pytest.mark.parametrize("composed", [True, False], ids=["composed", "recomputing"])
def test_titans_kernel_branch_traces_without_graph_breaks_when_composed(composed: bool,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The Titans memory's Triton branch as a compiled model meets it (CUDA only, so here its two launchers are
    stubbed by torch ops of the same shapes, its operands kernel by their torch form, and the dispatch is forced):
    the composed form `torch.compile` takes traces into one graph; the recomputing form, whose backward calls
    autograd (`requires_grad_`, `autograd.grad`), breaks it — the break the CUDA test above found on the GPU
    (`requires_grad_` there, `autograd.grad` here, where dynamo gets further with the stubs)."""
    import torch._dynamo as dynamo

    from optimized import titans as opt_titans
    from optimized.kernels import titans as kernels

    def state_pass(operands: tuple[torch.Tensor, ...], M: torch.Tensor, S: torch.Tensor, out_dtype: torch.dtype,
                   **_: object) -> tuple[torch.Tensor, ...]:
        v_io, P = operands[1:3]
        B, H, N, C = P.shape[:4]
        y = (P.float().sum(-1, keepdim=True) * v_io.float().reshape(B, H, N, C, -1)).reshape(B, H, N * C, -1)
        states = M[:, :, None].expand(B, H, N, *M.shape[2:]).contiguous()
        return y.to(out_dtype), M + 1, S + 1, states, states

    def backward_kernel(operands: tuple[torch.Tensor, ...], Ms: torch.Tensor, Ss: torch.Tensor, dy: torch.Tensor,
                        dM: torch.Tensor, dS: torch.Tensor,
                        **_: object) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        return [torch.ones_like(t, dtype=torch.float32) for t in operands], dM * 1, dS * 1

    monkeypatch.setattr(kernels, "_state_pass", state_pass)
    monkeypatch.setattr(kernels, "_backward_kernel", backward_kernel)
    monkeypatch.setattr(kernels, "_operands_triton", kernels._kernel_operands)  # the torch form, same outputs
    monkeypatch.setattr(opt_titans, "kernel_available", lambda x, name="": name == "titans")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: composed)
    dynamo.reset()
    model = build_model(load_experiment(ROOT / "configs" / "atlas_modular_cpu.yaml").model, "optimized")
    x = torch.randint(0, 20, (2, 48), generator=torch.Generator().manual_seed(0))
    assert opt_titans.titans_dispatch(torch.zeros(1, 1, 4, 4), chunk_size=4) == "triton"
    report = dynamo.explain(lambda x: model(x)["logits"].float().mean())(x)
    reasons = [str(r.reason).splitlines()[0] for r in report.break_reasons]
    if composed:
        assert report.graph_break_count == 0, reasons
    else:
        assert report.graph_break_count > 0 and any("requires_grad_" in r or "autograd.grad" in r
                                                    for r in reasons), reasons
