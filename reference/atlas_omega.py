"""AtlasOmega: sliding-window attention and a Titans memory per layer, mixed by a floored gate (spec:
`specs/titans.md`, [TITANS-12]–[TITANS-15]).

The gate floor follows a step schedule set by `on_step` (30% memory below 10K steps, 10% below 30K, 5% after, by
default) so that the model cannot route everything through attention (the seed's 300M run collapsed to 0.7%
memory). The floor is a buffer, so a checkpoint carries the floor it was trained with.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from reference.attention import SlidingWindowAttention
from reference.primitives import RMSNorm, SwiGLU
from reference.titans import MemoryState, TitansMemory
from reference.validation import ConfigError, ShapeError, check_token_ids

__all__ = ["AtlasOmega", "AtlasOmegaBlock", "AtlasOmegaConfig", "gate_floor_at", "gated_mix"]


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class AtlasOmegaConfig:
    """The seed's 10M preset is dim 256, 6 layers, 4 heads (configs/atlas_shakespeare.yaml)."""

    vocab_size: int
    dim: int = 256
    num_layers: int = 6
    num_heads: int = 4
    window: int = 128
    key_dim: int = 64
    value_dim: int = 64
    ffn_hidden_dim: int = 0  # 0: 8·dim/3 rounded up to a multiple of 8 (LLaMA)
    chunk_size: int = 16
    momentum: float = 0.9
    alpha_init: float = 0.01
    theta_init: float = 0.1
    global_decay: float = 0.01
    qk_projection: bool = True
    gate_floor_steps: tuple[int, ...] = (10_000, 30_000)
    gate_floor_values: tuple[float, ...] = (0.30, 0.10, 0.05)
    collapse_margin: float = 0.05
    tie_embeddings: bool = True
    rotary_base: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "window", "key_dim", "value_dim", "chunk_size"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, value,
                     "an integer >= 1")
        _require(self.dim % self.num_heads == 0 and (self.dim // self.num_heads) % 2 == 0, "dim", self.dim,
                 f"a multiple of num_heads={self.num_heads} with an even head width (rotary)")
        _require(self.ffn_hidden_dim >= 0, "ffn_hidden_dim", self.ffn_hidden_dim, "an integer >= 0 (0: 8·dim/3)")
        for name in ("momentum", "alpha_init", "theta_init"):
            value = getattr(self, name)
            _require(0 < value < 1, name, value, "a number in (0, 1)")
        _require(math.isfinite(self.global_decay) and self.global_decay >= 0, "global_decay", self.global_decay,
                 "a number >= 0")
        steps = self.gate_floor_steps
        _require(all(s >= 0 for s in steps) and all(a < b for a, b in itertools.pairwise(steps)),
                 "gate_floor_steps", steps, "strictly increasing step counts >= 0")
        _require(len(self.gate_floor_values) == len(steps) + 1, "gate_floor_values", self.gate_floor_values,
                 f"one more value than gate_floor_steps ({len(steps) + 1})")
        _require(all(0 <= f < 1 for f in self.gate_floor_values), "gate_floor_values", self.gate_floor_values,
                 "numbers in [0, 1)")
        _require(0 < self.collapse_margin < 1, "collapse_margin", self.collapse_margin, "a number in (0, 1)")
        _require(self.rotary_base > 0, "rotary_base", self.rotary_base, "a number > 0")

    @property
    def ffn_width(self) -> int:
        return self.ffn_hidden_dim or 8 * math.ceil(8 * self.dim / 3 / 8)


def gate_floor_at(step: int, steps: tuple[int, ...], values: tuple[float, ...]) -> float:
    """[TITANS-13] The floor schedule: values[i] where i = #{boundaries ≤ step} (defaults 30% / 10% / 5%)."""
    return values[sum(1 for s in steps if step >= s)]


def gated_mix(attn: Tensor, mem: Tensor, gate_logits: Tensor, floor: Tensor) -> tuple[Tensor, Tensor]:
    """[TITANS-12] g = f + (1 − f)·σ(z); out = (1 − g) ⊙ attn + g ⊙ mem. All (B, L, D); returns (out, g)."""
    g = floor + (1 - floor) * torch.sigmoid(gate_logits)
    return (1 - g) * attn + g * mem, g


class AtlasOmegaBlock(nn.Module):
    """[TITANS-14] One layer: x += mix(SWA(norm x), Memory(norm x)); x += SwiGLU(norm x).

    The component classes are class attributes, so the optimized block swaps them without touching the
    parameter layout.
    """

    attention_cls: ClassVar[type[SlidingWindowAttention]] = SlidingWindowAttention
    memory_cls: ClassVar[type[TitansMemory]] = TitansMemory
    norm_cls: ClassVar[type[RMSNorm]] = RMSNorm
    ffn_cls: ClassVar[type[SwiGLU]] = SwiGLU

    def __init__(self, cfg: AtlasOmegaConfig) -> None:
        super().__init__()
        self.attn_norm = self.norm_cls(cfg.dim)
        self.attn = self.attention_cls(cfg.dim, cfg.num_heads, cfg.window, rotary_base=cfg.rotary_base)
        self.memory = self.memory_cls(cfg.dim, cfg.num_heads, cfg.key_dim, cfg.value_dim, chunk_size=cfg.chunk_size,
                                      momentum=cfg.momentum, alpha_init=cfg.alpha_init, theta_init=cfg.theta_init,
                                      global_decay=cfg.global_decay, qk_projection=cfg.qk_projection)
        self.gate_proj = nn.Linear(cfg.dim, cfg.dim)
        self.ffn_norm = self.norm_cls(cfg.dim)
        self.ffn = self.ffn_cls(cfg.dim, cfg.ffn_width)

    def forward(self, x: Tensor, state: MemoryState | None, floor: Tensor, update: bool
                ) -> tuple[Tensor, MemoryState, Tensor, dict[str, Tensor]]:
        h = self.attn_norm(x)  # (B, L, D)
        attn = self.attn(h)
        mem = self.memory(h, state, update=update)
        mixed, g = gated_mix(attn, mem.y, self.gate_proj(h), floor)
        x = x + mixed
        x = x + self.ffn(self.ffn_norm(x))
        return x, mem.state, g, mem.stats


class AtlasOmega(nn.Module):
    """[TITANS-15] Token model: embedding → blocks → RMSNorm → (tied) readout.

    forward(input_ids (B, L), state=None, *, update=True) -> {"logits" (B, L, V), "metrics", "state"}; `state`
    is the per-layer memory state list, to continue a sequence or (update=False) to read a stored memory.
    """

    block_cls: ClassVar[type[AtlasOmegaBlock]] = AtlasOmegaBlock
    norm_cls: ClassVar[type[RMSNorm]] = RMSNorm

    def __init__(self, config: AtlasOmegaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList([self.block_cls(config) for _ in range(config.num_layers)])
        self.norm = self.norm_cls(config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.gate_floor: Tensor
        self.register_buffer("gate_floor", torch.tensor(config.gate_floor_values[0]))

    def on_step(self, step: int, total_steps: int) -> None:
        """Set the gate floor for `step` ([TITANS-13]); a pure function of the step."""
        cfg = self.config
        self.gate_floor.fill_(gate_floor_at(step, cfg.gate_floor_steps, cfg.gate_floor_values))

    def forward(self, input_ids: Tensor, state: list[MemoryState] | None = None, *,
                update: bool = True) -> dict[str, Any]:
        fn = "AtlasOmega.forward"
        check_token_ids(input_ids, self.config.vocab_size, fn=fn)
        if state is not None and len(state) != len(self.blocks):
            raise ShapeError(f"{fn}: state must hold one MemoryState per layer ({len(self.blocks)}), got {len(state)}")
        x = self.embed(input_ids)  # (B, L, D)
        floor = self.gate_floor.to(x.dtype)
        states: list[MemoryState] = []
        gates: list[Tensor] = []
        stats: list[dict[str, Tensor]] = []
        for i, block in enumerate(self.blocks):
            x, s, g, st = block(x, None if state is None else state[i], floor, update)
            states.append(s)
            gates.append(g)
            stats.append(st)
        logits = self.head(self.norm(x))  # (B, L, V)
        return {"logits": logits, "metrics": self.gate_metrics(gates, stats), "state": states}

    def gate_metrics(self, gates: list[Tensor], stats: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """[TITANS-14] gate_mean, gate_std over all layers and positions; gate_collapse_risk = fraction of gate
        values within `collapse_margin` of the floor, in units of the free range (1 − f); memory stats averaged."""
        with torch.no_grad():
            g = torch.stack([t.detach() for t in gates])  # (layers, B, L, D)
            floor = self.gate_floor.to(g.dtype)
            free = (g - floor) / (1 - floor)  # σ(z) in [0, 1)
            metrics = {
                "gate_mean": g.mean(),
                "gate_std": g.std(unbiased=False),
                "gate_collapse_risk": (free < self.config.collapse_margin).to(g.dtype).mean(),
                "gate_floor": floor.clone(),
            }
            for key in ("M_norm", "M_std", "M_max", "S_norm"):
                metrics[key] = torch.stack([s[key].to(g.dtype) for s in stats]).mean()
        return metrics
