"""EMMA, literally: embedding → liquid recurrence → HRR memory writes/reads with top-k cleanup → DEQ block with
the memory injected → readout; the oracle-write warm start, the oracle→predicted ramp and the mem_scale schedule;
the diagnostics. Spec: specs/emma.md.

    x_t = E[token_t]                                   (B, L, E)
    h_t = LTC(h_{t−1}, x_t)                            (B, L, H)          reference.liquid.LiquidCell
    k̂_t, v̂_t, q_t = W_k h_t, W_v h_t, W_q h_t;  ĝ_t = σ(w_g·h_t + b_g)
    M_t = M_{t−1} + ρ g°_t k°_t ⊛ v°_t + (1 − ρ) ĝ_t k̂_t ⊛ v̂_t    oracle share ρ from the schedule
    r_t = q_t† ⊛ M_t;  top-k cleanup of r_t against the value codebook → m_t (softmax-weighted)
    z*_t = tanh(W̃ z*_t + W_x h_t + b + s · W_m [√D m_t; rms(r_t)])  reference.deq.FixedPointBlock, s = mem_scale
    logits_t = W_o z*_t + b_o

The submodule classes (`liquid_cls`, `memory_cls`, `deq_cls`) and the cleanup function are class attributes;
`optimized/emma.py` swaps in the fast ones, so both packages share one parameter layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference import vsa
from reference.deq import DEQConfig, FixedPointBlock
from reference.liquid import LiquidCell
from reference.validation import ConfigError, check_token_ids

__all__ = ["EMMA", "EMMAConfig", "OracleWrites", "mem_scale_at", "oracle_share_at", "query_answers"]


@dataclass(frozen=True)
class EMMAConfig:
    """[EMMA-13] Sizes, the memory/DEQ choices, the schedule (in epochs of `steps_per_epoch` steps) and the needle
    token layout the oracle reads (`num_filler`, `num_keys`, `num_values`: copy them from the task; all 0 = no
    oracle)."""

    vocab_size: int
    embed_dim: int = 64
    hidden_dim: int = 128
    mem_dim: int = 256
    ode_unfolds: int = 6
    dt: float = 1.0
    top_k: int = 4
    retrieval_beta: float = 10.0
    memory_decay: float = 1.0
    mem_into_deq: bool = True
    deq_max_iter: int = 8
    deq_tol: float = 1e-3
    deq_solver: Literal["anderson", "broyden", "fixed_point"] = "anderson"
    deq_backward: Literal["implicit", "phantom", "one_step", "unrolled"] = "implicit"
    deq_lipschitz: float = 0.9
    steps_per_epoch: int = 100
    warm_start_epochs: float = 2.0
    oracle_mix_ramp_epochs: float = 4.0
    oracle_mix_min: float = 0.0
    oracle_in_eval: bool = False
    mem_scale_start: float = 0.5
    mem_scale_end: float = 1.0
    mem_scale_ramp_epochs: float = 2.0
    write_loss_weight: float = 0.0
    gate_bias_init: float = -2.0
    num_filler: int = 0
    num_keys: int = 0
    num_values: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"{name}: must be {allowed}, got {getattr(self, name)!r}")

        def integer(name: str, low: int) -> None:
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= low, name, f"an integer >= {low}")

        for name in ("vocab_size", "embed_dim", "hidden_dim", "mem_dim", "ode_unfolds", "top_k", "deq_max_iter",
                     "steps_per_epoch"):
            integer(name, 1)
        for name in ("num_filler", "num_keys", "num_values", "seed"):
            integer(name, 0)
        for name in ("dt", "retrieval_beta", "deq_tol"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, name, "a finite number > 0")
        for name in ("warm_start_epochs", "oracle_mix_ramp_epochs", "mem_scale_ramp_epochs", "write_loss_weight",
                     "mem_scale_start", "mem_scale_end"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, name, "a finite number >= 0")
        need(0.0 <= self.memory_decay <= 1.0, "memory_decay", "a number in [0, 1]")
        need(0.0 <= self.oracle_mix_min <= 1.0, "oracle_mix_min", "a number in [0, 1]")
        need(0.0 < self.deq_lipschitz < 1.0, "deq_lipschitz", "a number in (0, 1) (a contraction)")
        need(math.isfinite(self.gate_bias_init), "gate_bias_init", "a finite number")
        need(self.deq_solver in ("anderson", "broyden", "fixed_point"), "deq_solver",
             "one of 'anderson', 'broyden', 'fixed_point'")
        need(self.deq_backward in ("implicit", "phantom", "one_step", "unrolled"), "deq_backward",
             "one of 'implicit', 'phantom', 'one_step', 'unrolled'")
        layout = (self.num_filler, self.num_keys, self.num_values)
        if any(layout):
            need(self.num_keys >= 1 and self.num_values >= 1, "num_keys",
                 "with num_values, >= 1 when a needle layout is given (all three 0 disables the oracle)")
            total = sum(layout) + 1
            need(self.vocab_size == total, "vocab_size",
                 f"num_filler + num_keys + num_values + 1 = {total} (the needle layout [filler | keys | values | "
                 f"QUERY]; set the layout fields to the task's)")
        rows = self.num_values if self.has_oracle else self.vocab_size
        need(self.top_k <= rows, "top_k", f"<= the number of cleanup rows ({rows})")

    @property
    def has_oracle(self) -> bool:
        return self.num_keys > 0


# ---------------------------------------------------------------------------------------------- schedule

def oracle_share_at(step: int, cfg: EMMAConfig) -> float:
    """[EMMA-10] Oracle share ρ at a training step, e = step / steps_per_epoch: 1 while e < W (warm start), then
    linear from 1 down to ρ_min over R epochs, ρ_min after (0 without an oracle layout)."""
    if not cfg.has_oracle:
        return 0.0
    epoch = step / cfg.steps_per_epoch
    if epoch < cfg.warm_start_epochs:
        return 1.0
    if cfg.oracle_mix_ramp_epochs == 0:
        return cfg.oracle_mix_min
    progress = min(1.0, (epoch - cfg.warm_start_epochs) / cfg.oracle_mix_ramp_epochs)
    return max(cfg.oracle_mix_min, 1.0 - (1.0 - cfg.oracle_mix_min) * progress)  # max: exact floor in floats


def mem_scale_at(step: int, cfg: EMMAConfig) -> float:
    """[EMMA-11] Memory injection scale s: linear from s_start to s_end over the first R_s epochs, s_end after."""
    if cfg.mem_scale_ramp_epochs == 0:
        return cfg.mem_scale_end
    progress = min(1.0, step / cfg.steps_per_epoch / cfg.mem_scale_ramp_epochs)
    return cfg.mem_scale_start + (cfg.mem_scale_end - cfg.mem_scale_start) * progress


# ---------------------------------------------------------------------------------------------- oracle

class OracleWrites(NamedTuple):
    """Teacher-forced writes: key token ids (B, L), value token ids (B, L), gate g° (B, L) in {0, 1}."""

    key_ids: Tensor
    value_ids: Tensor
    gate: Tensor


def layout_masks(input_ids: Tensor, cfg: EMMAConfig) -> tuple[Tensor, Tensor]:
    """is_key, is_value (B, L) bool under the needle layout [filler | keys | values | QUERY] ([TASK-1])."""
    key_lo, value_lo = cfg.num_filler, cfg.num_filler + cfg.num_keys
    is_key = (input_ids >= key_lo) & (input_ids < value_lo)
    is_value = (input_ids >= value_lo) & (input_ids < value_lo + cfg.num_values)
    return is_key, is_value


def oracle_writes(input_ids: Tensor, cfg: EMMAConfig, dtype: torch.dtype) -> OracleWrites:
    """[EMMA-5] g°_t = 1 iff t ≥ 1, token_{t−1} is a key and token_t a value; k° from token_{t−1}, v° from token_t.
    Causal: position t reads tokens t − 1 and t only."""
    is_key, is_value = layout_masks(input_ids, cfg)
    prev = torch.cat([input_ids[:, :1], input_ids[:, :-1]], dim=1)  # token_{t−1} (token_0 at t = 0), (B, L)
    gate = torch.zeros(input_ids.shape, dtype=dtype, device=input_ids.device)
    gate[:, 1:] = (is_key[:, :-1] & is_value[:, 1:]).to(dtype)
    return OracleWrites(prev, input_ids, gate)


def query_answers(input_ids: Tensor, cfg: EMMAConfig) -> tuple[Tensor, Tensor]:
    """[EMMA-12] The value index (into the value rows) the last position should retrieve: the value written after
    the earlier occurrence of the last token as a key. Returns (answer (B,) int64, defined (B,) bool)."""
    is_key, is_value = layout_masks(input_ids, cfg)
    last = input_ids[:, -1:]  # (B, 1)
    match = (input_ids[:, :-2] == last) & is_key[:, :-2] & is_value[:, 1:-1]  # pair (s, s + 1), s < L − 2
    defined = match.any(dim=1) & is_key[:, -1]
    first = match.to(torch.int64).argmax(dim=1)  # (B,)
    value_tokens = input_ids[:, 1:-1].gather(1, first[:, None])[:, 0]
    answer = torch.where(defined, value_tokens - cfg.num_filler - cfg.num_keys, torch.zeros_like(value_tokens))
    return answer, defined


# ---------------------------------------------------------------------------------------------- model

class EMMA(nn.Module):
    """[EMMA-4] [EMMA-6] [EMMA-9] [EMMA-13] EMMA: input_ids (B, L) → {"logits" (B, L, V), "metrics", "aux_loss"?}.

    `on_step(step, total_steps)` sets the oracle share ρ [EMMA-10] and mem_scale s [EMMA-11] (pure functions of
    the step). In eval mode the oracle is off unless `oracle_in_eval` (the honest accuracy of the model's own writes).
    """

    liquid_cls: type[LiquidCell] = LiquidCell
    memory_cls: type[vsa.SlotMemory] = vsa.SlotMemory
    deq_cls: type[FixedPointBlock] = FixedPointBlock
    cleanup_fn: Callable[..., vsa.Cleanup] = staticmethod(vsa.cleanup)

    key_codebook: Tensor
    value_codebook: Tensor

    def __init__(self, config: EMMAConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        g = torch.Generator().manual_seed(c.seed)
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(c.vocab_size, c.embed_dim, generator=g))
        self.liquid = self.liquid_cls(c.embed_dim, c.hidden_dim, ode_unfolds=c.ode_unfolds, dt=c.dt, seed=c.seed + 1)
        D, H = c.mem_dim, c.hidden_dim
        self.to_key, self.to_value, self.to_query = nn.Linear(H, D), nn.Linear(H, D), nn.Linear(H, D)
        self.to_gate = nn.Linear(H, 1)
        with torch.no_grad():
            for lin in (self.to_key, self.to_value, self.to_query, self.to_gate):
                lin.weight.copy_((torch.rand(lin.weight.shape, generator=g) * 2 - 1) * H ** -0.5)
                lin.bias.zero_()
            self.to_gate.bias.fill_(c.gate_bias_init)
        # [EMMA-6] fixed codebooks (buffers, seeded): unitary keys (exact unbinding), HRR values
        self.register_buffer("key_codebook", vsa.random_unitary(D, (c.vocab_size,), generator=g,
                                                                dtype=torch.float64).float())
        self.register_buffer("value_codebook", vsa.random_hrr(D, (c.vocab_size,), generator=g,
                                                              dtype=torch.float64).float())
        self.memory = self.memory_cls(D, 1, decay=c.memory_decay, check_state=False)
        deq_config = DEQConfig(solver=c.deq_solver, tol=c.deq_tol, max_iter=c.deq_max_iter, backward=c.deq_backward)
        self.deq = self.deq_cls(H, 2 * D if c.mem_into_deq else None, config=deq_config,
                                lipschitz=c.deq_lipschitz, seed=c.seed + 2)
        self.head = nn.Linear(H if c.mem_into_deq else H + 2 * D, c.vocab_size)
        self.oracle_share, self.mem_scale = 0.0, 0.0
        self.on_step(0, 1)

    # -- schedule

    def on_step(self, step: int, total_steps: int) -> None:
        """[EMMA-10] [EMMA-11] Set ρ and s for this training step (`total_steps` is unused: epochs are fixed)."""
        self.oracle_share = oracle_share_at(step, self.config)
        self.mem_scale = mem_scale_at(step, self.config)

    def effective_oracle_share(self) -> float:
        return self.oracle_share if (self.training or self.config.oracle_in_eval) else 0.0

    # -- pieces

    def check_input(self, input_ids: Tensor) -> None:
        check_token_ids(input_ids, self.config.vocab_size, fn="EMMA.forward")

    def value_rows(self) -> Tensor:
        """[EMMA-8] The cleanup codebook: the value tokens' rows (all rows without an oracle layout), (N, D)."""
        c = self.config
        if not c.has_oracle:
            return self.value_codebook
        start = c.num_filler + c.num_keys
        return self.value_codebook[start:start + c.num_values]

    def predicted_writes(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """[EMMA-4] k̂, v̂, q (B, L, D) and ĝ (B, L) from the liquid states h (B, L, H)."""
        gate = torch.sigmoid(self.to_gate(h))[..., 0]
        return self.to_key(h), self.to_value(h), self.to_query(h), gate

    def read_memory(self, k_hat: Tensor, v_hat: Tensor, q: Tensor, g_hat: Tensor,
                    oracle: OracleWrites | None, rho: float) -> Tensor:
        """[EMMA-7] r_t = q_t† ⊛ M_t with M_t the mixed writes: the read is linear in M, so it is the sum of the
        oracle-written and the predicted-written memories' reads (a term with weight 0 is skipped). (B, L, D)."""
        reads = torch.zeros_like(q)
        if oracle is not None and rho > 0:
            k_o, v_o = self.key_codebook[oracle.key_ids], self.value_codebook[oracle.value_ids]  # (B, L, D)
            r_o, _ = self.memory(k_o, v_o, q, gate=rho * oracle.gate)
            reads = reads + r_o[:, :, 0]
        if rho < 1:
            r_p, _ = self.memory(k_hat, v_hat, q, gate=(1 - rho) * g_hat)
            reads = reads + r_p[:, :, 0]
        return reads

    def retrieve(self, reads: Tensor) -> tuple[Tensor, vsa.Cleanup]:
        """[EMMA-8] Top-k cleanup of r_t against the value rows; m_t = Σ_i softmax(β·cos)_i c_i. (B, L, D).
        An all-zero read (an empty memory) has no cosine: it is replaced by δ = (1, 0, …, 0) first."""
        empty = (reads * reads).sum(dim=-1, keepdim=True) == 0  # (B, L, 1)
        delta = torch.zeros_like(reads[0, 0])
        delta[0] = 1
        safe = torch.where(empty, delta, reads)
        found = self.cleanup_fn(safe, self.value_rows(), self.config.top_k, check=False)
        weights = torch.softmax(self.config.retrieval_beta * found.scores, dim=-1)  # (B, L, k)
        return (weights[..., None] * found.vectors).sum(dim=-2), found

    def forward(self, input_ids: Tensor) -> dict[str, object]:
        """[EMMA-4] [EMMA-5] [EMMA-7] [EMMA-8] [EMMA-9] Logits (B, L, V), the diagnostics [EMMA-12] and the
        alignment loss [EMMA-14] (training mode, `write_loss_weight` > 0)."""
        self.check_input(input_ids)
        c = self.config
        rho = self.effective_oracle_share()
        x = self.embed(input_ids)  # (B, L, E)
        h, _ = self.liquid(x)  # (B, L, H)
        k_hat, v_hat, q, g_hat = self.predicted_writes(h)
        oracle = oracle_writes(input_ids, c, h.dtype) if c.has_oracle else None
        reads = self.read_memory(k_hat, v_hat, q, g_hat, oracle, rho)  # (B, L, D)
        m, found = self.retrieve(reads)
        # [EMMA-9] the cleaned read (RMS ≈ 1) beside the raw read, RMS-normalised [VSA-11], (B, L, 2D)
        injected = torch.cat([math.sqrt(c.mem_dim) * m, vsa.rms_normalize(reads, check=False)], dim=-1)
        if c.mem_into_deq:
            z = self.deq(h, injected, mem_scale=self.mem_scale)  # (B, L, H)
            logits = self.head(z)
        else:
            z = self.deq(h)
            logits = self.head(torch.cat([z, self.mem_scale * injected], dim=-1))
        out: dict[str, object] = {"logits": logits,
                                  "metrics": self.diagnostics(input_ids, k_hat, v_hat, g_hat, reads, found, oracle)}
        if self.training and oracle is not None and c.write_loss_weight > 0:
            out["aux_loss"] = c.write_loss_weight * self.write_loss(input_ids, k_hat, v_hat, q, g_hat, oracle)
        return out

    # -- diagnostics and the write loss

    def pair_cosines(self, k_hat: Tensor, v_hat: Tensor, oracle: OracleWrites) -> Tensor:
        """cos(k̂_t ⊛ v̂_t, k°_t ⊛ v°_t) at every position, (B, L)."""
        k_o, v_o = self.key_codebook[oracle.key_ids], self.value_codebook[oracle.value_ids]
        return vsa.cosine(self.memory.bind_pairs(k_hat, v_hat), self.memory.bind_pairs(k_o, v_o))

    def write_loss(self, input_ids: Tensor, k_hat: Tensor, v_hat: Tensor, q: Tensor, g_hat: Tensor,
                   oracle: OracleWrites) -> Tensor:
        """[EMMA-14] mean over oracle writes of 1 − cos(k̂ ⊛ v̂, k° ⊛ v°) + mean over positions of BCE(ĝ, g°)
        + mean over key positions of 1 − cos(q_t, C_key[token_t])."""
        count = oracle.gate.sum().clamp_min(1)
        align = ((1 - self.pair_cosines(k_hat, v_hat, oracle)) * oracle.gate).sum() / count
        is_key = layout_masks(input_ids, self.config)[0].to(q.dtype)  # (B, L)
        query_cos = vsa.cosine(q, self.key_codebook[input_ids])  # (B, L)
        query = ((1 - query_cos) * is_key).sum() / is_key.sum().clamp_min(1)
        with torch.autocast(g_hat.device.type, enabled=False):  # BCE on probabilities: float32, outside autocast
            gate_loss = F.binary_cross_entropy(g_hat.float(), oracle.gate.float()).to(align.dtype)
        return align + gate_loss + query

    @torch.no_grad()
    def diagnostics(self, input_ids: Tensor, k_hat: Tensor, v_hat: Tensor, g_hat: Tensor, reads: Tensor,
                    found: vsa.Cleanup, oracle: OracleWrites | None) -> dict[str, Tensor | float]:
        """[EMMA-12] oracle_share, mem_scale, deq_iterations, deq_converged; with a layout also avg_write_cos,
        write_gate_on/off, avg_read_cos and topk_hit_rate (0-dim tensors: no host sync)."""
        info = self.deq.last_diagnostics
        metrics: dict[str, Tensor | float] = {"oracle_share": self.effective_oracle_share(),
                                              "mem_scale": self.mem_scale}
        if info:
            metrics["deq_iterations"] = info["iterations"]
            metrics["deq_converged"] = info["converged"]
        if oracle is None:
            return metrics
        on, off = oracle.gate, 1 - oracle.gate
        metrics["avg_write_cos"] = (self.pair_cosines(k_hat, v_hat, oracle) * on).sum() / on.sum().clamp_min(1)
        metrics["write_gate_on"] = (g_hat * on).sum() / on.sum().clamp_min(1)
        metrics["write_gate_off"] = (g_hat * off).sum() / off.sum().clamp_min(1)
        answer, defined = query_answers(input_ids, self.config)
        weight = defined.to(reads.dtype)
        count = weight.sum().clamp_min(1)
        target = self.value_rows()[answer]  # (B, D)
        metrics["avg_read_cos"] = (vsa.cosine(reads[:, -1], target) * weight).sum() / count
        hit = (found.indices[:, -1] == answer[:, None]).any(dim=-1).to(reads.dtype)  # (B,)
        metrics["topk_hit_rate"] = (hit * weight).sum() / count
        return metrics
