"""StableMax and ⊥Grad: the reference functions are already single vectorised expressions (no loop, no fusion to
gain), so the optimized package re-exports them. Implements `reference.stablemax.*` exactly (same code)."""

from __future__ import annotations

from reference.stablemax import log_stablemax, perp_grad, stablemax, stablemax_cross_entropy, stablemax_s

__all__ = ["log_stablemax", "perp_grad", "stablemax", "stablemax_cross_entropy", "stablemax_s"]
