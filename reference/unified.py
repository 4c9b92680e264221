"""The Unified Mamba–Hopfield–DEQ model, literally. Spec: specs/unified.md (seed `mamba_hopfield_deq.md`).

    tokens ─ embedding ─ Mamba stack ─ c_t (context) ─ z₀ = c_t ─┐
      equilibrium per token (independent solves, so the model is causal):
        descent D_E(z) = u_t + Xᵀ softmax(β X z)       (query Hopfield memory: a CCCP step of E)
        update  f(z)   = tanh(W̃ z + W_c c_t + b)       (update the state; ‖W̃‖₂ ≤ lipschitz)
        energy  E(z)   = E_hop(z) − u_tᵀ z,  u_t = W_u c_t
      alternating: z ← f(D_E(z)); simultaneous: z ← (1−η) f(z) + η D_E(z); cascade: fixed point of f, then D_E
    ─ z* ─ logits = W_out RMSNorm(c_t + z*)

Parameters are defined once here; `optimized/unified.py` swaps the Mamba stack, the Hopfield memory and the
solvers (class attributes `stack_class`, `memory_class`, `solver_class`). The Mamba stack supports gradient
checkpointing (`model.dynamics.mamba.gradient_checkpointing_enable()`), the solver's `max_iter` is mutable
(`model.solver.max_iter = 10`), `model.memory_patterns` is the pattern matrix (the seed's optimizer groups).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from reference import deq
from reference.deq import DEQConfig, SpectralNormLinear, energy_stop, stability_loss
from reference.hopfield import HopfieldMemory
from reference.mamba import MambaStack, MambaState
from reference.primitives import RMSNorm
from reference.validation import ConfigError, ShapeError, check_rank, check_token_ids

__all__ = ["SOLVER_TYPES", "EquilibriumSolver", "SolveResult", "StepMaps", "UnifiedCache", "UnifiedConfig",
           "UnifiedDynamics", "UnifiedMambaHopfieldDEQ", "UnifiedMambaStack", "curriculum_max_iter"]

SOLVER_TYPES = ("alternating", "simultaneous", "cascade")
Map = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class UnifiedConfig:
    """[UNI-9] The seed's hyperparameters (defaults) and the choices it leaves open (specs/unified.md)."""

    vocab_size: int
    d_model: int = 512
    d_state: int = 64
    d_conv: int = 4
    n_layers: int = 6
    memory_size: int = 10000
    beta: float = 2.0
    solver_type: str = "alternating"
    max_iterations: int = 30
    tol_fixedpoint: float = 1e-3
    tol_energy: float = 1e-3
    expand: int = 2
    lipschitz: float = 0.9  # ‖W̃‖₂ bound of the state update
    simultaneous_mix: float = 0.5  # η of the simultaneous update
    backward: str = "implicit"  # gradient of the equilibrium: implicit | phantom | one_step | unrolled
    learnable_memory: bool = True
    init_std: float = 0.02  # embedding and output head
    memory_chunk: int = 4096  # memory slots per chunk of the optimized chunked Hopfield forms
    # The training objective inside forward (the shared trainer only reads logits / aux_loss / metrics):
    objective_in_forward: bool = False
    energy_weight: float = 0.1
    convergence_weight: float = 0.05
    stability_weight: float = 0.0
    contraction_target: float = 0.8
    stability_tokens: int = 16  # tokens per batch whose Jacobian norm is estimated
    stability_iters: int = 4  # power iterations of that estimate
    curriculum_start: int = 0  # max_iter at step 0 of the curriculum (0: no curriculum)
    curriculum_steps: int = 0  # steps over which max_iter grows to max_iterations
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"{name}: must be {allowed}, got {getattr(self, name)!r}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("vocab_size", "d_model", "d_state", "d_conv", "n_layers", "memory_size", "expand",
                     "memory_chunk", "stability_tokens", "stability_iters"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "an integer >= 1")
        for name in ("max_iterations", "curriculum_start", "curriculum_steps"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "an integer >= 0")
        need(self.solver_type in SOLVER_TYPES, "solver_type", f"one of {SOLVER_TYPES}")
        need(self.backward in deq.BACKWARD_MODES, "backward", f"one of {deq.BACKWARD_MODES}")
        for name in ("beta", "tol_fixedpoint", "tol_energy", "lipschitz", "init_std", "contraction_target"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, name, "a finite number > 0")
        need(0 < self.simultaneous_mix < 1, "simultaneous_mix", "a number in (0, 1)")
        for name in ("energy_weight", "convergence_weight", "stability_weight"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, name, "a finite number >= 0")
        need(self.curriculum_start <= self.max_iterations, "curriculum_start",
             f"at most max_iterations = {self.max_iterations}")


