"""Deep-equilibrium core, literally: the equilibrium layer with its backward modes, contractive
parameterisation, Jacobian diagnostics and EMMA's `FixedPointBlock`.

The math lives in `specs/deq.md`; each function names its equation IDs. The solvers are in
`reference/deq_solvers.py` and re-exported here. `optimized/deq.py` subclasses `FixedPointBlock` and passes its
batched solvers to the same `equilibrium_with` (the backward modes are the same math in both packages).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.deq_solvers import (
    POLICIES,
    RESIDUAL_EPS,
    SOLVERS,
    ConvergenceWarning,
    Map,
    SolverInfo,
    StopFn,
    anderson,
    broyden,
    energy_stop,
    fixed_point_iteration,
    relative_residual,
    solve,
)
from reference.validation import ConfigError, ConvergenceError, ShapeError, check_finite_all, check_floating

__all__ = [
    "BACKWARD_MODES",
    "POLICIES",
    "RESIDUAL_EPS",
    "SOLVERS",
    "ConvergenceWarning",
    "DEQConfig",
    "FixedPointBlock",
    "Map",
    "SolveFn",
    "SolverInfo",
    "SpectralNormLinear",
    "StopFn",
    "anderson",
    "broyden",
    "energy_stop",
    "equilibrium",
    "equilibrium_with",
    "fixed_point_iteration",
    "jacobian_frobenius_sq",
    "jacobian_spectral_norm",
    "relative_residual",
    "solve",
    "stability_loss",
]

BACKWARD_MODES = ("implicit", "phantom", "one_step", "unrolled")
SolveFn = Callable[..., tuple[Tensor, SolverInfo]]


@dataclass(frozen=True)
class DEQConfig:
    """Solver and backward settings of one equilibrium layer (spec: the defaults table of `specs/deq.md`).

    `tol`/`max_iter` are the seed's `tol_fixedpoint`/`max_iterations` (FixedPointBlock uses EMMA's
    `deq_max_iter` = 8). `backward_*` default to the forward values (`backward_max_iter` to 2·max_iter).
    """

    solver: str = "anderson"
    tol: float = 1e-3
    max_iter: int = 30
    backward: str = "implicit"
    backward_solver: str | None = None
    backward_tol: float | None = None
    backward_max_iter: int | None = None
    anderson_m: int = 5
    anderson_beta: float = 1.0
    anderson_lam: float = 1e-4
    phantom_steps: int = 5
    phantom_damping: float = 0.5
    policy: str = "flag"
    check_every: int = 4

    def __post_init__(self) -> None:
        for name in ("solver", "backward_solver"):
            value = getattr(self, name)
            if value is not None and value not in SOLVERS:
                raise ConfigError(f"DEQConfig: {name} must be one of {SOLVERS}, got {value!r}")
        if self.backward not in BACKWARD_MODES:
            raise ConfigError(f"DEQConfig: backward must be one of {BACKWARD_MODES}, got {self.backward!r}")
        if self.policy not in POLICIES:
            raise ConfigError(f"DEQConfig: policy must be one of {POLICIES}, got {self.policy!r}")
        for name in ("tol", "backward_tol"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"DEQConfig: {name} must be > 0, got {value!r}")
        for name, low in (("max_iter", 0), ("backward_max_iter", 0), ("anderson_m", 1), ("phantom_steps", 1),
                          ("check_every", 0)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ConfigError(f"DEQConfig: {name} must be an int >= {low}, got {value!r}")
        if not 0.0 < self.anderson_beta <= 1.0:
            raise ConfigError(f"DEQConfig: anderson_beta must lie in (0, 1], got {self.anderson_beta!r}")
        if not self.anderson_lam >= 0.0:
            raise ConfigError(f"DEQConfig: anderson_lam must be >= 0, got {self.anderson_lam!r}")
        if not 0.0 < self.phantom_damping <= 1.0:
            raise ConfigError(f"DEQConfig: phantom_damping must lie in (0, 1], got {self.phantom_damping!r}")

    def forward_kwargs(self) -> dict[str, object]:
        return {"method": self.solver, "tol": self.tol, "max_iter": self.max_iter, "policy": self.policy,
                "m": self.anderson_m, "beta": self.anderson_beta, "lam": self.anderson_lam,
                "check_every": self.check_every}

    def backward_kwargs(self) -> dict[str, object]:
        out = self.forward_kwargs()
        out.update(method=self.backward_solver or self.solver,
                   tol=self.tol if self.backward_tol is None else self.backward_tol,
                   max_iter=2 * self.max_iter if self.backward_max_iter is None else self.backward_max_iter,
                   policy="raise" if self.policy == "raise" else "warn")
        return out


# ---------------------------------------------------------------------------------------------- layer

def _attach_implicit_backward(f: Map, z_star: Tensor, solve_fn: SolveFn, config: DEQConfig) -> Tensor:
    """[DEQ-7] [DEQ-8] y = f(z*) on the autograd graph; its gradient is replaced by the adjoint fixed point."""
    z_leaf = z_star.detach().requires_grad_(True)
    y = f(z_leaf)  # (B, *S), ≈ z*
    if not y.requires_grad:
        return y
    kwargs = config.backward_kwargs()

    def adjoint(grad: Tensor | None) -> Tensor | None:
        if grad is None:  # an undefined incoming gradient stays undefined
            return None
        def vjp_map(g: Tensor) -> Tensor:  # g ↦ gᵀ J_f(z*) + ∂ℓ/∂z*
            (vjp,) = torch.autograd.grad(y, z_leaf, g, retain_graph=True)
            return vjp + grad
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            g, info = solve_fn(vjp_map, grad, **{**kwargs, "policy": "flag"})
        if not bool(info.converged.all()):
            msg = ("equilibrium backward (adjoint fixed point): "
                   f"{int((~info.converged).sum())}/{grad.shape[0]} sample(s) did not converge to "
                   f"tol={kwargs['tol']} within {kwargs['max_iter']} iterations (worst relative residual "
                   f"{float(info.residual.max()):.3e}); the implicit gradient is approximate")
            if kwargs["policy"] == "raise":
                raise ConvergenceError(msg)
            warnings.warn(msg, ConvergenceWarning, stacklevel=2)
        return g.to(grad.dtype)  # under autocast the solve may promote (bf16 grad, float32 iterate)

    out = y.view_as(y)  # the hook sits on this alias, so the VJPs through y inside it do not re-trigger it
    out.register_hook(adjoint)
    return out


def equilibrium_with(solve_fn: SolveFn, f: Map, z0: Tensor, config: DEQConfig,
                     stop_fn: StopFn | None = None) -> tuple[Tensor, SolverInfo]:
    """[DEQ-7] [DEQ-8] [DEQ-9] [DEQ-10] The equilibrium layer with the solver `solve_fn` (see `equilibrium`)."""
    kwargs = config.forward_kwargs()
    if config.backward == "unrolled":
        return solve_fn(f, z0, stop_fn=stop_fn, **kwargs)
    with torch.no_grad():
        z_star, info = solve_fn(f, z0.detach(), stop_fn=stop_fn, **kwargs)
    if not torch.is_grad_enabled():
        return f(z_star), info
    if config.backward == "implicit":
        return _attach_implicit_backward(f, z_star, solve_fn, config), info
    steps, damping = (1, 1.0) if config.backward == "one_step" else (config.phantom_steps, config.phantom_damping)
    z = z_star.detach()
    for _ in range(steps):
        z = damping * f(z) + (1.0 - damping) * z  # [DEQ-9] damped unrolled steps from z*
    return z, info


def equilibrium(f: Map, z0: Tensor, config: DEQConfig | None = None,
                stop_fn: StopFn | None = None) -> tuple[Tensor, SolverInfo]:
    """[DEQ-7] [DEQ-8] [DEQ-9] [DEQ-10] z* = f(z*) found by `config.solver` from z0; gradients by `config.backward`.

    implicit: y = f(z*) with the adjoint fixed point gᵀ = gᵀ J_f(z*) + ∂ℓ/∂y solved by the backward solver;
    phantom / one_step: backprop through k damped steps from z* (k = 1, λ = 1 for one_step);
    unrolled: the solver itself runs under autograd. Returns (z, info); z is f(z*) except in unrolled mode.
    """
    return equilibrium_with(solve, f, z0, config or DEQConfig(), stop_fn)


# ---------------------------------------------------------------------------------------------- contraction

class SpectralNormLinear(nn.Module):
    """[DEQ-11] z ↦ W̃ z (+ b) with W̃ = W · min(1, c / σ(W)), so ‖W̃‖₂ ≤ c (c = `lipschitz`).

    σ by `sigma_method`: "power" (Miyato et al.: persistent u, `n_power_iterations` per forward in training,
    a lower estimate of σ) or "exact" (largest singular value: a certified bound).
    """

    u: Tensor  # (out_features,) the power-iteration vector (a buffer)

    def __init__(self, in_features: int, out_features: int, *, lipschitz: float = 0.9, bias: bool = False,
                 sigma_method: str = "power", n_power_iterations: int = 1, seed: int = 0) -> None:
        super().__init__()
        if not lipschitz > 0:
            raise ConfigError(f"SpectralNormLinear: lipschitz must be > 0, got {lipschitz!r}")
        if sigma_method not in ("power", "exact"):
            raise ConfigError(f"SpectralNormLinear: sigma_method must be 'power' or 'exact', got {sigma_method!r}")
        if n_power_iterations < 1:
            raise ConfigError(f"SpectralNormLinear: n_power_iterations must be >= 1, got {n_power_iterations!r}")
        self.lipschitz, self.sigma_method, self.n_power_iterations = lipschitz, sigma_method, n_power_iterations
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(out_features, in_features, generator=g) / in_features ** 0.5)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_buffer("u", F.normalize(torch.randn(out_features, generator=g), dim=0))

    def sigma(self) -> Tensor:
        """σ(W), differentiable in W; in training the power-iteration vector u is advanced first."""
        W = self.weight  # (out, in)
        if self.sigma_method == "exact":
            return torch.linalg.matrix_norm(W, ord=2)
        u: Tensor = self.u
        with torch.no_grad():
            for _ in range(self.n_power_iterations if self.training else 0):
                v = F.normalize(W.T @ u, dim=0)
                u = F.normalize(W @ v, dim=0)
            if self.training:
                self.u.copy_(u)
            v = F.normalize(W.T @ u, dim=0)
        return u @ W @ v

    def normalized_weight(self) -> Tensor:
        scale = torch.clamp(self.lipschitz / self.sigma(), max=1.0)
        return self.weight * scale

    def forward(self, z: Tensor) -> Tensor:
        return F.linear(z, self.normalized_weight(), self.bias)


def _jvp_vjp(f: Map, z: Tensor) -> tuple[Tensor, Tensor, Callable[[Tensor, bool], Tensor], Callable[..., Tensor]]:
    z_in = z.detach().requires_grad_(True)
    y = f(z_in)
    u = torch.zeros_like(y, requires_grad=True)
    (ju,) = torch.autograd.grad(y, z_in, u, create_graph=True)  # uᵀ J, linear in u

    def jvp(v: Tensor, create_graph: bool) -> Tensor:  # J v = ∂(uᵀ J v)/∂u
        (out,) = torch.autograd.grad(ju, u, v, retain_graph=True, create_graph=create_graph)
        return out

    def vjp(w: Tensor) -> Tensor:
        (out,) = torch.autograd.grad(y, z_in, w, retain_graph=True)
        return out
    return z_in, y, jvp, vjp


def jacobian_spectral_norm(f: Map, z: Tensor, *, n_iter: int = 20, seed: int = 0,
                           create_graph: bool = False) -> Tensor:
    """[DEQ-12] Per-sample ‖J_f(z)‖₂ by power iteration on JᵀJ with JVPs and VJPs. (B, *S) → (B,).

    A lower estimate that converges to ‖J_f‖₂; with `create_graph` it is differentiable in f's parameters
    (the power-iteration vector is held fixed, as in spectral normalisation).
    """
    check_floating(z, "z", fn="jacobian_spectral_norm")
    _, _, jvp, vjp = _jvp_vjp(f, z)
    g = torch.Generator(device=z.device).manual_seed(seed)
    v = torch.randn(z.shape, generator=g, dtype=z.dtype, device=z.device)

    def norm(t: Tensor) -> Tensor:  # (B,)
        return torch.linalg.vector_norm(t.flatten(1), dim=1).clamp_min(torch.finfo(z.dtype).tiny)
    shape = (-1,) + (1,) * (z.ndim - 1)
    v = v / norm(v).view(shape)
    for _ in range(n_iter):
        w = vjp(jvp(v, False).detach()).detach()  # Jᵀ J v
        v = w / norm(w).view(shape)
    return torch.linalg.vector_norm(jvp(v, create_graph).flatten(1), dim=1)


def jacobian_frobenius_sq(f: Map, z: Tensor, *, n_samples: int = 1, seed: int = 0,
                          create_graph: bool = False) -> Tensor:
    """[DEQ-13] Hutchinson estimate of ‖J_f(z)‖_F² / N per sample: mean over ε ~ N(0, I) of ‖εᵀJ‖² / N."""
    check_floating(z, "z", fn="jacobian_frobenius_sq")
    z_in = z.detach().requires_grad_(True)
    y = f(z_in)
    g = torch.Generator(device=z.device).manual_seed(seed)
    total = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    for _ in range(n_samples):
        eps = torch.randn(y.shape, generator=g, dtype=y.dtype, device=y.device)
        (vjp,) = torch.autograd.grad(y, z_in, eps, retain_graph=True, create_graph=create_graph)
        total = total + vjp.flatten(1).pow(2).sum(1)
    return total / (n_samples * z[0].numel())


def stability_loss(f: Map, z: Tensor, contraction_target: float = 0.8, *, n_iter: int = 20,
                   seed: int = 0) -> Tensor:
    """[DEQ-14] R = mean_b max(0, ‖J_f(z_b)‖₂ − contraction_target)², differentiable in f's parameters."""
    if not contraction_target > 0:
        raise ConfigError(f"stability_loss: contraction_target must be > 0, got {contraction_target!r}")
    sigma = jacobian_spectral_norm(f, z, n_iter=n_iter, seed=seed, create_graph=True)
    return torch.relu(sigma - contraction_target).pow(2).mean()


