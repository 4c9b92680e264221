"""GRU baseline (EMMA's `gru`): embedding → stacked GRU → linear readout. Spec: specs/gru.md."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from reference.validation import ConfigError, ShapeError, check_floating, check_token_ids


@dataclass(frozen=True)
class GRUConfig:
    vocab_size: int
    embed_dim: int = 64
    hidden_dim: int = 128
    num_layers: int = 1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "embed_dim", "hidden_dim", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: must be an integer >= 1, got {value!r}")


def gru_cell(x_t: torch.Tensor, h: torch.Tensor, weight_ih: torch.Tensor, weight_hh: torch.Tensor,
             bias_ih: torch.Tensor, bias_hh: torch.Tensor) -> torch.Tensor:
    """[GRU-1] [GRU-2] [GRU-3] [GRU-4] One GRU step; weights stacked (reset, update, new) as in torch.nn.GRU.

    x_t (B, E), h (B, H), weight_ih (3H, E), weight_hh (3H, H), biases (3H,) → h_t (B, H).
    """
    W_ir, W_iz, W_in = weight_ih.chunk(3, dim=0)
    W_hr, W_hz, W_hn = weight_hh.chunk(3, dim=0)
    b_ir, b_iz, b_in = bias_ih.chunk(3)
    b_hr, b_hz, b_hn = bias_hh.chunk(3)
    r = torch.sigmoid(F.linear(x_t, W_ir, b_ir) + F.linear(h, W_hr, b_hr))  # [GRU-1]
    z = torch.sigmoid(F.linear(x_t, W_iz, b_iz) + F.linear(h, W_hz, b_hz))  # [GRU-2]
    n = torch.tanh(F.linear(x_t, W_in, b_in) + r * F.linear(h, W_hn, b_hn))  # [GRU-3]
    return (1 - z) * n + z * h  # [GRU-4]


class GRUModel(nn.Module):
    """Token model: logits (B, L, vocab) from input_ids (B, L); the state starts at zero for each sequence.

    `self.rnn` (a torch.nn.GRU, batch_first) is the parameter container of both implementations; the reference
    reads its weights in a literal time loop, the optimized subclass calls the fused kernel.
    """

    def __init__(self, config: GRUConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        self.rnn = nn.GRU(config.embed_dim, config.hidden_dim, num_layers=config.num_layers, batch_first=True)
        self.head = nn.Linear(config.hidden_dim, config.vocab_size)

    def check_input(self, input_ids: torch.Tensor, state: torch.Tensor | None = None) -> None:
        fn = "GRUModel.forward"
        check_token_ids(input_ids, self.config.vocab_size, fn=fn)
        if state is not None:
            check_floating(state, "state", fn=fn)
            want = (self.config.num_layers, input_ids.shape[0], self.config.hidden_dim)
            if tuple(state.shape) != want:
                raise ShapeError(f"{fn}: state must have shape (num_layers, batch, hidden_dim) = {want}, "
                                 f"got {tuple(state.shape)}")

    def recurrence(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[GRU-5] The stacked GRU over time: x (B, L, E), initial state h0 (num_layers, B, H) or zeros →
        (hidden states of the top layer (B, L, H), last state of every layer (num_layers, B, H))."""
        B, L, _ = x.shape
        layer_input = x
        last = []
        for layer in range(self.config.num_layers):
            w_ih = getattr(self.rnn, f"weight_ih_l{layer}")
            w_hh = getattr(self.rnn, f"weight_hh_l{layer}")
            b_ih = getattr(self.rnn, f"bias_ih_l{layer}")
            b_hh = getattr(self.rnn, f"bias_hh_l{layer}")
            h = x.new_zeros(B, self.config.hidden_dim) if h0 is None else h0[layer]
            outputs = []
            for t in range(L):
                h = gru_cell(layer_input[:, t], h, w_ih, w_hh, b_ih, b_hh)
                outputs.append(h)
            layer_input = torch.stack(outputs, dim=1)
            last.append(h)
        return layer_input, torch.stack(last)

    def forward(self, input_ids: torch.Tensor, state: torch.Tensor | None = None,
                return_state: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        """Logits (B, L, vocab); with `return_state`, {"logits", "state"} where state (num_layers, B, H) is the
        last hidden state, to be passed back as `state` for the next segment (truncated BPTT)."""
        self.check_input(input_ids, state)
        x = self.embed(input_ids)  # (B, L, E)
        hidden, last = self.recurrence(x, state)
        logits = self.head(hidden)  # (B, L, vocab)
        return {"logits": logits, "state": last} if return_state else logits

    def init_cache(self, batch_size: int) -> torch.Tensor:
        """Recurrent generation: the zero state (num_layers, B, H)."""
        w = self.head.weight
        return w.new_zeros(self.config.num_layers, batch_size, self.config.hidden_dim)

    def step(self, cache: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row: (logits (B, vocab), next state)."""
        out = self.forward(token_ids.unsqueeze(1), state=cache, return_state=True)
        assert isinstance(out, dict)
        return out["logits"][:, 0], out["state"]