def curriculum_max_iter(step: int, start: int, end: int, steps: int) -> int:
    """[UNI-8] max_iter(t) = start + ⌊(end − start) · min(1, t / steps)⌋; `end` when steps = 0 or start = 0."""
    if steps <= 0 or start <= 0:
        return end
    return start + int((end - start) * min(1.0, step / steps))


class UnifiedMambaStack(MambaStack):
    """[SSM-11] The Mamba stack with optional per-layer gradient checkpointing (recompute in backward)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, n_layers: int = 2, expand: int = 2) -> None:
        super().__init__(d_model, d_state, d_conv, n_layers, expand)
        self.gradient_checkpointing = False

    def gradient_checkpointing_enable(self) -> None:
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def forward_with_state(self, x: Tensor) -> tuple[Tensor, list[MambaState]]:
        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return super().forward_with_state(x)
        states: list[MambaState] = []
        for block, norm in zip(self.blocks(), self.norms, strict=True):
            def run(x_in: Tensor, block: nn.Module = block, norm: nn.Module = norm) -> tuple[Tensor, MambaState]:
                out, state = block.forward_with_state(norm(x_in))  # type: ignore[operator]
                return out, state
            out, state = checkpoint(run, x, use_reentrant=False)
            x = x + out
            states.append(state)
        return self.final_norm(x), states


@dataclass
class StepMaps:
    """[UNI-1] [UNI-2] [UNI-3] The three maps of one batch of N independent tokens with context c (N, D)."""

    update: Map  # [UNI-2] f(z) = tanh(W̃ z + W_c c + b)
    descent: Map  # [UNI-3] D_E(z) = u + Xᵀ softmax(β X z)
    energy: Callable[[Tensor], Tensor]  # [UNI-1] (N, D) -> (N,)
    mix: float

    def alternating(self, z: Tensor) -> Tensor:
        """[UNI-4] One alternating iteration: energy descent (query memory), then the state update."""
        return self.update(self.descent(z))

    def simultaneous(self, z: Tensor) -> Tensor:
        """[UNI-5] One joint iteration: z − (1−η)(z − f(z)) − η ∇E(z) = (1−η) f(z) + η D_E(z)."""
        return (1.0 - self.mix) * self.update(z) + self.mix * self.descent(z)

    def fixed_point_map(self, solver_type: str) -> Map:
        """[UNI-7] The map whose contraction the stability term controls (cascade: its first phase, f)."""
        return {"alternating": self.alternating, "simultaneous": self.simultaneous,
                "cascade": self.update}[solver_type]

    def final_map(self, solver_type: str) -> Map:
        """[UNI-7] The map whose residual at z* the convergence term penalises (cascade: the refinement D_E)."""
        return {"alternating": self.alternating, "simultaneous": self.simultaneous,
                "cascade": self.descent}[solver_type]


class UnifiedDynamics(nn.Module):
    """[UNI-1] [UNI-2] [UNI-3] The Mamba stack (context) and the parameters of the equilibrium maps."""

    stack_class: type[UnifiedMambaStack] = UnifiedMambaStack

    def __init__(self, config: UnifiedConfig) -> None:
        super().__init__()
        D = config.d_model
        self.mamba = self.stack_class(D, config.d_state, config.d_conv, config.n_layers, config.expand)
        self.w_z = SpectralNormLinear(D, D, lipschitz=config.lipschitz)  # W̃, ‖W̃‖₂ ≤ lipschitz [DEQ-11]
        self.w_c = nn.Linear(D, D)  # W_c, b: the context's injection into the state update
        self.w_u = nn.Linear(D, D, bias=False)  # W_u: the context's linear term in the energy

    def maps(self, c: Tensor, memory: HopfieldMemory, mix: float) -> StepMaps:
        """[UNI-1] [UNI-2] [UNI-3] The maps for context c (N, D); W̃, W_c c + b and u = W_u c computed once."""
        W = self.w_z.normalized_weight()  # (D, D)
        injection = self.w_c(c)  # (N, D)
        u = self.w_u(c)  # (N, D)

        def update(z: Tensor) -> Tensor:
            return torch.tanh(F.linear(z, W) + injection)

        def descent(z: Tensor) -> Tensor:
            return u + memory.retrieve(z)

        def energy(z: Tensor) -> Tensor:
            return memory.energy(z) - (u * z).sum(-1)

        return StepMaps(update, descent, energy, mix)


class SolveResult(NamedTuple):
    """Per-token diagnostics of one equilibrium solve, each (N,)."""

    converged: Tensor
    iterations: Tensor
    residual: Tensor
    energy: Tensor


class EquilibriumSolver:
    """[UNI-4] [UNI-5] [UNI-6] The three solver modes with their stopping rules; attributes are mutable
    (`solver.max_iter = 10` in a curriculum)."""

    equilibrium_fn = staticmethod(deq.equilibrium)
    check_every = 1  # the reference checks the refinement's stopping rule after every step (one host sync)

    def __init__(self, solver_type: str, max_iter: int, tol_fixedpoint: float, tol_energy: float, *,
                 backward: str = "implicit") -> None:
        self.solver_type, self.max_iter, self.backward = solver_type, max_iter, backward
        self.tol_fixedpoint, self.tol_energy = tol_fixedpoint, tol_energy
        self.validate()

    def validate(self) -> None:
        if self.solver_type not in SOLVER_TYPES:
            raise ConfigError(f"solver.solver_type: must be one of {SOLVER_TYPES}, got {self.solver_type!r}")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 0:
            raise ConfigError(f"solver.max_iter: must be an integer >= 0, got {self.max_iter!r}")
        for name in ("tol_fixedpoint", "tol_energy"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"solver.{name}: must be a number > 0, got {getattr(self, name)!r}")

    def deq_config(self) -> DEQConfig:
        return DEQConfig(solver="fixed_point", tol=self.tol_fixedpoint, max_iter=self.max_iter,
                         backward=self.backward, policy="flag", check_every=4)

    def __call__(self, maps: StepMaps, z0: Tensor) -> tuple[Tensor, SolveResult]:
        """[UNI-4] [UNI-5] [UNI-6] z* from z0 (N, D) by `solver_type`; differentiable by `backward`."""
        self.validate()
        if self.solver_type == "cascade":
            z_fp, info = self.equilibrium_fn(maps.update, z0, self.deq_config())
            z, steps, settled = self.refine(maps, z_fp, self.max_iter)
            result = SolveResult(info.converged & settled, info.iterations + steps, info.residual, maps.energy(z))
            return z, result
        T = maps.alternating if self.solver_type == "alternating" else maps.simultaneous
        z, info = self.equilibrium_fn(T, z0, self.deq_config(), energy_stop(maps.energy, self.tol_energy))
        return z, SolveResult(info.converged, info.iterations, info.residual, maps.energy(z))

    def refine(self, maps: StepMaps, z: Tensor, max_steps: int,
               trace: list[Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """[UNI-6] Energy refinement: z ← D_E(z) per token until |E(D_E(z)) − E(z)| ≤ tol_energy and the relative
        residual ‖D_E(z) − z‖ / (‖D_E(z)‖ + ε) ≤ tol_fixedpoint, or max_steps.

        Runs under autograd. Returns (z, steps (N,), settled (N,) bool); `trace` collects E after every step.
        """
        N = z.shape[0]
        E = maps.energy(z)  # (N,)
        active = torch.ones(N, dtype=torch.bool, device=z.device)
        steps = torch.zeros(N, dtype=torch.long, device=z.device)
        if trace is not None:
            trace.append(E.detach())
        for k in range(max_steps):
            z_new = maps.descent(z)  # (N, D)
            E_new = maps.energy(z_new)
            residual = torch.linalg.vector_norm(z_new - z, dim=-1) / (torch.linalg.vector_norm(z_new, dim=-1)
                                                                     + deq.RESIDUAL_EPS)  # (N,)
            z = torch.where(active[:, None], z_new, z)
            steps = steps + active.long()
            settled_now = ((E - E_new).abs() <= self.tol_energy) & (residual <= self.tol_fixedpoint)
            E = torch.where(active, E_new, E)
            active = active & ~settled_now
            if trace is not None:
                trace.append(E.detach())
            if (k + 1) % self.check_every == 0 and not bool(active.any()):
                break
        return z, steps, ~active


class UnifiedCache(NamedTuple):
    """[UNI-10] The recurrent state for generation: every Mamba layer's (conv, ssm) state."""

    mamba: list[MambaState]


