"""Atlas-MAG with the Omega rule: sliding-window attention gated by an Omega-rule memory branch. Spec:
specs/atlas_mag.md.

    x ─ RMSNorm ─┬─ SWA(h; persistent tokens) ───────────────────────────┐
                 └─ Omega memory read q' ─ SwiGLU readout ─ σ ─ g ──── a ⊙ g ─ + x ─ RMSNorm ─ SwiGLU ─ + ─▶

Token embedding tied with the output head; a final RMSNorm. The reference reads the literal Omega sum and the
literal sliding-window attention; the optimized subclasses swap in the fast ops (`*_cls` attributes and
`read_memory`), so both hold one parameter layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from reference.attention import SlidingWindowAttention
from reference.omega import omega_memory, persistent_memory
from reference.primitives import RMSNorm, SwiGLU
from reference.validation import ConfigError, ShapeError, check_floating, check_rank, check_token_ids

__all__ = ["AtlasMAG", "AtlasMAGConfig", "MAGBlock", "OmegaMemoryBranch", "count_parameters", "gate_statistics",
           "polar_lambda", "polarization_loss"]


@dataclass(frozen=True)
class AtlasMAGConfig:
    """[MAG-10] Model sizes and the choices the seed leaves open (defaults: the seed's Small model)."""

    vocab_size: int
    dim: int = 512
    num_layers: int = 6
    num_heads: int = 8
    window: int = 512  # sliding-window attention span (counts the current token)
    omega_window: int = 256  # c, the Omega rule's context window
    decay_base: float = 0.95
    num_persistent: int = 64
    ffn_hidden_dim: int = 0  # 0: 4·dim
    memory_hidden_dim: int = 0  # 0: 2·dim (the memory branch's SwiGLU readout)
    rotary_base: float = 10000.0
    norm_eps: float = 1e-6
    omega_eps: float = 1e-6
    disable_memory: bool = False  # ablation: attention only (no memory branch, no gate)
    polar_lambda_initial: float = 1.0
    polar_lambda_final: float = 0.01
    polar_anneal_fraction: float = 0.1
    polar_warmup_steps: int = 0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"{name}: must be {allowed}, got {getattr(self, name)!r}")

        for name in ("vocab_size", "dim", "num_layers", "num_heads", "window", "omega_window"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "an integer >= 1")
        for name in ("num_persistent", "ffn_hidden_dim", "memory_hidden_dim", "polar_warmup_steps"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 0, name, "an integer >= 0")
        need(self.dim % self.num_heads == 0, "dim", f"a multiple of num_heads={self.num_heads}")
        need((self.dim // self.num_heads) % 2 == 0, "num_heads", f"such that dim / num_heads is even (rotary); "
             f"dim={self.dim} gives head_dim {self.dim / self.num_heads:g}")
        need(0 < self.decay_base <= 1, "decay_base", "a number in (0, 1]")
        need(self.rotary_base > 0, "rotary_base", "a number > 0")
        need(self.norm_eps >= 0, "norm_eps", "a number >= 0")
        need(self.omega_eps >= 0, "omega_eps", "a number >= 0")
        need(self.polar_lambda_initial >= 0, "polar_lambda_initial", "a number >= 0")
        need(self.polar_lambda_final >= 0, "polar_lambda_final", "a number >= 0")
        need(0 <= self.polar_anneal_fraction <= 1, "polar_anneal_fraction", "a number in [0, 1]")
        need(self.init_std > 0, "init_std", "a number > 0")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        return self.ffn_hidden_dim or 4 * self.dim

    @property
    def memory_hidden(self) -> int:
        return self.memory_hidden_dim or 2 * self.dim


def count_parameters(config: AtlasMAGConfig) -> int:
    """[MAG-11] The parameter count of `AtlasMAG(config)`, analytically (tied embedding counted once)."""
    d, H, P = config.dim, config.num_heads, config.num_persistent
    per_layer = 4 * d * d + 3 * d * config.ffn_hidden + 2 * d + P * d  # SWA, SwiGLU, two norms, persistent
    if not config.disable_memory:
        per_layer += 2 * d * d + (d * H + H) + 3 * d * config.memory_hidden  # q/k, γ gate, readout
    return config.vocab_size * d + config.num_layers * per_layer + d  # embedding, blocks, final norm


def polarization_loss(g: Tensor, lam: float) -> Tensor:
    """[MAG-7] L_polar = λ · mean(1 − |2g − 1|): 0 exactly at g ∈ {0, 1}, λ at g = 0.5, always in [0, λ]."""
    return lam * (1 - (2 * g - 1).abs()).mean()


def polar_lambda(step: int, total_steps: int, *, initial: float, final: float, anneal_fraction: float,
                 warmup_steps: int) -> float:
    """[MAG-8] λ(t): 0 before `warmup_steps`, `initial` until ⌊anneal_fraction·total⌋ (at least the warmup),
    `final` after."""
    if step < warmup_steps:
        return 0.0
    return initial if step < max(warmup_steps, math.floor(anneal_fraction * total_steps)) else final


def gate_statistics(gates: list[Tensor]) -> dict[str, Tensor]:
    """[MAG-9] Logged statistics of the MAG gates g (each (B, L, D)): mean, std, the fraction polarised
    (g < 0.1 or g > 0.9) and the unweighted polarization mean(1 − |2g − 1|)."""
    flat = torch.cat([g.detach().reshape(-1) for g in gates])
    return {
        "gate_mean": flat.mean(),
        "gate_std": flat.std(unbiased=False),
        "gate_polarized": ((flat < 0.1) | (flat > 0.9)).to(flat.dtype).mean(),
        "gate_polarization": (1 - (2 * flat - 1).abs()).mean(),
    }


class OmegaMemoryBranch(nn.Module):
    """[MAG-5] Memory branch: own q/k projections, input-dependent γ gates, the Omega read, a SwiGLU readout.

    forward(h (B, L, D), persistent (P, D)) -> (gate logits m (B, L, D), γ gates (B, H, L)).
    """

    ffn_cls: type[SwiGLU] = SwiGLU
    omega_fn = staticmethod(omega_memory)
    persistent_fn = staticmethod(persistent_memory)

    def __init__(self, config: AtlasMAGConfig) -> None:
        super().__init__()
        d = config.dim
        self.config = config
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.gate_proj = nn.Linear(d, config.num_heads, bias=True)
        self.readout = self.ffn_cls(d, config.memory_hidden)

    def _heads(self, y: Tensor) -> Tensor:
        """(B, n, D) -> (B, H, n, Dh)."""
        return y.view(y.shape[0], y.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def read_memory(self, q: Tensor, k: Tensor, gate: Tensor, k_persistent: Tensor | None) -> Tensor:
        """[MAG-3] [MAG-4] The Omega read with the persistent memory from the persistent keys (H, P, Dh)."""
        c = self.config
        if k_persistent is None:
            return self.omega_fn(q, k, gate, c.omega_window, c.decay_base, eps=c.omega_eps)
        M_p, n_p = self.persistent_fn(k_persistent)
        return self.omega_fn(q, k, gate, c.omega_window, c.decay_base, M_persistent=M_p, norm_persistent=n_p,
                             eps=c.omega_eps)

    def forward(self, h: Tensor, persistent: Tensor | None) -> tuple[Tensor, Tensor]:
        fn = "OmegaMemoryBranch"
        check_floating(h, "h", fn=fn)
        check_rank(h, "h", 3, fn=fn, layout="(B, L, D)")
        if h.shape[2] != self.config.dim:
            raise ShapeError(f"{fn}: h.shape[2] must be dim={self.config.dim}, got shape {tuple(h.shape)}")
        if persistent is not None and (persistent.ndim != 2 or persistent.shape[1] != self.config.dim):
            raise ShapeError(f"{fn}: persistent must have shape (P, dim={self.config.dim}), "
                             f"got {tuple(persistent.shape)}")
        batch, length, dim = h.shape
        q = self._heads(self.q_proj(h))  # (B, H, L, Dh)
        k = self._heads(self.k_proj(h))  # (B, H, L, Dh)
        gate = torch.sigmoid(self.gate_proj(h)).transpose(1, 2)  # [MAG-2] gate_i, (B, H, L)
        k_p = None
        if persistent is not None:
            k_p = self.k_proj(persistent).view(-1, self.num_heads, self.head_dim).transpose(0, 1)  # (H, P, Dh)
        q_read = self.read_memory(q, k, gate, k_p)  # (B, H, L, Dh)
        merged = q_read.transpose(1, 2).reshape(batch, length, dim)  # (B, L, D)
        return self.readout(merged), gate


class MAGBlock(nn.Module):
    """[MAG-6] One MAG layer: x + SWA(RMSNorm x) ⊙ σ(m), then x + SwiGLU(RMSNorm x).

    forward(x (B, L, D)) -> (x (B, L, D), g (B, L, D) or None when the memory is disabled, γ gates or None).
    """

    norm_cls: type[RMSNorm] = RMSNorm
    ffn_cls: type[SwiGLU] = SwiGLU
    attention_cls: type[SlidingWindowAttention] = SlidingWindowAttention
    memory_cls: type[OmegaMemoryBranch] = OmegaMemoryBranch

    def __init__(self, config: AtlasMAGConfig) -> None:
        super().__init__()
        d = config.dim
        self.attn_norm = self.norm_cls(d, eps=config.norm_eps)
        self.attention = self.attention_cls(d, config.num_heads, config.window, rotary_base=config.rotary_base)
        self.persistent = nn.Parameter(torch.zeros(config.num_persistent, d))  # persistent tokens (P, D)
        self.memory = None if config.disable_memory else self.memory_cls(config)
        self.ffn_norm = self.norm_cls(d, eps=config.norm_eps)
        self.ffn = self.ffn_cls(d, config.ffn_hidden)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        h = self.attn_norm(x)  # (B, L, D)
        prefix = self.persistent if self.persistent.shape[0] > 0 else None
        a = self.attention(h, prefix)  # (B, L, D)
        g: Tensor | None = None
        gamma_gate: Tensor | None = None
        if self.memory is not None:
            m, gamma_gate = self.memory(h, prefix)
            g = torch.sigmoid(m)  # (B, L, D)
            a = a * g
        x = x + a
        x = x + self.ffn(self.ffn_norm(x))
        return x, g, gamma_gate


class AtlasMAG(nn.Module):
    """Atlas-MAG language model: input_ids (B, L) -> {"logits" (B, L, V), "aux_loss", "metrics"}.

    `aux_loss` is the gate polarization loss [MAG-7] at the current λ(t) [MAG-8] (set by `on_step`);
    `metrics` holds the gate statistics [MAG-9].
    """

    block_cls: type[MAGBlock] = MAGBlock
    norm_cls: type[RMSNorm] = RMSNorm

    def __init__(self, config: AtlasMAGConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList([self.block_cls(config) for _ in range(config.num_layers)])
        self.norm = self.norm_cls(config.dim, eps=config.norm_eps)
        # λ before the trainer's first on_step (e.g. a model used outside training): the schedule's step-0 value
        self.polar_lambda = 0.0 if config.polar_warmup_steps > 0 else config.polar_lambda_initial
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """[MAG-10] Linear and embedding weights N(0, init_std²), biases 0, persistent tokens N(0, 1), norms 1."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            assert isinstance(block, MAGBlock)
            nn.init.normal_(block.persistent, mean=0.0, std=1.0)

    def on_step(self, step: int, total_steps: int) -> None:
        """Set λ(t) of the polarization loss ([MAG-8]); a pure function of the step."""
        c = self.config
        self.polar_lambda = polar_lambda(step, total_steps, initial=c.polar_lambda_initial,
                                         final=c.polar_lambda_final, anneal_fraction=c.polar_anneal_fraction,
                                         warmup_steps=c.polar_warmup_steps)

    def check_input(self, input_ids: Tensor) -> None:
        check_token_ids(input_ids, self.config.vocab_size, fn="AtlasMAG.forward")

    def hidden_states(self, input_ids: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Final normalised states (B, L, D), the MAG gates g per layer and the γ gates per layer."""
        x = self.embed(input_ids)  # (B, L, D)
        gates: list[Tensor] = []
        gamma_gates: list[Tensor] = []
        for block in self.blocks:
            x, g, gamma_gate = block(x)
            if g is not None and gamma_gate is not None:
                gates.append(g)
                gamma_gates.append(gamma_gate)
        return self.norm(x), gates, gamma_gates

    def forward(self, input_ids: Tensor) -> dict[str, object]:
        self.check_input(input_ids)
        h, gates, gamma_gates = self.hidden_states(input_ids)
        logits = h @ self.embed.weight.T  # tied head, (B, L, V)
        metrics: dict[str, Tensor | float] = {"polar_lambda": self.polar_lambda}
        if gates:
            aux = polarization_loss(torch.cat([g.reshape(-1) for g in gates]), self.polar_lambda)
            metrics.update(gate_statistics(gates))
            metrics["omega_gate_mean"] = torch.cat([g.detach().reshape(-1) for g in gamma_gates]).mean()
            metrics["polar_loss"] = aux.detach()
        else:
            aux = logits.new_zeros(())
        return {"logits": logits, "aux_loss": aux, "metrics": metrics}
