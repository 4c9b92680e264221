"""HAMT: the holographic associative memory transformer, literally. Spec: specs/hamt.md.

Each block replaces self-attention by a multi-slot holographic memory (the HCM, `reference.vsa.SlotMemory`):

    x ─┬─ keys k = φ(W_k x), values v = W_v x, queries q_s = bind(u_s, φ(W_q x)), gates (g, λ) = MLP(x)
       │    M_t = λ_t ⊙ M_{t−1} + g_t ⊙ bind(k_t, v_t)      (S slots, carried over time)
       │    r_t = mean_s rms(unbind(M_{t,s}, q_{t,s}))
       └─ h = LN(x + W_o r_t) ─ y = LN(h + FFN(h))

Token + learned position embeddings, tied LM head, a final LayerNorm. The HCM state of every layer (B, N, S, D)
and the position are one `HAMTState`, carried across segments (truncated BPTT) and generation steps; its size
does not depend on the sequence length. The reference reads the memory with the literal time loop of
`reference.vsa.SlotMemory`; `optimized.hamt` swaps in the parallel FFT/scan form (the `memory_cls` and
`layer_cls` attributes), so both share one parameter layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from reference import vsa
from reference.primitives import CausalDepthwiseConv1d
from reference.validation import ConfigError, ShapeError, check_floating, check_rank, check_token_ids

__all__ = ["HAMT", "FeedForward", "GatingNetwork", "HAMTConfig", "HAMTLayer", "HAMTState", "count_parameters",
           "slot_decay_bias"]


@dataclass(frozen=True)
class HAMTConfig:
    """[HAMT-11] Model sizes and the choices the seed leaves open (defaults: the seed's default model)."""

    vocab_size: int
    hidden_dim: int = 512
    hcm_dim: int = 2048
    num_layers: int = 8
    num_slots: int = 8
    binding: Literal["elementwise", "circular"] = "elementwise"
    aux_loss_weight: float = 0.05
    decay: float = 1.0  # passive decay: an upper bound on the learned forget gate, λ = decay·σ(f)
    max_seq_len: int = 16384  # learned position table; positions continue across TBPTT segments
    key_conv: int = 2  # taps of the causal depthwise conv on the key pre-activations (1: the token alone)
    ffn_dim: int = 0  # 0: 4·hidden_dim
    gate_hidden_dim: int = 0  # 0: hidden_dim (the gating network's hidden width)
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    read_eps: float = 1e-6  # eps of the RMS normalisation of every read [VSA-11]
    init_std: float = 0.02
    chunk_size: int = 64  # chunk length of the optimized memory scan (does not change the result)
    memory_checkpoint: bool = False  # [HAMT-12] recompute the slot memory's sequence pass in backward

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"{name}: must be {allowed}, got {getattr(self, name)!r}")

        for name in ("vocab_size", "hidden_dim", "hcm_dim", "num_layers", "num_slots", "max_seq_len", "chunk_size",
                     "key_conv"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "an integer >= 1")
        for name in ("ffn_dim", "gate_hidden_dim"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 0, name,
                 "an integer >= 0 (0: the default width)")
        need(self.binding in ("elementwise", "circular"), "binding", "one of 'elementwise', 'circular'")
        need(isinstance(self.memory_checkpoint, bool), "memory_checkpoint", "true or false")
        need(math.isfinite(self.aux_loss_weight) and self.aux_loss_weight >= 0, "aux_loss_weight", "a number >= 0")
        need(0 < self.decay <= 1, "decay", "a number in (0, 1]")
        for name in ("norm_eps", "read_eps", "init_std"):
            need(getattr(self, name) > 0, name, "a number > 0")

    @property
    def ffn_hidden(self) -> int:
        return self.ffn_dim or 4 * self.hidden_dim

    @property
    def gate_hidden(self) -> int:
        return self.gate_hidden_dim or self.hidden_dim