class UnifiedMambaHopfieldDEQ(nn.Module):
    """[UNI-1] … [UNI-10] Embedding → Mamba → per-token equilibrium with Hopfield memory → logits.

    Build with a config (`UnifiedMambaHopfieldDEQ(UnifiedConfig(...))`, the registry's way) or with the seed's
    keyword arguments (`UnifiedMambaHopfieldDEQ(vocab_size=..., d_model=..., ...)`); keywords given together with
    a config replace its fields.
    """

    dynamics_class: type[UnifiedDynamics] = UnifiedDynamics
    memory_class: type[HopfieldMemory] = HopfieldMemory
    solver_class: type[EquilibriumSolver] = EquilibriumSolver

    def __init__(self, config: UnifiedConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        if config is None:
            config = UnifiedConfig(**overrides)
        elif not isinstance(config, UnifiedConfig):
            raise ConfigError(f"UnifiedMambaHopfieldDEQ: config must be a UnifiedConfig (or pass keyword arguments), "
                              f"got {type(config).__name__}")
        elif overrides:
            config = replace(config, **overrides)
        self.config = c = config
        self.embedding = nn.Embedding(c.vocab_size, c.d_model)
        self.dynamics = self.dynamics_class(c)
        self.memory = self.memory_class(c.memory_size, c.d_model, c.beta, learnable=c.learnable_memory)
        self.out_norm = RMSNorm(c.d_model)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        with torch.no_grad():
            self.embedding.weight.normal_(0.0, c.init_std)
            self.lm_head.weight.normal_(0.0, c.init_std)
        self.solver = self.solver_class(c.solver_type, c.max_iterations, c.tol_fixedpoint, c.tol_energy,
                                        backward=c.backward)
        if c.gradient_checkpointing:
            self.dynamics.mamba.gradient_checkpointing_enable()

    @property
    def memory_patterns(self) -> Tensor:
        """The stored patterns X (memory_size, d_model) (a parameter when learnable)."""
        return self.memory.patterns

    # -- checks

    def check_input(self, input_ids: Tensor, fn: str, name: str = "input_ids") -> None:
        check_token_ids(input_ids, self.config.vocab_size, name=name, fn=fn)

    # -- the equilibrium

    def step_maps(self, c: Tensor) -> StepMaps:
        """[UNI-1] The maps for flattened context c (N, D)."""
        return self.dynamics.maps(c, self.memory, self.config.simultaneous_mix)

    def equilibrium(self, c: Tensor, z_init: Tensor | None = None) -> tuple[Tensor, SolveResult]:
        """[UNI-4] [UNI-5] [UNI-6] z* (B, L, D) for context c (B, L, D), from z₀ = z_init or c."""
        B, L, D = c.shape
        if z_init is not None:
            if not isinstance(z_init, Tensor) or tuple(z_init.shape) != (B, L, D):
                got = tuple(z_init.shape) if isinstance(z_init, Tensor) else type(z_init).__name__
                raise ShapeError(f"UnifiedMambaHopfieldDEQ: z_init must have shape (B, L, d_model) = {(B, L, D)} "
                                 f"(e.g. diagnostics['z_equilibrium'] of a batch of the same shape), got {got}")
            z0 = z_init.to(c.dtype)
        else:
            z0 = c
        z, result = self.solver(self.step_maps(c.reshape(B * L, D)), z0.reshape(B * L, D))
        return z.view(B, L, D), result

    def logits(self, c: Tensor, z: Tensor) -> Tensor:
        """[UNI-1] logits = W_out RMSNorm(c + z*)."""
        out: Tensor = self.lm_head(self.out_norm(c + z))
        return out

    def forward(self, input_ids: Tensor, *, z_init: Tensor | None = None,
                return_diagnostics: bool = False) -> Any:
        """[UNI-1] logits (B, L, V); with `return_diagnostics` (logits, diagnostics); with
        `config.objective_in_forward` the trainer's dict {"logits", "aux_loss", "metrics"} [UNI-7]."""
        fn = "UnifiedMambaHopfieldDEQ.forward"
        self.check_input(input_ids, fn)
        h = self.embedding(input_ids)  # (B, L, D)
        c = self.dynamics.mamba(h)  # (B, L, D)
        z, result = self.equilibrium(c, z_init)
        logits = self.logits(c, z)
        B, L = input_ids.shape
        diagnostics = {
            "solver_info": {"converged": result.converged.view(B, L), "iterations": result.iterations.view(B, L),
                            "final_energy": result.energy.mean(), "energy": result.energy.view(B, L),
                            "residual": result.residual.view(B, L)},
            "z_equilibrium": z,
            "context": c,
        }
        if return_diagnostics:
            return logits, diagnostics
        if not self.config.objective_in_forward:
            return logits
        cfg = self.config
        if self.training and torch.is_grad_enabled():
            aux, metrics = self.objective_terms(diagnostics, energy_weight=cfg.energy_weight,
                                                convergence_weight=cfg.convergence_weight,
                                                stability_weight=cfg.stability_weight,
                                                contraction_target=cfg.contraction_target)
        else:
            aux, metrics = logits.new_zeros(()), {}
        metrics.update(solver_metrics(diagnostics))
        return {"logits": logits, "aux_loss": aux, "metrics": metrics}

    def objective_terms(self, diagnostics: dict[str, Any], *, energy_weight: float, convergence_weight: float,
                        stability_weight: float, contraction_target: float) -> tuple[Tensor, dict[str, Tensor]]:
        """[UNI-7] aux = w_E mean E_hop(z*) + w_C mean ‖T(z*) − z*‖² + w_S stability; returns (aux, metrics)."""
        z, c = diagnostics["z_equilibrium"], diagnostics["context"]
        D = z.shape[-1]
        zf, cf = z.reshape(-1, D), c.reshape(-1, D)
        maps = self.step_maps(cf)
        kind = self.solver.solver_type
        energy = self.memory.energy(zf).mean()  # E_hop ≥ 0: bounded below, unlike E (u is learned)
        convergence = (maps.final_map(kind)(zf) - zf).pow(2).sum(-1).mean()
        aux = energy_weight * energy + convergence_weight * convergence
        metrics: dict[str, Tensor] = {"energy": energy.detach(), "convergence": convergence.detach()}
        if stability_weight > 0:
            n = min(self.config.stability_tokens, zf.shape[0])
            idx = torch.linspace(0, zf.shape[0] - 1, n, device=zf.device).long()  # evenly spaced tokens
            sub_maps = self.step_maps(cf[idx])
            self.memory.twice_differentiable = True
            try:
                stability = stability_loss(sub_maps.fixed_point_map(kind), zf[idx].detach(), contraction_target,
                                           n_iter=self.config.stability_iters)
            finally:
                self.memory.twice_differentiable = False
            aux = aux + stability_weight * stability
            metrics["stability"] = stability.detach()
        return aux, metrics

    def on_step(self, step: int, total_steps: int) -> None:
        """[UNI-8] The max_iter curriculum, a pure function of the step (called by the shared trainer)."""
        c = self.config
        self.solver.max_iter = curriculum_max_iter(step, c.curriculum_start, c.max_iterations, c.curriculum_steps)

    # -- recurrent inference

    def init_cache(self, batch_size: int) -> UnifiedCache:
        """[UNI-10] Zero Mamba states for `batch_size` streams."""
        p = self.embedding.weight
        return UnifiedCache(self.dynamics.mamba.init_state(batch_size, dtype=p.dtype, device=p.device))

    def step(self, cache: UnifiedCache, token_ids: Tensor) -> tuple[Tensor, UnifiedCache]:
        """[UNI-10] One token per stream: token_ids (B,) -> (logits (B, V), cache); no prefix recomputation."""
        fn = "UnifiedMambaHopfieldDEQ.step"
        check_rank(token_ids, "token_ids", 1, fn=fn, layout="(batch,)")
        self.check_input(token_ids[:, None], fn, name="token_ids")
        if not isinstance(cache, UnifiedCache) or len(cache.mamba) != self.config.n_layers:
            raise ShapeError(f"{fn}: cache must be the UnifiedCache of init_cache/step with one state per layer "
                             f"({self.config.n_layers}), got {type(cache).__name__}")
        h = self.embedding(token_ids)  # (B, D)
        c, states = self.dynamics.mamba.step(h, cache.mamba)  # (B, D)
        z, _ = self.equilibrium(c[:, None])
        return self.logits(c, z[:, 0]), UnifiedCache(states)

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, max_length: int, temperature: float = 1.0, top_k: int = 0, *,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """[UNI-10] Sample until the sequence holds `max_length` tokens (prompt included): greedy at temperature
        0, else softmax(logits / T) over the top_k (0: all). With `use_cache` the Mamba state is carried."""
        fn = "UnifiedMambaHopfieldDEQ.generate"
        self.check_input(prompt_ids, fn, name="prompt_ids")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < prompt_ids.shape[1]:
            raise ConfigError(f"{fn}: max_length must be an int >= the prompt length {prompt_ids.shape[1]}, "
                              f"got {max_length!r}")
        if not temperature >= 0:
            raise ConfigError(f"{fn}: temperature must be >= 0, got {temperature!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ConfigError(f"{fn}: top_k must be an int >= 0 (0: no truncation), got {top_k!r}")
        was_training = self.training
        self.eval()
        out = prompt_ids
        logits = prompt_ids.new_zeros(())
        cache = self.init_cache(prompt_ids.shape[0]) if use_cache else None
        if cache is not None:
            for t in range(prompt_ids.shape[1]):
                logits, cache = self.step(cache, prompt_ids[:, t])
        while out.shape[1] < max_length:
            if cache is None:
                logits = self(out)[:, -1] if not self.config.objective_in_forward else self(out)["logits"][:, -1]
            token = sample_token(logits, temperature, top_k, generator)
            out = torch.cat([out, token[:, None]], dim=1)
            if cache is not None and out.shape[1] < max_length:
                logits, cache = self.step(cache, token)
        self.train(was_training)
        return out


def sample_token(logits: Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> Tensor:
    """[UNI-10] logits (B, V) -> token ids (B,): argmax at temperature 0, else top-k softmax sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def solver_metrics(diagnostics: dict[str, Any]) -> dict[str, Tensor]:
    """Batch means of the solver diagnostics (0-dim tensors) for the trainer's log."""
    info = diagnostics["solver_info"]
    return {"deq_converged": info["converged"].float().mean(), "deq_iterations": info["iterations"].float().mean(),
            "deq_final_energy": info["final_energy"].detach()}