# ---------------------------------------------------------------------------------------------- block

class FixedPointBlock(nn.Module):
    """[DEQ-15] EMMA's DEQ block: z* = tanh(W̃ z* + W_x x + s · W_m mem + b), ‖W̃‖₂ ≤ `lipschitz`.

    x: (..., d_model) → z*: (..., d_model); every leading position is one independent solve. `mem`
    (..., d_mem) is injected when the block has `d_mem`, scaled by `mem_scale` (the attribute, set by a
    schedule, or the forward argument). `z_init` warm-starts the solve. After each forward, `last_info` holds
    the SolverInfo and `last_diagnostics` its batch means (0-dim tensors, no host sync).
    """

    def __init__(self, d_model: int, d_mem: int | None = None, *, config: DEQConfig | None = None,
                 lipschitz: float = 0.9, sigma_method: str = "power", mem_scale: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        self.d_model, self.d_mem, self.mem_scale = d_model, d_mem, mem_scale
        self.config = config or DEQConfig(max_iter=8)
        self.w_z = SpectralNormLinear(d_model, d_model, lipschitz=lipschitz, sigma_method=sigma_method, seed=seed)
        self.w_x = nn.Linear(d_model, d_model)
        self.w_m = nn.Linear(d_mem, d_model, bias=False) if d_mem is not None else None
        g = torch.Generator().manual_seed(seed + 1)  # every parameter from `seed`, never the global RNG
        with torch.no_grad():
            for lin in (self.w_x, self.w_m):
                if lin is None:
                    continue
                bound = lin.in_features ** -0.5  # nn.Linear's default U(−1/√in, 1/√in)
                lin.weight.copy_(torch.rand(lin.weight.shape, generator=g) * 2 * bound - bound)
                if lin.bias is not None:
                    lin.bias.copy_(torch.rand(lin.bias.shape, generator=g) * 2 * bound - bound)
        self.last_info: SolverInfo | None = None
        self.last_diagnostics: dict[str, Tensor] = {}

    def injection(self, x: Tensor, mem: Tensor | None, mem_scale: float) -> Tensor:
        """u = W_x x + b + s · W_m mem, computed once per forward. (..., d_model)."""
        u = self.w_x(x)
        if mem is not None:
            assert self.w_m is not None
            u = u + mem_scale * self.w_m(mem)
        return u

    def map(self, x: Tensor, mem: Tensor | None = None, mem_scale: float | None = None) -> Map:
        """The map f(z) = tanh(W̃ z + u) for inputs flattened to (N, d_model); W̃ is normalised once here."""
        self._validate(x, mem, None)
        u = self.injection(x, mem, self.mem_scale if mem_scale is None else mem_scale).reshape(-1, self.d_model)
        W = self.w_z.normalized_weight()  # (d_model, d_model)
        return lambda z: torch.tanh(F.linear(z, W) + u)

    def solve(self, f: Map, z0: Tensor) -> tuple[Tensor, SolverInfo]:
        """The hot path (overridden in optimized): the equilibrium layer with the reference solvers."""
        return equilibrium(f, z0, self.config)

    def forward(self, x: Tensor, mem: Tensor | None = None, *, z_init: Tensor | None = None,
                mem_scale: float | None = None) -> Tensor:
        self._validate(x, mem, z_init)
        # one host sync: a NaN/inf input would otherwise surface as a solver failure that names no argument
        check_finite_all(("x", x), *(() if mem is None else (("mem", mem),)), fn="FixedPointBlock")
        f = self.map(x, mem, mem_scale)
        z0 = torch.zeros_like(x) if z_init is None else z_init
        z, info = self.solve(f, z0.reshape(-1, self.d_model))  # (N, d_model)
        self.last_info, self.last_diagnostics = info, info.batch_means()
        return z.view(x.shape)

    def with_config(self, **changes: object) -> FixedPointBlock:
        """Replace solver settings in place (e.g. a max_iter curriculum); returns self."""
        self.config = replace(self.config, **changes)  # type: ignore[arg-type]
        return self

    def _validate(self, x: Tensor, mem: Tensor | None, z_init: Tensor | None) -> None:
        fn = "FixedPointBlock"
        check_floating(x, "x", fn=fn)
        if x.ndim < 1 or x.shape[-1] != self.d_model:
            raise ShapeError(f"{fn}: x must have shape (..., d_model={self.d_model}), got {tuple(x.shape)}")
        if mem is not None:
            if self.d_mem is None:
                raise ConfigError(f"{fn}: mem was given but the block was built without d_mem; pass d_mem=")
            if mem.shape[:-1] != x.shape[:-1] or mem.shape[-1] != self.d_mem:
                raise ShapeError(f"{fn}: mem must have shape {(*x.shape[:-1], self.d_mem)} (x's leading dims, "
                                 f"d_mem), got {tuple(mem.shape)}")
        if z_init is not None and z_init.shape != x.shape:
            raise ShapeError(f"{fn}: z_init must have x's shape {tuple(x.shape)}, got {tuple(z_init.shape)}")
