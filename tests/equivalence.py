"""Check an optimized callable or module against its reference run in float64: outputs and gradients.

Usage::

    assert_equivalent(reference.vsa.bind, optimized.vsa.bind, (a, b), dtype=torch.float32)
    assert_modules_equivalent(ref_model, opt_model, (input_ids,), dtype=torch.float32)

Floating inputs are cast to `dtype` for the optimized call and to float64 *after rounding through `dtype`* for
the reference (modules: the reference's parameters are rounded the same way), so both sides compute on the same
values and the comparison measures the optimized computation's error, not how sensitive the function is to
rounding its inputs (a sharply peaked softmax over bf16-rounded scores can move by far more than any
implementation error); integer and boolean inputs pass unchanged. Every floating output is compared elementwise with
`|opt - ref| <= atol * max(1, max|ref|) + rtol * |ref|` using the per-dtype tolerances of
`tests/tolerances.py`; integer/bool outputs must be equal. Gradients: both sides back-propagate the same
seeded random cotangent for every floating output, and the gradients of every floating input (and, for
modules, every parameter, by name) are compared the same way.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tests.tolerances import Tolerance, tolerance


def flatten_tensors(obj: Any) -> list[torch.Tensor]:
    """All tensors in a nested tuple/list/dict (dicts in sorted key order)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for k in sorted(obj) for t in flatten_tensors(obj[k])]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in flatten_tensors(item)]
    return []


