"""HAMT, fast: every layer's HCM writes and reads for the whole sequence at once.

Implements `reference.hamt.HAMTLayer` / `reference.hamt.HAMT` (same parameters, by subclassing). The only hot
path is the slot memory: `optimized.vsa.SlotMemory` replaces the literal time loop by its parallel sequence form
— elementwise binding as one decayed cumulative sum (`decayed_cumsum`) of the bound pairs (chunked, a masked (C, C)
product-of-decays matrix per chunk; the chunks one after another on the CPU, all at once with ⌈log_C L⌉ levels
elsewhere, [VSA-16b]; no loop over tokens); circular binding as one rfft of all
keys, values and queries, the same chunked sum over the real and imaginary spectra, one irfft of all reads. The
per-slot query binding uses the FFT `bind` too, the key conv `optimized.primitives.CausalDepthwiseConv1d`.
Generation (`step`) runs the same O(1)-per-token write/read.

Tolerances against the float64 reference (tests/tolerances.py, model tolerances): float64 1e-9, float32 1e-4,
bfloat16 5e-2 (the memory scan accumulates in float32 under half inputs).
"""

from __future__ import annotations

from optimized import vsa
from optimized.primitives import CausalDepthwiseConv1d
from reference.hamt import HAMT as ReferenceHAMT
from reference.hamt import HAMTConfig, HAMTState, count_parameters
from reference.hamt import HAMTLayer as ReferenceHAMTLayer

__all__ = ["HAMT", "HAMTConfig", "HAMTLayer", "HAMTState", "count_parameters"]


class HAMTLayer(ReferenceHAMTLayer):
    """`reference.hamt.HAMTLayer` with the parallel FFT/scan slot memory (`optimized.vsa.SlotMemory`)."""

    memory_cls = vsa.SlotMemory
    conv_cls = CausalDepthwiseConv1d


class HAMT(ReferenceHAMT):
    """`reference.hamt.HAMT` built from the optimized layers."""

    layer_cls = HAMTLayer
