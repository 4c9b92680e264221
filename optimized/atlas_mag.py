"""Atlas-MAG, fast path: the blocked Gram-form Omega read, blocked-SDPA sliding-window attention, fused RMSNorm
and SwiGLU.

Implements `reference.atlas_mag.AtlasMAG` (same parameters by subclassing: only the `*_cls` factories and
`OmegaMemoryBranch.read_memory` change). Tolerance vs the float64 reference: the model tolerances of
`tests/tolerances.py` (float32 1e-4, bfloat16 5e-2).
"""

from __future__ import annotations

from optimized.attention import SlidingWindowAttention
from optimized.omega import omega_memory, persistent_memory
from optimized.primitives import RMSNorm, SwiGLU
from reference import atlas_mag as ref
from reference.atlas_mag import AtlasMAGConfig, count_parameters, gate_statistics, polar_lambda, polarization_loss

__all__ = ["AtlasMAG", "AtlasMAGConfig", "MAGBlock", "OmegaMemoryBranch", "count_parameters", "gate_statistics",
           "polar_lambda", "polarization_loss"]


class OmegaMemoryBranch(ref.OmegaMemoryBranch):
    """`reference.atlas_mag.OmegaMemoryBranch` with `optimized.omega.omega_memory` and the fused SwiGLU."""

    ffn_cls = SwiGLU
    omega_fn = staticmethod(omega_memory)
    persistent_fn = staticmethod(persistent_memory)


class MAGBlock(ref.MAGBlock):
    """`reference.atlas_mag.MAGBlock` built from the optimized attention, norms, SwiGLU and memory branch."""

    norm_cls = RMSNorm
    ffn_cls = SwiGLU
    attention_cls = SlidingWindowAttention
    memory_cls = OmegaMemoryBranch


class AtlasMAG(ref.AtlasMAG):
    """`reference.atlas_mag.AtlasMAG` built from the optimized blocks."""

    block_cls = MAGBlock
    norm_cls = RMSNorm
