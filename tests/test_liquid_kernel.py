"""The Triton kernel of the liquid recurrence ([EMMA-2] [EMMA-3], `optimized.kernels.liquid`): forward and every
gradient against the torch loop (`optimized.liquid.ltc_unfolds`) and the float64 reference, in the interpreter on CPU,
compiled for sm_90 without a GPU, and on CUDA."""

from __future__ import annotations

import time

import pytest
import torch

import optimized.liquid as opt
import reference.liquid as ref
from optimized.kernels import triton_available, triton_interpreting
from tests.equivalence import assert_close_scaled, assert_equivalent, assert_modules_equivalent
from tests.strategies import make_tensor
from tests.tolerances import tolerance
from tests.triton_compile import assert_compiles

needs_interpreter = pytest.mark.skipif(not (triton_available() and triton_interpreting()),
                                       reason="Triton kernel test on CPU needs triton and TRITON_INTERPRET=1 "
                                              "(tox sets it)")

DELTA = 0.35


def torch_loop(u: torch.Tensor, h0: torch.Tensor | None, w_rec_t: torch.Tensor, dt_a: torch.Tensor,
               denom0: torch.Tensor, delta: float, unfolds: int) -> torch.Tensor:
    """The torch path of `optimized.liquid.LiquidCell.forward`: `ltc_unfolds` per step, states (B, L, H)."""
    h = u.new_zeros(u.shape[0], u.shape[2]) if h0 is None else h0
    states = []
    for u_t in u.unbind(1):
        h = opt.ltc_unfolds(u_t, h, w_rec_t, dt_a, denom0, delta, unfolds)
        states.append(h)
    return torch.stack(states, dim=1)


def kernel_inputs(seed: int, B: int, L: int, H: int) -> tuple[torch.Tensor, ...]:
    """u (B, L, H), h0 (B, H) in (−1, 1) like a state, W = W_recᵀ (H, H), Δt·A (H,), 1 + Δt/τ (H,) > 1."""
    u = 2.0 * make_tensor((B, L, H), seed)
    h0 = make_tensor((B, H), seed + 1, distribution="uniform")
    w_rec_t = make_tensor((H, H), seed + 2) * H ** -0.5 * 2.0
    dt_a = DELTA * make_tensor((H,), seed + 3, distribution="uniform")
    denom0 = 1 + DELTA / (0.5 + make_tensor((H,), seed + 4, distribution="uniform").abs())
    return u, h0, w_rec_t, dt_a, denom0


def run_with_grads(fn, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype, with_h0: bool,  # type: ignore[no-untyped-def]
                   unfolds: int) -> list[torch.Tensor]:
    """Output and the gradients of ⟨output, c⟩ (c a fixed random cotangent) for every input, in `dtype`."""
    xs = [x.to(dtype).detach().clone().requires_grad_(True) for x in inputs]
    u, h0, w_rec_t, dt_a, denom0 = xs
    out = fn(u, h0 if with_h0 else None, w_rec_t, dt_a, denom0, DELTA, unfolds)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (out.double() * cot).sum().backward()
    grads = [x.grad for x in xs if x.grad is not None]
    assert len(grads) == (5 if with_h0 else 4)
    return [out, *grads]


def test_liquid_dispatch_on_cpu_is_the_torch_loop() -> None:
    assert opt.liquid_dispatch(torch.zeros(2, 3, 4), 128) == "torch"


# (B, L, H, unfolds, h0): H not a power of two (padded columns) and one; one step; B = 17 (two programs, padded rows)
KERNEL_CASES = [(3, 5, 20, 2, True), (3, 5, 16, 1, False), (3, 1, 20, 1, True), (3, 1, 16, 2, False),
                (17, 3, 20, 3, True)]