def count_parameters(config: HAMTConfig) -> int:
    """[HAMT-11] The parameter count, analytically (tests check it against the built model)."""
    H, D, S, V = config.hidden_dim, config.hcm_dim, config.num_slots, config.vocab_size
    G, Fh = config.gate_hidden, config.ffn_hidden
    projections = 3 * (H * D + D) + 2 * (D * H + H)  # W_k, W_v, W_q; W_o and the reconstruction decoder W_rec
    gating = (H * G + G) + (G * 2 * S + 2 * S)
    ffn = (H * Fh + Fh) + (Fh * H + H)
    key_conv = D * config.key_conv + D
    layer = projections + key_conv + S * D + gating + ffn + 2 * 2 * H  # + unbinding keys u, two LayerNorms
    embeddings = V * H + config.max_seq_len * H + (0 if config.tie_embeddings else V * H)
    return embeddings + config.num_layers * layer + 2 * H  # + the final LayerNorm


def slot_decay_bias(num_slots: int) -> Tensor:
    """[HAMT-4] Initial forget-gate biases: σ(b_s) = 1 − 2^−(s+1), half-lives from 1 token to ~2^s tokens."""
    s = torch.arange(num_slots, dtype=torch.float64)
    retention = 1 - torch.pow(2.0, -(s + 1))
    return torch.log(retention / (1 - retention))  # logit


class HAMTState(NamedTuple):
    """[HAMT-9] The recurrent state: the HCM of every layer, memory (B, N, S, D), the key conv's window of every
    layer, key_context (B, N, D, K) (the last K key pre-activations, oldest first), and the next position."""

    memory: Tensor
    key_context: Tensor
    position: int


