"""The smallest configuration of every registered model, shared by the table-driven tests (bad inputs, soak)."""

from __future__ import annotations

from typing import Any

TINY_MODELS: dict[str, dict[str, Any]] = {
    "gru": {"embed_dim": 4, "hidden_dim": 8},
    "atlas_mag": {"dim": 8, "num_layers": 1, "num_heads": 2, "window": 4, "omega_window": 4, "num_persistent": 2},
    "atlas_omega": {"dim": 8, "num_layers": 1, "num_heads": 2, "window": 4, "key_dim": 4, "value_dim": 4,
                    "chunk_size": 2},
    "hamt": {"hidden_dim": 8, "hcm_dim": 16, "num_layers": 1, "num_slots": 2, "max_seq_len": 16},
    "emma_liquid": {"embed_dim": 4, "hidden_dim": 8, "mem_dim": 8, "top_k": 2, "ode_unfolds": 1},
    "unified": {"d_model": 8, "d_state": 4, "n_layers": 1, "memory_size": 8, "max_iterations": 3},
}