@needs_interpreter
@pytest.mark.parametrize(("B", "L", "H", "unfolds", "with_h0"), KERNEL_CASES)
def test_triton_kernel_matches_the_torch_loop_forward_and_gradients(B: int, L: int, H: int, unfolds: int,
                                                                     with_h0: bool) -> None:
    from optimized.kernels.liquid import liquid_triton_autograd

    inputs = kernel_inputs(B + 7 * L + H, B, L, H)
    got = run_with_grads(liquid_triton_autograd, inputs, torch.float32, with_h0, unfolds)
    want = run_with_grads(torch_loop, inputs, torch.float32, with_h0, unfolds)  # same rounded inputs
    names = ["states", "grad u", "grad h0", "grad W_rec^T", "grad dt_a", "grad denom0"]
    if not with_h0:
        names.remove("grad h0")
    tol = tolerance(torch.float32)  # both sides float32: rtol = atol = 1e-5 (scaled by the largest value)
    for name, g, w in zip(names, got, want, strict=True):
        assert g.dtype == torch.float32
        assert_close_scaled(g, w, tol, name)


@needs_interpreter
@pytest.mark.parametrize(("L", "unfolds", "with_h0"), [(5, 2, True), (4, 1, False)])
def test_triton_kernel_matches_the_float64_torch_loop(L: int, unfolds: int, with_h0: bool) -> None:
    from optimized.kernels.liquid import liquid_triton_autograd

    inputs = kernel_inputs(L, 3, L, 20)
    if not with_h0:
        inputs = inputs[:1] + inputs[2:]

    def kernel(*args: torch.Tensor) -> torch.Tensor:
        w_rec_t, dt_a, denom0 = args[-3:]
        return liquid_triton_autograd(args[0], args[1] if with_h0 else None, w_rec_t, dt_a, denom0, DELTA, unfolds)

    def loop(*args: torch.Tensor) -> torch.Tensor:
        w_rec_t, dt_a, denom0 = args[-3:]
        return torch_loop(args[0], args[1] if with_h0 else None, w_rec_t, dt_a, denom0, DELTA, unfolds)

    assert_equivalent(loop, kernel, inputs, dtype=torch.float32)


@needs_interpreter
@pytest.mark.parametrize(("L", "unfolds"), [(5, 2), (1, 1)])
def test_liquid_cell_through_the_kernel_matches_the_float64_reference(monkeypatch: pytest.MonkeyPatch, L: int,
                                                                       unfolds: int) -> None:
    """The whole module on the kernel branch (forced on CPU): outputs and every parameter's gradient, through
    softplus(τ_raw), A and W_in outside the kernel."""
    monkeypatch.setattr(opt, "liquid_dispatch", lambda x, hidden_dim: "triton")
    r = ref.LiquidCell(3, 20, ode_unfolds=unfolds, dt=0.7, seed=1)
    o = opt.LiquidCell(3, 20, ode_unfolds=unfolds, dt=0.7, seed=2)
    x = 2.0 * make_tensor((3, L, 3), L)
    h0 = make_tensor((3, 20), L + 1, distribution="uniform")
    assert_modules_equivalent(r, o, (x, h0), dtype=torch.float32)
    assert_modules_equivalent(r, o, (x,), dtype=torch.float32)


@needs_interpreter
def test_triton_kernel_with_float16_dot_operands_keeps_a_float32_state() -> None:
    # the autocast branch's dots (float16: the interpreter's tl.dot on bfloat16 operands is wrong, see test_titans)
    from optimized.kernels.liquid import liquid_triton_forward

    u, h0, w_rec_t, dt_a, denom0 = kernel_inputs(5, 3, 6, 20)
    out = liquid_triton_forward(u.float(), h0.float(), w_rec_t.float(), dt_a.float(), denom0.float(), DELTA, 2,
                                torch.float16)
    assert out.dtype == torch.float32
    assert_close_scaled(out, torch_loop(u, h0, w_rec_t, dt_a, denom0, DELTA, 2), tolerance(torch.float16, model=True),
                        "states")