class GatingNetwork(nn.Module):
    """[HAMT-4] (a_t, f_t) = W_2 GELU(W_1 x_t); write gate g = σ(a) and forget gate λ = decay·σ(f), per slot."""

    def __init__(self, hidden_dim: int, gate_hidden: int, num_slots: int, decay: float) -> None:
        super().__init__()
        self.hidden = nn.Linear(hidden_dim, gate_hidden)
        self.logits = nn.Linear(gate_hidden, 2 * num_slots)
        self.num_slots, self.decay = num_slots, decay

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (..., H) -> write gate g (..., S) and forget gate λ (..., S), both in (0, 1)."""
        a, f = self.logits(F.gelu(self.hidden(x))).split(self.num_slots, dim=-1)
        return torch.sigmoid(a), self.decay * torch.sigmoid(f)


class FeedForward(nn.Module):
    """[HAMT-8] FFN(h) = W_2 GELU(W_1 h + b_1) + b_2."""

    def __init__(self, hidden_dim: int, ffn_hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(hidden_dim, ffn_hidden)
        self.down = nn.Linear(ffn_hidden, hidden_dim)

    def forward(self, h: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(h)))


class HAMTLayer(nn.Module):
    """[HAMT-2] One HAMT block: HCM write/read in place of self-attention, then the FFN, each with residual +
    LayerNorm (post-norm, as the seed's "residual + LayerNorm"). `memory_cls` is the slot memory's
    implementation: the literal time loop here, the parallel FFT/scan form in `optimized.hamt`."""

    memory_cls: type[vsa.SlotMemory] = vsa.SlotMemory
    conv_cls: type[CausalDepthwiseConv1d] = CausalDepthwiseConv1d

    def __init__(self, config: HAMTConfig) -> None:
        super().__init__()
        H, D, S = config.hidden_dim, config.hcm_dim, config.num_slots
        self.config = config
        self.key = nn.Linear(H, D)
        self.key_conv = self.conv_cls(D, config.key_conv)  # [HAMT-3] the key sees the last K tokens
        self.value = nn.Linear(H, D)
        self.query = nn.Linear(H, D)
        # [HAMT-3] learned unbinding keys u_s, one per slot, initialised to the identity of binding
        self.unbind_keys = nn.Parameter(vsa.identity(D, config.binding).expand(S, D).clone())
        self.gate = GatingNetwork(H, config.gate_hidden, S, config.decay)
        self.out = nn.Linear(D, H)
        self.reconstruct = nn.Linear(D, H)  # [HAMT-10] decoder of the auxiliary reconstruction
        self.norm_memory = nn.LayerNorm(H, eps=config.norm_eps)
        self.ffn = FeedForward(H, config.ffn_hidden)
        self.norm_ffn = nn.LayerNorm(H, eps=config.norm_eps)
        self.memory = self.memory_cls(D, S, mode=config.binding, normalize_read=True, eps=config.read_eps,
                                      check_state=False, chunk_size=config.chunk_size)

    def check_layer_input(self, x: Tensor, state: Tensor | None, context: Tensor | None, fn: str) -> None:
        c = self.config
        check_floating(x, "x", fn=fn)
        check_rank(x, "x", 3, fn=fn, layout="(B, L, hidden_dim)")
        if x.shape[2] != c.hidden_dim:
            raise ShapeError(f"{fn}: x.shape[2] must be hidden_dim={c.hidden_dim}, got shape {tuple(x.shape)}")
        for name, t, want in (("state", state, (x.shape[0], c.num_slots, c.hcm_dim)),
                              ("context", context, (x.shape[0], c.hcm_dim, c.key_conv))):
            if t is not None and tuple(t.shape) != want:
                raise ShapeError(f"{fn}: {name} must have shape {want}, got {tuple(t.shape)}")

    def key_map(self, z: Tensor) -> Tensor:
        """[HAMT-3] φ: tanh (near-bipolar MAP keys, Gayler 1998) for elementwise binding; unit norm (HRR scale,
        Plate 1995) for circular binding."""
        if self.config.binding == "elementwise":
            return torch.tanh(z)
        return vsa.rms_normalize(z, self.config.read_eps, check=False) / math.sqrt(self.config.hcm_dim)

    def key_sequence(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """[HAMT-3] Key pre-activations of a segment x (B, L, H) after the window `context` (B, D, K) (None:
        zeros): the causal conv [PRIM-6] of W_k x continuing the window; returns (B, L, D) and the new window."""
        z = self.key(x)  # (B, L, D)
        K = self.config.key_conv
        window = z.new_zeros(z.shape[0], self.config.hcm_dim, K) if context is None else context.to(z.dtype)
        stream = torch.cat([window.transpose(1, 2), z], dim=1)  # (B, K + L, D)
        return self.key_conv(stream[:, 1:])[:, K - 1:], stream[:, -K:].transpose(1, 2)

    def projections(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """[HAMT-3] [HAMT-4] x (..., H) and the conv'd key pre-activations z (..., D) -> keys k (..., D),
        values v (..., D), per-slot queries (..., S, D), write gates g (..., S), forget gates λ (..., S)."""
        k = self.key_map(z)  # (..., D)
        v = self.value(x)  # (..., D)
        q_hat = self.key_map(self.query(x))  # (..., D)
        q = self.memory.bind_pairs(self.unbind_keys, q_hat.unsqueeze(-2))  # q_s = bind(u_s, q̂), (..., S, D)
        g, lam = self.gate(x)  # (..., S) each
        return k, v, q, g, lam

    def run_memory(self, k: Tensor, v: Tensor, queries: tuple[Tensor, ...], g: Tensor, lam: Tensor,
                   state: Tensor | None) -> tuple[list[Tensor], Tensor]:
        """The slot memory over a sequence, read with each query sequence from the same writes: (reads (B, L, S, D)
        per query sequence, last state (B, S, D)); with `memory_checkpoint`, under grad, through
        `torch.utils.checkpoint` ([HAMT-12]): same values and gradients, only the inputs kept for backward."""
        if self.config.memory_checkpoint and torch.is_grad_enabled():
            result = checkpoint(self.memory.forward_many, k, v, queries, g, lam, state, use_reentrant=False)
            return cast(tuple[list[Tensor], Tensor], result)
        return self.memory.forward_many(k, v, queries, g, lam, state)

    def mix(self, x: Tensor, reads: Tensor) -> Tensor:
        """[HAMT-7] [HAMT-8] reads (..., S, D) -> h = LN(x + W_o mean_s r_s), y = LN(h + FFN(h)) (..., H)."""
        h = self.norm_memory(x + self.out(reads.mean(dim=-2)))
        return self.norm_ffn(h + self.ffn(h))

    def reconstruction_loss(self, x: Tensor, recalled: Tensor) -> Tensor:
        """[HAMT-10] Retrieve what was written: `recalled` = rms(unbind(M_t, k_t)) per slot (B, L, S, D), every
        slot read with the write key k_t from the same writes as the layer's read; decode, and compare with the
        (gradient-stopped) layer input: mean_{b,t} ‖W_rec mean_s rms(unbind(M_t, k_t)) − sg(x_t)‖²/H."""
        decoded = self.reconstruct(recalled.mean(dim=-2))  # (B, L, H)
        return (decoded - x.detach()).pow(2).mean()

    def forward(self, x: Tensor, state: Tensor | None = None, context: Tensor | None = None, *,
                with_aux: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
        """[HAMT-5] [HAMT-6] x (B, L, H), state (B, S, D) and key window (B, D, K) or None (fresh) -> y (B, L, H),
        the last state (B, S, D) and window (B, D, K), the reconstruction loss (or None), the mean gates (2,)."""
        self.check_layer_input(x, state, context, "HAMTLayer.forward")
        z, window = self.key_sequence(x, context)
        k, v, q, g, lam = self.projections(x, z)
        # with the auxiliary loss, one memory pass read twice: with q (the layer's read) and with k (recall)
        (reads, *recalled), last = self.run_memory(k, v, (q, k) if with_aux else (q,), g, lam, state)
        aux = self.reconstruction_loss(x, recalled[0]) if with_aux else None
        gates = torch.stack([g.detach().mean(), lam.detach().mean()])
        return self.mix(x, reads), last, window, aux, gates

    def step(self, x_t: Tensor, state: Tensor, context: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[HAMT-5] [HAMT-6] One token: x_t (B, H), state (B, S, D), key window (B, D, K) -> y_t (B, H), the new
        state and window ([PRIM-7])."""
        z, window = self.key_conv.step(context, self.key(x_t))  # (B, D), (B, D, K)
        k, v, q, g, lam = self.projections(x_t, z)
        M = self.memory.write(state, k, v, g, lam)  # (B, S, D)
        return self.mix(x_t, self.memory.read(M, q)), M, window


class HAMT(nn.Module):
    """[HAMT-1] HAMT language model: input_ids (B, L) -> {"logits" (B, L, V), "aux_loss", "metrics"} (and
    "state" with `return_state=True`). `state` continues a stream (truncated BPTT); `init_cache`/`step`
    generate token by token with the carried state, O(1) time and memory per token."""

    layer_cls: type[HAMTLayer] = HAMTLayer

    def __init__(self, config: HAMTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_dim)
        self.position = nn.Embedding(config.max_seq_len, config.hidden_dim)
        self.layers = nn.ModuleList([self.layer_cls(config) for _ in range(config.num_layers)])
        self.norm = nn.LayerNorm(config.hidden_dim, eps=config.norm_eps)
        self.head = None if config.tie_embeddings else nn.Linear(config.hidden_dim, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """[HAMT-11] Embeddings and linear weights N(0, init_std²), biases 0, except the forget-gate biases
        [HAMT-4] (multi-timescale slots); unbinding keys the identity; LayerNorms (1, 0)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        S = self.config.num_slots
        with torch.no_grad():
            for layer in self.layers:
                assert isinstance(layer, HAMTLayer)
                layer.gate.logits.bias[S:] = slot_decay_bias(S).to(layer.gate.logits.bias.dtype)

    # -- checks

    def check_input(self, input_ids: Tensor, position: int, fn: str, name: str = "input_ids") -> None:
        check_token_ids(input_ids, self.config.vocab_size, name=name, fn=fn)
        end = position + input_ids.shape[1]
        if end > self.config.max_seq_len:
            raise ShapeError(f"{fn}: positions {position} … {end - 1} exceed max_seq_len = {self.config.max_seq_len} "
                             f"(the learned position table); raise model.max_seq_len or shorten the stream")

    def check_state(self, state: HAMTState, batch: int, fn: str, name: str = "state") -> None:
        c = self.config
        want = (batch, c.num_layers, c.num_slots, c.hcm_dim)
        if not isinstance(state, HAMTState):
            raise ShapeError(f"{fn}: {name} must be a HAMTState (from init_cache or forward(return_state=True)), "
                             f"got {type(state).__name__}")
        if tuple(state.memory.shape) != want:
            raise ShapeError(f"{fn}: {name}.memory must have shape (B, N, S, D) = {want}, "
                             f"got {tuple(state.memory.shape)}")
        want_context = (batch, c.num_layers, c.hcm_dim, c.key_conv)
        if tuple(state.key_context.shape) != want_context:
            raise ShapeError(f"{fn}: {name}.key_context must have shape (B, N, D, K) = {want_context}, "
                             f"got {tuple(state.key_context.shape)}")
        if isinstance(state.position, bool) or not isinstance(state.position, int) or state.position < 0:
            raise ShapeError(f"{fn}: {name}.position must be an int >= 0, got {state.position!r}")

    # -- state

    def init_cache(self, batch_size: int) -> HAMTState:
        """[HAMT-9] The empty state: every layer's HCM (B, N, S, D) and key window (B, N, D, K) zero, position 0."""
        c = self.config
        p = self.embed.weight
        return HAMTState(p.new_zeros(batch_size, c.num_layers, c.num_slots, c.hcm_dim),
                         p.new_zeros(batch_size, c.num_layers, c.hcm_dim, c.key_conv), 0)

    def detach_state(self, state: HAMTState) -> HAMTState:
        """Cut the gradient at a truncated-BPTT segment boundary (the values carry on)."""
        return HAMTState(state.memory.detach(), state.key_context.detach(), state.position)

    def embed_tokens(self, input_ids: Tensor, position: int) -> Tensor:
        """[HAMT-1] e_t = E[token_t] + P[position + t], (B, L, H)."""
        positions = torch.arange(position, position + input_ids.shape[1], device=input_ids.device)
        return self.embed(input_ids) + self.position(positions)

    def logits(self, h: Tensor) -> Tensor:
        """[HAMT-1] logits = LN(h) Eᵀ (tied) or LN(h) W_headᵀ."""
        h = self.norm(h)
        return h @ self.embed.weight.T if self.head is None else self.head(h)

    def forward(self, input_ids: Tensor, state: HAMTState | None = None, return_state: bool = False
                ) -> dict[str, object]:
        """[HAMT-1] [HAMT-9] [HAMT-10] Logits (B, L, V) of the segment `input_ids` (B, L) continuing `state`
        (None: a fresh stream), the weighted reconstruction loss (training mode, weight > 0), gate metrics."""
        fn = "HAMT.forward"
        if state is not None:
            check_rank(input_ids, "input_ids", 2, fn=fn, layout="(batch, seq_len)")
            self.check_state(state, input_ids.shape[0], fn)
        position = 0 if state is None else state.position
        self.check_input(input_ids, position, fn)
        x = self.embed_tokens(input_ids, position)  # (B, L, H)
        with_aux = self.training and self.config.aux_loss_weight > 0
        memories: list[Tensor] = []
        windows: list[Tensor] = []
        aux_terms: list[Tensor] = []
        gate_means: list[Tensor] = []
        for i, layer in enumerate(self.layers):
            x, M, window, aux, gates = layer(x, None if state is None else state.memory[:, i],
                                             None if state is None else state.key_context[:, i], with_aux=with_aux)
            memories.append(M)
            windows.append(window)
            gate_means.append(gates)
            if aux is not None:
                aux_terms.append(aux)
        logits = self.logits(x)
        reconstruction = torch.stack(aux_terms).mean() if aux_terms else logits.new_zeros(())
        gate_stats = torch.stack(gate_means).mean(dim=0)
        out: dict[str, object] = {
            "logits": logits,
            "aux_loss": self.config.aux_loss_weight * reconstruction,
            "metrics": {"hamt_write_gate": gate_stats[0], "hamt_forget_gate": gate_stats[1],
                        "hamt_reconstruction": reconstruction.detach()},
        }
        if return_state:
            out["state"] = HAMTState(torch.stack(memories, dim=1), torch.stack(windows, dim=1),
                                     position + input_ids.shape[1])
        return out

    def step(self, cache: HAMTState, token_ids: Tensor) -> tuple[Tensor, HAMTState]:
        """[HAMT-9] One generation step: token_ids (B,) -> logits (B, V) and the state after the token."""
        fn = "HAMT.step"
        check_rank(token_ids, "token_ids", 1, fn=fn, layout="(batch,)")
        self.check_state(cache, token_ids.shape[0], fn, name="cache")
        self.check_input(token_ids[:, None], cache.position, fn, name="token_ids")
        x = self.embed_tokens(token_ids[:, None], cache.position)[:, 0]  # (B, H)
        memories: list[Tensor] = []
        windows: list[Tensor] = []
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, HAMTLayer)
            x, M, window = layer.step(x, cache.memory[:, i], cache.key_context[:, i])
            memories.append(M)
            windows.append(window)
        return self.logits(x), HAMTState(torch.stack(memories, dim=1), torch.stack(windows, dim=1),
                                         cache.position + 1)