def _cast(obj: Any, dtype: torch.dtype, requires_grad: bool) -> Any:
    if isinstance(obj, torch.Tensor):
        if obj.dtype.is_floating_point:
            out = obj.detach().to(dtype).clone()
            return out.requires_grad_(requires_grad)
        return obj.clone()
    if isinstance(obj, Mapping):
        return {k: _cast(v, dtype, requires_grad) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_cast(v, dtype, requires_grad) for v in obj)
    if isinstance(obj, list):
        return [_cast(v, dtype, requires_grad) for v in obj]
    return obj


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance, what: str) -> None:
    """Elementwise closeness with atol scaled by the reference's magnitude (see module docstring)."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != reference {tuple(expected.shape)}")
    if not expected.dtype.is_floating_point:
        if not torch.equal(actual.cpu(), expected.cpu()):
            raise AssertionError(f"{what}: integer/bool outputs differ")
        return
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    finite = torch.isfinite(e)
    if not torch.equal(torch.isfinite(a), finite):
        raise AssertionError(f"{what}: non-finite pattern differs from the reference")
    a, e = a[finite], e[finite]
    if e.numel() == 0:
        return
    scale = max(1.0, float(e.abs().max()))
    err = (a - e).abs()
    bound = tol.atol * scale + tol.rtol * e.abs()
    if bool((err > bound).any()):
        worst = int(torch.argmax(err - bound))
        raise AssertionError(
            f"{what}: max abs error {float(err.max()):.3e} exceeds tolerance (rtol={tol.rtol}, "
            f"atol={tol.atol}×{scale:.3g}); worst element: got {float(a[worst]):.10g}, "
            f"reference {float(e[worst]):.10g}"
        )


def _cotangents(outputs: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outputs]


def _backprop(outputs: list[torch.Tensor], cots: list[torch.Tensor]) -> None:
    pairs = [(o, c) for o, c in zip(outputs, cots, strict=True) if o.dtype.is_floating_point and o.requires_grad]
    if not pairs:
        return
    loss = sum((o.to(torch.float64) * c.to(o.device)).sum() for o, c in pairs)
    assert isinstance(loss, torch.Tensor)
    loss.backward()


def assert_equivalent(ref_fn: Callable[..., Any], opt_fn: Callable[..., Any], inputs: Sequence[Any], *,
                      dtype: torch.dtype = torch.float64, kwargs: Mapping[str, Any] | None = None,
                      grad: bool = True, model: bool = False, seed: int = 0,
                      device: torch.device | str = "cpu", tol: Tolerance | None = None) -> None:
    """Assert `opt_fn(*inputs)` in `dtype` matches `ref_fn(*inputs)` in float64, outputs and input gradients.
    `tol` overrides the tolerance of `dtype` (used for mixed precision, where the stored dtype is float32)."""
    kw = dict(kwargs or {})
    tol = tol or tolerance(dtype, model=model)
    ref_in = _cast(_cast(tuple(inputs), dtype, False), torch.float64, grad)
    opt_in = _cast(tuple(inputs), dtype, grad)
    opt_in = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in opt_in)
    if grad:
        opt_in = tuple(x.detach().requires_grad_(True) if isinstance(x, torch.Tensor) and x.dtype.is_floating_point
                       else x for x in opt_in)
    ref_out = flatten_tensors(ref_fn(*ref_in, **kw))
    opt_out = flatten_tensors(opt_fn(*opt_in, **kw))
    if len(ref_out) != len(opt_out):
        raise AssertionError(f"reference returned {len(ref_out)} tensors, optimized {len(opt_out)}")
    for i, (o, r) in enumerate(zip(opt_out, ref_out, strict=True)):
        assert_close_scaled(o, r, tol, f"output[{i}] ({dtype})")
    if not grad:
        return
    cots = _cotangents(ref_out, seed)
    _backprop(ref_out, cots)
    _backprop(opt_out, cots)
    for i, (xo, xr) in enumerate(zip(opt_in, ref_in, strict=True)):
        if not (isinstance(xr, torch.Tensor) and xr.dtype.is_floating_point):
            continue
        if xr.grad is None and xo.grad is None:
            continue
        if xr.grad is None or xo.grad is None:
            raise AssertionError(f"input[{i}]: gradient present on one side only")
        assert_close_scaled(xo.grad, xr.grad, tol, f"grad of input[{i}] ({dtype})")


def assert_same_parameters(ref_module: nn.Module, opt_module: nn.Module) -> None:
    """The contract: identical state_dict keys and shapes."""
    rs, os_ = ref_module.state_dict(), opt_module.state_dict()
    if list(rs) != list(os_):
        raise AssertionError(f"state_dict keys differ: only in reference {sorted(set(rs) - set(os_))}, "
                             f"only in optimized {sorted(set(os_) - set(rs))}")
    for k in rs:
        if rs[k].shape != os_[k].shape:
            raise AssertionError(f"{k}: shape {tuple(os_[k].shape)} != reference {tuple(rs[k].shape)}")


def assert_modules_equivalent(ref_module: nn.Module, opt_module: nn.Module, inputs: Sequence[Any], *,
                              dtype: torch.dtype = torch.float64, kwargs: Mapping[str, Any] | None = None,
                              grad: bool = True, model: bool = True, seed: int = 0,
                              output: Callable[[Any], Any] | None = None,
                              device: torch.device | str = "cpu", autocast: bool = False) -> None:
    """Assert two modules with one parameter layout agree: the optimized one gets the reference's weights.

    `output` selects what to compare from the forward result (default: every tensor in it). With `autocast`
    (mixed precision as `train.autocast: bf16` trains: float32 parameters and gradients, the forward under
    `torch.autocast(dtype=bfloat16)`), `dtype` must be bfloat16 and names the tolerance; the parameters stay
    float32, so a gradient that sums many per-token terms is accumulated in float32 as in real training.
    """
    assert_same_parameters(ref_module, opt_module)
    if autocast and dtype != torch.bfloat16:
        raise ValueError("autocast=True compares bf16 mixed precision: pass dtype=torch.bfloat16")
    store = torch.float32 if autocast else dtype
    ref = copy.deepcopy(ref_module).to(store).to(torch.float64)  # the values the optimized module holds
    opt = copy.deepcopy(opt_module)
    opt.load_state_dict(ref_module.state_dict())
    opt = opt.to(device=device, dtype=store)
    pick = output or (lambda out: out)
    tol = tolerance(dtype, model=model)
    dev = torch.device(device)

    def run_opt(*a: Any, **k: Any) -> Any:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            return pick(opt(*a, **k))

    assert_equivalent(lambda *a, **k: pick(ref(*a, **k)), run_opt, inputs, dtype=store, kwargs=kwargs, grad=grad,
                      model=model, seed=seed, device=device, tol=tol)
    if not grad:
        return
    opt_params = dict(opt.named_parameters())
    for name, p_ref in ref.named_parameters():
        p_opt = opt_params[name]
        if p_ref.grad is None and p_opt.grad is None:
            continue
        if p_ref.grad is None or p_opt.grad is None:
            raise AssertionError(f"parameter {name}: gradient present on one side only")
        assert_close_scaled(p_opt.grad, p_ref.grad, tol, f"grad of {name} ({dtype})")