@pytest.mark.slow
@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_triton_kernels_compile_for_h100_without_a_gpu() -> None:
    # the interpreter runs the kernels' Python, not Triton's compiler: compile forward and backward for sm_90 in a
    # process without TRITON_INTERPRET, at EMMA's size (float32 and autocast bf16 dots) and a padded small one
    script = ("from optimized.kernels.liquid import compile_for_gpu\n"
              "for dtype, hidden, unfolds in (('fp32', 128, 2), ('bf16', 128, 6), ('fp32', 20, 1)):\n"
              "    for backward in (False, True):\n"
              "        kernel = compile_for_gpu(90, dtype, hidden=hidden, unfolds=unfolds, backward=backward)\n"
              "        assert 'cubin' in kernel.asm\n"
              "        assert kernel.metadata.shared <= 227 * 1024, kernel.metadata.shared\n")
    assert_compiles(script)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("B", "L", "H", "unfolds"), [(32, 256, 128, 2), (5, 33, 20, 3)])
def test_cuda_kernel_matches_the_torch_loop(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, B: int, L: int,
                                            H: int, unfolds: int) -> None:
    """The module on CUDA, kernel vs torch loop (`MEMARCH_DISABLE_KERNELS=liquid`), outputs and parameter
    gradients; both compute in float32 (bfloat16 inputs are upcast), so the float32 model tolerance applies to
    every float32 tensor (the parameter gradients). A bfloat16 output is that float32 result rounded once to
    bfloat16: values within float32 error of a rounding boundary land one bfloat16 ulp apart (2⁻⁸ relative), so
    those tensors are held to bfloat16's own tolerance."""
    cell = opt.LiquidCell(16, H, ode_unfolds=unfolds, seed=3).cuda()
    x = make_tensor((B, L, 16), 4, dtype=torch.float32).to("cuda", dtype)
    h0 = make_tensor((B, H), 5, dtype=torch.float32, distribution="uniform").to("cuda", dtype)
    cot = torch.randn(B, L, H, generator=torch.Generator().manual_seed(6)).cuda()
    assert opt.liquid_dispatch(x, H) == "triton"
    results = []
    for disabled in ("", "liquid"):
        monkeypatch.setenv("MEMARCH_DISABLE_KERNELS", disabled)
        cell.zero_grad()
        states, last = cell(x, h0)
        (states.float() * cot).sum().backward()
        results.append([states, last, *(p.grad.clone() for p in cell.parameters() if p.grad is not None)])
    assert opt.liquid_dispatch(x, H) == "torch"
    for i, (k, t) in enumerate(zip(*results, strict=True)):
        assert k.dtype == t.dtype
        tol = tolerance(torch.float32, model=True) if k.dtype == torch.float32 else tolerance(k.dtype)
        assert_close_scaled(k, t, tol, f"tensor {i} ({k.dtype}, inputs {dtype})")


@pytest.mark.gpu
def test_cuda_kernel_under_autocast_matches_the_float64_reference() -> None:
    r = ref.LiquidCell(16, 64, ode_unfolds=2, seed=3)
    o = opt.LiquidCell(16, 64, ode_unfolds=2, seed=4)
    x = make_tensor((4, 40, 16), 7)
    assert_modules_equivalent(r, o, (x,), dtype=torch.bfloat16, device="cuda", autocast=True)


def time_forward_backward(B: int = 32, L: int = 1024, H: int = 128, unfolds: int = 2, repeats: int = 5,
                          dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Seconds per forward + backward of `LiquidCell` (input_dim 64) on CUDA, kernel vs torch loop (for the lead's
    GPU check: `python -c "from tests.test_liquid_kernel import time_forward_backward as t; print(t())"`)."""
    import os

    before = os.environ.get("MEMARCH_DISABLE_KERNELS", "")
    cell = opt.LiquidCell(64, H, ode_unfolds=unfolds, seed=0).cuda()
    x = torch.randn(B, L, 64, device="cuda", dtype=dtype)
    times = {}
    for name, disabled in (("triton", ""), ("torch", "liquid")):
        os.environ["MEMARCH_DISABLE_KERNELS"] = disabled
        assert opt.liquid_dispatch(x, H) == name
        for i in range(repeats + 1):
            if i == 1:  # the first call compiles
                torch.cuda.synchronize()
                start = time.perf_counter()
            states, _ = cell(x)
            states.float().square().sum().backward()
        torch.cuda.synchronize()
        times[name] = (time.perf_counter() - start) / repeats
    os.environ["MEMARCH_DISABLE_KERNELS"] = before
    return times
