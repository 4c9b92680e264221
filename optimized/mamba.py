"""The Mamba block and stack, fast: `reference/mamba.py` with the optimized scan, conv and RMSNorm swapped in.

Parameters are the reference's (subclasses; only the class attributes naming the hot path change), so
state_dicts are identical. Tolerances against the float64 reference (MODEL): float64 1e-9, float32 1e-4,
bfloat16 5e-2.
"""

from __future__ import annotations

from optimized.primitives import CausalDepthwiseConv1d, RMSNorm, causal_depthwise_conv1d_step
from optimized.ssm import selective_scan, selective_scan_step
from reference import mamba as ref

__all__ = ["MambaBlock", "MambaStack", "MambaState"]

MambaState = ref.MambaState


class MambaBlock(ref.MambaBlock):
    """Implements `reference.mamba.MambaBlock` with `optimized.ssm.selective_scan` (chunked scan / CUDA kernels)
    and the fused causal depthwise conv."""

    scan = staticmethod(selective_scan)
    scan_step = staticmethod(selective_scan_step)
    conv_step = staticmethod(causal_depthwise_conv1d_step)
    conv_class = CausalDepthwiseConv1d


class MambaStack(ref.MambaStack):
    """Implements `reference.mamba.MambaStack` with the optimized block and fused RMSNorm."""

    block_class = MambaBlock
    norm_class = RMSNorm
