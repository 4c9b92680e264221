"""AtlasOmega, fast: the same model with the optimized components swapped in by class attribute.

Implements `reference.atlas_omega.AtlasOmega` (same parameters by construction): blocked SDPA sliding-window
attention (`optimized.attention`), the parallel chunk form of the Titans memory (`optimized.titans`) and the
fused RMSNorm/SwiGLU (`optimized.primitives`). Tolerance against the float64 reference: the model tolerances
(float64 1e-9, float32 1e-4, bfloat16 5e-2).
"""

from __future__ import annotations

from typing import ClassVar

from optimized.attention import SlidingWindowAttention
from optimized.primitives import RMSNorm, SwiGLU
from optimized.titans import TitansMemory
from reference import atlas_omega as ref
from reference.atlas_omega import AtlasOmegaConfig, gate_floor_at, gated_mix

__all__ = ["AtlasOmega", "AtlasOmegaBlock", "AtlasOmegaConfig", "gate_floor_at", "gated_mix"]


class AtlasOmegaBlock(ref.AtlasOmegaBlock):
    attention_cls: ClassVar[type[SlidingWindowAttention]] = SlidingWindowAttention
    memory_cls: ClassVar[type[TitansMemory]] = TitansMemory
    norm_cls: ClassVar[type[RMSNorm]] = RMSNorm
    ffn_cls: ClassVar[type[SwiGLU]] = SwiGLU


class AtlasOmega(ref.AtlasOmega):
    block_cls: ClassVar[type[AtlasOmegaBlock]] = AtlasOmegaBlock
    norm_cls: ClassVar[type[RMSNorm]] = RMSNorm
