"""Bad input never passes silently: every public entry point × the bad inputs it can be given, as one table.

Each case calls one entry point (for both implementations where there are two) with one bad input and asserts
that the error belongs to the memarch family (`reference.validation.MemarchError`) and that its message names the
offending argument. Entry points for which an empty sequence (L = 0) is well defined are called with one and must
return an empty result of the right shape. The CLIs must exit with status 2 and one `error:` line, no traceback.

The "Bad input" table of `specs/README.md` lists these cases by test id; the last test keeps the two in step.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml
from torch import Tensor, nn

from reference.validation import (
    ConfigError,
    ConvergenceError,
    DTypeError,
    MemarchError,
    NonFiniteError,
    ShapeError,
)
from tests.scripts import load_script
from tests.tiny_models import TINY_MODELS

ROOT = Path(__file__).resolve().parent.parent
BOTH = ("ref", "opt")
PACKAGES = {"ref": "reference", "opt": "optimized", "shared": "training"}
NAN = float("nan")


class Impl:
    """`P.vsa` is `reference.vsa` or `optimized.vsa`, imported on first use."""

    def __init__(self, package: str) -> None:
        self.package = package

    def __getattr__(self, module: str) -> ModuleType:
        return importlib.import_module(f"{self.package}.{module}")


def f64(*shape: int) -> Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def f32(*shape: int) -> Tensor:
    return f64(*shape).float()


def ints(*shape: int) -> Tensor:
    return torch.zeros(*shape, dtype=torch.long)


def nan_at_0(x: Tensor) -> Tensor:
    y = x.clone()
    y.view(-1)[0] = NAN
    return y


def on_meta(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device="meta")


# ---------------------------------------------------------------------------------------------- tiny models

VOCAB = 11
TINY = TINY_MODELS  # the shared smallest configurations


@functools.cache
def _model(package: str, name: str) -> nn.Module:
    from training.registry import build_model

    torch.manual_seed(0)
    return build_model({"name": name, "vocab_size": VOCAB, **TINY[name]}, package)


def model(P: Impl, name: str) -> Any:
    return _model(P.package, name)


def config(name: str, **changes: Any) -> Any:
    from training.registry import get_model_spec

    return get_model_spec(name).config_cls(**{"vocab_size": VOCAB, **TINY[name], **changes})


GOOD_IDS = torch.tensor([[1, 2, 3], [4, 5, 6]])
BAD_IDS: dict[str, Callable[[], Tensor]] = {
    "float_ids": lambda: GOOD_IDS.float(),
    "ids_rank1": lambda: GOOD_IDS[0],
    "empty_seq": lambda: ints(2, 0),
    "id_ge_vocab": lambda: torch.tensor([[1, VOCAB]]),
    "negative_id": lambda: torch.tensor([[-1, 2]]),
}
BAD_IDS_ERROR: dict[str, type[MemarchError]] = {"float_ids": DTypeError, "ids_rank1": ShapeError,
                                                 "empty_seq": ShapeError, "id_ge_vocab": ShapeError,
                                                 "negative_id": ShapeError}


# ---------------------------------------------------------------------------------------------- the cases

@dataclass(frozen=True)
class Case:
    entry: str  # short name of the entry point (the table's test id uses it)
    bad: str  # short name of the bad input
    error: type[MemarchError]
    arg: str  # the argument the message must name
    call: Callable[[Impl], object]
    impls: tuple[str, ...] = BOTH

    def ids(self) -> list[str]:
        return [f"{impl}-{self.entry}-{self.bad}" for impl in self.impls]


def token_model_cases(entry: str, name: str) -> list[Case]:
    return [Case(entry, bad, BAD_IDS_ERROR[bad], "input_ids",
                 lambda P, bad=bad: model(P, name)(BAD_IDS[bad]()))  # type: ignore[misc]
            for bad in BAD_IDS]


def swa(P: Impl, q: Tensor | None = None, k: Tensor | None = None, v: Tensor | None = None,
        **kwargs: Any) -> object:
    base = f64(1, 2, 5, 4)
    return P.attention.sliding_window_attention(base if q is None else q, base if k is None else k,
                                                base if v is None else v, kwargs.pop("window", 2), **kwargs)


def omega(P: Impl, **kwargs: Any) -> object:
    args = {"q": f64(1, 2, 5, 4), "k": f64(1, 2, 5, 4), "gate": f64(1, 2, 5).sigmoid(), "window": 3}
    args.update(kwargs)
    return P.omega.omega_memory(args.pop("q"), args.pop("k"), args.pop("gate"), args.pop("window"), **args)


def titans(P: Impl, fn: str = "titans_memory_recurrent", **kwargs: Any) -> Any:
    g = f64(1, 2, 5).sigmoid()
    args: dict[str, Any] = {"q": f64(1, 2, 5, 4), "k": f64(1, 2, 5, 4), "v": f64(1, 2, 5, 3), "alpha": g,
                            "eta": g, "theta": g}
    args.update(kwargs)
    positional = [args.pop(n) for n in ("q", "k", "v", "alpha", "eta", "theta")]
    return getattr(P.titans, fn)(*positional, **args)


def scan(P: Impl, **kwargs: Any) -> object:
    args: dict[str, Any] = {"u": f64(2, 4, 5), "delta": f64(2, 4, 5), "A": -f64(4, 3).exp(), "B": f64(2, 3, 5),
                            "C": f64(2, 3, 5), "D": f64(4), "z": f64(2, 4, 5), "delta_bias": f64(4)}
    args.update(kwargs)
    positional = [args.pop(n) for n in ("u", "delta", "A", "B", "C")]
    return P.ssm.selective_scan(*positional, **args)


def scan_step(P: Impl, **kwargs: Any) -> object:
    args: dict[str, Any] = {"state": f64(2, 4, 3), "u_t": f64(2, 4), "delta_t": f64(2, 4), "A": -f64(4, 3).exp(),
                            "B_t": f64(2, 3), "C_t": f64(2, 3)}
    args.update(kwargs)
    positional = [args.pop(n) for n in ("state", "u_t", "delta_t", "A", "B_t", "C_t")]
    return P.ssm.selective_scan_step(*positional, **args)


def slots(P: Impl, **kwargs: Any) -> Any:
    return P.vsa.SlotMemory(8, 2, **kwargs)


def slot_forward(P: Impl, **kwargs: Any) -> Any:
    args: dict[str, Any] = {"keys": f64(2, 5, 8), "values": f64(2, 5, 8), "queries": f64(2, 5, 8)}
    args.update(kwargs)
    return slots(P)(args.pop("keys"), args.pop("values"), args.pop("queries"), **args)


def contraction(z: Tensor) -> Tensor:
    return 0.5 * z


def block(P: Impl) -> Any:
    return P.deq.FixedPointBlock(4, 3, seed=0)


def hamt_state(P: Impl, batch: int) -> Any:
    return model(P, "hamt").init_cache(batch)


# Scratch folders of the cases (runs, configs); the whole tree goes when the test process exits.
_SCRATCH = tempfile.TemporaryDirectory(prefix="memarch-bad-input-")


def tmp_out() -> str:
    return tempfile.mkdtemp(dir=_SCRATCH.name)


@functools.cache
def trained_checkpoint() -> Path:
    """The checkpoint.pt of a 1-step GRU run (one per test process; callers must not modify it)."""
    from training.config import load_experiment
    from training.loop import train

    out = Path(tmp_out())
    train(load_experiment(GRU_RUN), impl="optimized", device=torch.device("cpu"), out_dir=out, progress=False)
    return out / "checkpoint.pt"


GRU_RUN: dict[str, Any] = {
    "model": {"name": "gru", "embed_dim": 4, "hidden_dim": 8},
    "task": {"name": "needle", "n_needles": 1, "seq_len": 6, "num_keys": 2, "num_values": 2, "num_filler": 2},
    "train": {"steps": 1, "batch_size": 2, "eval_every": 1, "eval_batches": 1, "checkpoint_every": 1},
}


def experiment(**sections: Any) -> Any:
    from training.config import load_experiment

    data = {k: dict(v) for k, v in GRU_RUN.items()}
    for section, changes in sections.items():
        data[section] = {**data.get(section, {}), **changes}
    return load_experiment(data)


def task(name: str, **cfg: Any) -> Any:
    from training.registry import get_task_spec

    spec = get_task_spec(name)
    return spec.build(spec.config_cls(**cfg))


def run_train(max_steps: int | None = None, resume: bool = False, out: Path | None = None,
              **train_changes: Any) -> object:
    from training.loop import train

    target = out if out is not None else Path(tmp_out())
    return train(experiment(train=train_changes), impl="optimized", device=torch.device("cpu"), out_dir=target,
                 max_steps=max_steps, resume=resume, progress=False)


def load(module: str, attr: str) -> Any:
    return getattr(importlib.import_module(module), attr)


CASES: list[Case] = [
    # -- primitives
    Case("rms_norm", "int_x", DTypeError, "x", lambda P: P.primitives.rms_norm(ints(2, 4), None)),
    Case("rms_norm", "weight_dim", ShapeError, "weight", lambda P: P.primitives.rms_norm(f64(2, 4), f64(3))),
    Case("rms_norm", "eps_negative", MemarchError, "eps", lambda P: P.primitives.rms_norm(f64(2, 4), None, -1.0)),
    Case("RMSNorm", "dim_0", MemarchError, "dim", lambda P: P.primitives.RMSNorm(0)),
    Case("RMSNorm", "x_dim", ShapeError, "x", lambda P: P.primitives.RMSNorm(4)(f32(2, 3))),
    Case("swiglu", "int_x", DTypeError, "x",
         lambda P: P.primitives.swiglu(ints(2, 4), f64(6, 4), f64(6, 4), f64(4, 6))),
    Case("swiglu", "w_up_shape", ShapeError, "w_up",
         lambda P: P.primitives.swiglu(f64(2, 4), f64(6, 4), f64(5, 4), f64(4, 6))),
    Case("swiglu", "w_down_shape", ShapeError, "w_down",
         lambda P: P.primitives.swiglu(f64(2, 4), f64(6, 4), f64(6, 4), f64(6, 4))),
    Case("SwiGLU", "hidden_dim_0", MemarchError, "hidden_dim", lambda P: P.primitives.SwiGLU(4, 0)),
    Case("SwiGLU", "x_dim", ShapeError, "x", lambda P: P.primitives.SwiGLU(4, 6)(f32(2, 3))),
    Case("rotary_cos_sin", "odd_head_dim", ShapeError, "head_dim", lambda P: P.primitives.rotary_cos_sin(4, 3)),
    Case("rotary_cos_sin", "seq_len_negative", MemarchError, "seq_len", lambda P: P.primitives.rotary_cos_sin(-1, 4)),
    Case("rotary_cos_sin", "base_0", MemarchError, "base", lambda P: P.primitives.rotary_cos_sin(4, 4, base=0.0)),
    Case("rotary_cos_sin", "offset_negative", MemarchError, "offset",
         lambda P: P.primitives.rotary_cos_sin(4, 4, offset=-1)),
    Case("apply_rotary", "x_rank3", ShapeError, "x", lambda P: P.primitives.apply_rotary(f64(2, 5, 4), f64(5, 2),
                                                                                         f64(5, 2))),
    Case("apply_rotary", "cos_len", ShapeError, "cos", lambda P: P.primitives.apply_rotary(f64(1, 2, 5, 4), f64(4, 2),
                                                                                           f64(4, 2))),
    Case("apply_rotary", "int_x", DTypeError, "x", lambda P: P.primitives.apply_rotary(ints(1, 2, 5, 4), f64(5, 2),
                                                                                       f64(5, 2))),
    Case("conv1d", "x_rank2", ShapeError, "x", lambda P: P.primitives.causal_depthwise_conv1d(f64(5, 4), f64(4, 3))),
    Case("conv1d", "weight_dim", ShapeError, "weight",
         lambda P: P.primitives.causal_depthwise_conv1d(f64(2, 5, 4), f64(3, 3))),
    Case("conv1d", "bias_dim", ShapeError, "bias",
         lambda P: P.primitives.causal_depthwise_conv1d(f64(2, 5, 4), f64(4, 3), f64(3))),
    Case("conv1d", "int_x", DTypeError, "x", lambda P: P.primitives.causal_depthwise_conv1d(ints(2, 5, 4), f64(4, 3))),
    Case("conv1d_step", "conv_state_shape", ShapeError, "conv_state",
         lambda P: P.primitives.causal_depthwise_conv1d_step(f64(2, 4, 2), f64(2, 4), f64(4, 3))),
    Case("conv1d_step", "x_t_rank", ShapeError, "x_t",
         lambda P: P.primitives.causal_depthwise_conv1d_step(f64(2, 4, 3), f64(2, 1, 4), f64(4, 3))),
    Case("CausalDepthwiseConv1d", "kernel_size_0", MemarchError, "kernel_size",
         lambda P: P.primitives.CausalDepthwiseConv1d(4, 0)),
    Case("CausalDepthwiseConv1d", "x_channels", ShapeError, "x",
         lambda P: P.primitives.CausalDepthwiseConv1d(4, 3)(f32(2, 5, 3))),
    # -- sliding-window attention
    Case("swa", "q_rank3", ShapeError, "q", lambda P: swa(P, q=f64(2, 5, 4))),
    Case("swa", "k_len", ShapeError, "k", lambda P: swa(P, k=f64(1, 2, 6, 4))),
    Case("swa", "v_len", ShapeError, "v", lambda P: swa(P, v=f64(1, 2, 4, 4))),
    Case("swa", "int_q", DTypeError, "q", lambda P: swa(P, q=ints(1, 2, 5, 4))),
    Case("swa", "float64_mix", DTypeError, "k", lambda P: swa(P, q=f32(1, 2, 5, 4), v=f32(1, 2, 5, 4))),
    Case("swa", "device_mix", MemarchError, "k", lambda P: swa(P, k=on_meta(f64(1, 2, 5, 4)))),
    Case("swa", "window_0", MemarchError, "window", lambda P: swa(P, window=0)),
    Case("swa", "scale_negative", MemarchError, "scale", lambda P: swa(P, scale=-1.0)),
    Case("swa", "num_prefix_negative", MemarchError, "num_prefix", lambda P: swa(P, num_prefix=-1)),
    Case("SlidingWindowAttention", "window_0", MemarchError, "window",
         lambda P: P.attention.SlidingWindowAttention(8, 2, 0)),
    Case("SlidingWindowAttention", "dim_not_multiple", MemarchError, "dim",
         lambda P: P.attention.SlidingWindowAttention(6, 4, 2)),
    Case("SlidingWindowAttention", "x_dim", ShapeError, "x",
         lambda P: P.attention.SlidingWindowAttention(8, 2, 2)(f32(2, 5, 6))),
    Case("SlidingWindowAttention", "prefix_dim", ShapeError, "prefix",
         lambda P: P.attention.SlidingWindowAttention(8, 2, 2)(f32(2, 5, 8), f32(3, 6))),
    Case("SlidingWindowAttention", "int_x", DTypeError, "x",
         lambda P: P.attention.SlidingWindowAttention(8, 2, 2)(ints(2, 5, 8))),
    # -- VSA / HRR
    Case("bind", "dim_mismatch", ShapeError, "b", lambda P: P.vsa.bind(f64(8), f64(7))),
    Case("bind", "int_a", DTypeError, "a", lambda P: P.vsa.bind(ints(8), f64(8))),
    Case("bind", "bad_mode", ConfigError, "mode", lambda P: P.vsa.bind(f64(8), f64(8), "xor")),
    Case("bind", "strict_not_bipolar", MemarchError, "a",
         lambda P: P.vsa.bind(f64(8), f64(8), "elementwise", strict=True)),
    Case("bind", "leading_dims", ShapeError, "b", lambda P: P.vsa.bind(f64(2, 8), f64(3, 8))),
    Case("bind", "device_mix", MemarchError, "b", lambda P: P.vsa.bind(f64(8), on_meta(f64(8)))),
    Case("unbind", "dim_mismatch", ShapeError, "a", lambda P: P.vsa.unbind(f64(8), f64(6))),
    Case("involution", "zero_dim", ShapeError, "a", lambda P: P.vsa.involution(torch.tensor(1.0))),
    Case("exact_inverse", "eps_negative", MemarchError, "eps", lambda P: P.vsa.exact_inverse(f64(8), -1.0)),
    Case("make_unitary", "empty_vector", ShapeError, "a", lambda P: P.vsa.make_unitary(f64(3, 0))),
    Case("random_hrr", "dim_0", ShapeError, "dim", lambda P: P.vsa.random_hrr(0)),
    Case("random_bipolar", "dim_negative", ShapeError, "dim", lambda P: P.vsa.random_bipolar(-2)),
    Case("random_unitary", "dim_0", ShapeError, "dim", lambda P: P.vsa.random_unitary(0)),
    Case("identity", "bad_mode", ConfigError, "mode", lambda P: P.vsa.identity(8, "xor")),
    Case("bundle", "weights_shape", ShapeError, "weights", lambda P: P.vsa.bundle(f64(3, 8), f64(2))),
    Case("bundle", "dim_is_D", ShapeError, "dim", lambda P: P.vsa.bundle(f64(3, 8), dim=-1)),
    Case("bundle", "vectors_rank1", ShapeError, "vectors", lambda P: P.vsa.bundle(f64(8))),
    Case("rms_normalize", "nan_trace", NonFiniteError, "trace", lambda P: P.vsa.rms_normalize(nan_at_0(f64(8)))),
    Case("rms_normalize", "eps_negative", MemarchError, "eps", lambda P: P.vsa.rms_normalize(f64(8), -1.0)),
    Case("decay", "lam_above_1", MemarchError, "lam", lambda P: P.vsa.decay(f64(8), 1.5)),
    Case("decay", "nan_trace", NonFiniteError, "trace", lambda P: P.vsa.decay(nan_at_0(f64(8)), 0.5)),
    Case("decay", "lam_shape", ShapeError, "lam", lambda P: P.vsa.decay(f64(2, 8), f64(3))),
    Case("cosine", "dim_mismatch", ShapeError, "b", lambda P: P.vsa.cosine(f64(8), f64(7))),
    Case("cleanup", "k_0", ConfigError, "k", lambda P: P.vsa.cleanup(f64(8), f64(4, 8), 0)),
    Case("cleanup", "k_above_rows", ConfigError, "k", lambda P: P.vsa.cleanup(f64(8), f64(4, 8), 5)),
    Case("cleanup", "codebook_rank3", ShapeError, "codebook", lambda P: P.vsa.cleanup(f64(8), f64(2, 4, 8))),
    Case("cleanup", "nan_query", NonFiniteError, "query", lambda P: P.vsa.cleanup(nan_at_0(f64(8)), f64(4, 8))),
    Case("cleanup", "nan_codebook", NonFiniteError, "codebook", lambda P: P.vsa.cleanup(f64(8), nan_at_0(f64(4, 8)))),
    Case("hrr_cosine_stats", "num_pairs_0", ConfigError, "num_pairs", lambda P: P.vsa.hrr_cosine_stats(0, 64)),
    Case("hrr_recall_bound", "delta_0", MemarchError, "delta", lambda P: P.vsa.hrr_recall_bound(2, 64, 0.0)),
    Case("hrr_recall_accuracy_bound", "num_candidates_0", ConfigError, "num_candidates",
         lambda P: P.vsa.hrr_recall_accuracy_bound(2, 64, 0)),
    Case("decayed_cumsum", "chunk_size_0", ConfigError, "chunk_size",
         lambda P: P.vsa.decayed_cumsum(f64(2, 5, 3, 4), f64(2, 5, 3), chunk_size=0)),
    Case("decayed_cumsum", "u_rank3", ShapeError, "u", lambda P: P.vsa.decayed_cumsum(f64(2, 5, 4), f64(2, 5))),
    Case("decayed_cumsum", "lam_shape", ShapeError, "lam",
         lambda P: P.vsa.decayed_cumsum(f64(2, 5, 3, 4), f64(2, 5, 2))),
    Case("decayed_cumsum", "state_shape", ShapeError, "state",
         lambda P: P.vsa.decayed_cumsum(f64(2, 5, 3, 4), f64(2, 5, 3), f64(2, 3, 5))),
    Case("SlotMemory", "num_slots_0", ConfigError, "num_slots", lambda P: P.vsa.SlotMemory(8, 0)),
    Case("SlotMemory", "decay_above_1", MemarchError, "decay", lambda P: P.vsa.SlotMemory(8, 2, decay=1.5)),
    Case("SlotMemory", "bad_mode", ConfigError, "mode", lambda P: P.vsa.SlotMemory(8, 2, mode="xor")),
    Case("SlotMemory", "chunk_size_0", ConfigError, "chunk_size", lambda P: P.vsa.SlotMemory(8, 2, chunk_size=0)),
    Case("SlotMemory", "keys_dim", ShapeError, "keys", lambda P: slot_forward(P, keys=f64(2, 5, 7))),
    Case("SlotMemory", "values_len", ShapeError, "values", lambda P: slot_forward(P, values=f64(2, 4, 8))),
    Case("SlotMemory", "gate_shape", ShapeError, "gate", lambda P: slot_forward(P, gate=f64(2, 5, 3))),
    Case("SlotMemory", "state_shape", ShapeError, "state", lambda P: slot_forward(P, state=f64(2, 3, 8))),
    Case("SlotMemory", "nan_state", NonFiniteError, "state", lambda P: slot_forward(P, state=nan_at_0(f64(2, 2, 8)))),
    Case("SlotMemory", "int_keys", DTypeError, "keys", lambda P: slot_forward(P, keys=ints(2, 5, 8))),
    Case("SlotMemory.write", "state_shape", ShapeError, "state",
         lambda P: slots(P).write(f64(2, 3, 8), f64(2, 8), f64(2, 8))),
    Case("SlotMemory.read", "query_dim", ShapeError, "query", lambda P: slots(P).read(f64(2, 2, 8), f64(2, 7))),
    # -- Omega memory (Atlas-MAG)
    Case("omega_memory", "window_0", MemarchError, "window", lambda P: omega(P, window=0)),
    Case("omega_memory", "decay_base_0", MemarchError, "decay_base", lambda P: omega(P, decay_base=0.0)),
    Case("omega_memory", "decay_base_above_1", MemarchError, "decay_base", lambda P: omega(P, decay_base=1.5)),
    Case("omega_memory", "k_shape", ShapeError, "k", lambda P: omega(P, k=f64(1, 2, 4, 4))),
    Case("omega_memory", "gate_shape", ShapeError, "gate", lambda P: omega(P, gate=f64(1, 2, 4))),
    Case("omega_memory", "int_q", DTypeError, "q", lambda P: omega(P, q=ints(1, 2, 5, 4))),
    Case("omega_memory", "float64_mix", DTypeError, "gate", lambda P: omega(P, q=f32(1, 2, 5, 4), k=f32(1, 2, 5, 4))),
    Case("omega_memory", "persistent_half", MemarchError, "norm_persistent",
         lambda P: omega(P, M_persistent=f64(2, 4, 4))),
    Case("omega_memory", "M_persistent_shape", ShapeError, "M_persistent",
         lambda P: omega(P, M_persistent=f64(2, 3, 3), norm_persistent=f64(2))),
    Case("omega_memory", "eps_negative", MemarchError, "eps", lambda P: omega(P, eps=-1.0)),
    Case("omega_memory", "block_0", MemarchError, "block", lambda P: omega(P, block=0), impls=("opt",)),
    Case("omega_weights", "window_0", MemarchError, "window", lambda P: P.omega.omega_weights(f64(1, 2, 5), 0, 0.9)),
    Case("omega_weights", "decay_base_0", MemarchError, "decay_base",
         lambda P: P.omega.omega_weights(f64(1, 2, 5), 2, 0.0)),
    Case("omega_weights", "gate_rank", ShapeError, "gate", lambda P: P.omega.omega_weights(f64(2, 5), 2, 0.9)),
    Case("persistent_memory", "rank2", ShapeError, "k_persistent", lambda P: P.omega.persistent_memory(f64(3, 4))),
    Case("persistent_memory", "int", DTypeError, "k_persistent", lambda P: P.omega.persistent_memory(ints(2, 3, 4))),
    # -- StableMax and ⊥Grad
    Case("stablemax", "int_x", DTypeError, "x", lambda P: P.stablemax.stablemax(ints(2, 4))),
    Case("stablemax_s", "int_x", DTypeError, "x", lambda P: P.stablemax.stablemax_s(ints(2, 4))),
    Case("log_stablemax", "int_x", DTypeError, "x", lambda P: P.stablemax.log_stablemax(ints(2, 4))),
    Case("stablemax_cross_entropy", "float_targets", DTypeError, "targets",
         lambda P: P.stablemax.stablemax_cross_entropy(f64(2, 5), f64(2))),
    Case("stablemax_cross_entropy", "targets_shape", ShapeError, "targets",
         lambda P: P.stablemax.stablemax_cross_entropy(f64(2, 5), ints(3))),
    Case("stablemax_cross_entropy", "target_ge_V", ShapeError, "targets",
         lambda P: P.stablemax.stablemax_cross_entropy(f64(2, 5), torch.tensor([1, 5]))),
    Case("perp_grad", "shape", ShapeError, "grad", lambda P: P.stablemax.perp_grad(f64(3, 4), f64(4, 3))),
    Case("perp_grad", "int_weight", DTypeError, "weight", lambda P: P.stablemax.perp_grad(ints(3, 4), f64(3, 4))),
    # -- Titans memory
    Case("titans_memory", "q_rank3", ShapeError, "q", lambda P: titans(P, q=f64(2, 5, 4))),
    Case("titans_memory", "k_shape", ShapeError, "k", lambda P: titans(P, k=f64(1, 2, 5, 3))),
    Case("titans_memory", "v_len", ShapeError, "v", lambda P: titans(P, v=f64(1, 2, 4, 3))),
    Case("titans_memory", "alpha_shape", ShapeError, "alpha", lambda P: titans(P, alpha=f64(1, 2, 4))),
    Case("titans_memory", "int_q", DTypeError, "q", lambda P: titans(P, q=ints(1, 2, 5, 4))),
    Case("titans_memory", "float64_mix", DTypeError, "v",
         lambda P: titans(P, v=f32(1, 2, 5, 3))),
    Case("titans_memory", "global_decay_negative", MemarchError, "global_decay",
         lambda P: titans(P, global_decay=-1.0)),
    Case("titans_memory", "initial_state_shape", ShapeError, "initial_state",
         lambda P: titans(P, initial_state=(f64(1, 2, 4, 4), f64(1, 2, 4, 4)))),
    Case("titans_memory_chunked", "chunk_size_0", MemarchError, "chunk_size",
         lambda P: titans(P, "titans_memory_chunked", chunk_size=0)),
    Case("titans_memory_read", "M_shape", ShapeError, "M",
         lambda P: P.titans.titans_memory_read(f64(1, 2, 5, 4), f64(1, 2, 3, 3))),
    Case("titans_memory_read", "int_q", DTypeError, "q",
         lambda P: P.titans.titans_memory_read(ints(1, 2, 5, 4), f64(1, 2, 4, 3))),
    Case("qk_projection", "k_shape", ShapeError, "k",
         lambda P: P.titans.qk_projection(f64(1, 2, 5, 4), f64(1, 2, 4, 4))),
    Case("qk_projection", "initial_gram_shape", ShapeError, "initial_gram",
         lambda P: P.titans.qk_projection(f64(1, 2, 5, 4), f64(1, 2, 5, 4), f64(1, 2, 3, 3))),
    Case("qk_projection", "eps_0", MemarchError, "eps",
         lambda P: P.titans.qk_projection(f64(1, 2, 5, 4), f64(1, 2, 5, 4), eps=0.0)),
    Case("qk_projection", "int_q", DTypeError, "q",
         lambda P: P.titans.qk_projection(ints(1, 2, 5, 4), f64(1, 2, 5, 4))),
    Case("qk_projection", "block_0", MemarchError, "block",
         lambda P: P.titans.qk_projection(f64(1, 2, 5, 4), f64(1, 2, 5, 4), block=0), impls=("opt",)),
    Case("TitansMemory", "dim_0", MemarchError, "dim", lambda P: P.titans.TitansMemory(0, 2, 4, 4)),
    Case("TitansMemory", "momentum_1", MemarchError, "momentum", lambda P: P.titans.TitansMemory(8, 2, 4, 4,
                                                                                                momentum=1.0)),
    Case("TitansMemory", "x_dim", ShapeError, "x", lambda P: P.titans.TitansMemory(8, 2, 4, 4)(f32(2, 5, 6))),
    Case("TitansMemory", "state_type", ShapeError, "state",
         lambda P: P.titans.TitansMemory(8, 2, 4, 4)(f32(2, 5, 8), (f32(2, 2, 4, 4), f32(2, 2, 4, 4)))),
    # -- token models (input_ids: float, rank 1, L = 0, an id >= vocab_size, a negative id)
    *token_model_cases("GRUModel", "gru"),
    *token_model_cases("AtlasMAG", "atlas_mag"),
    *token_model_cases("AtlasOmega", "atlas_omega"),
    *token_model_cases("HAMT", "hamt"),
    *token_model_cases("EMMA", "emma_liquid"),
    *token_model_cases("UnifiedMambaHopfieldDEQ", "unified"),
    Case("GRUModel", "state_shape", ShapeError, "state", lambda P: model(P, "gru")(GOOD_IDS, state=f32(1, 2, 7))),
    Case("GRUConfig", "hidden_dim_0", ConfigError, "hidden_dim", lambda P: config("gru", hidden_dim=0), ("shared",)),
    Case("AtlasMAGConfig", "decay_base_0", ConfigError, "decay_base", lambda P: config("atlas_mag", decay_base=0.0),
         ("shared",)),
    Case("AtlasMAGConfig", "window_0", ConfigError, "window", lambda P: config("atlas_mag", window=0), ("shared",)),
    Case("AtlasMAGConfig", "heads_not_dividing", ConfigError, "dim", lambda P: config("atlas_mag", num_heads=3),
         ("shared",)),
    Case("MAGBlock", "x_dim", ShapeError, "x",
         lambda P: P.atlas_mag.MAGBlock(config("atlas_mag"))(f32(2, 3, 6))),
    Case("OmegaMemoryBranch", "h_dim", ShapeError, "h",
         lambda P: P.atlas_mag.OmegaMemoryBranch(config("atlas_mag"))(f32(2, 3, 6), None)),
    Case("AtlasOmega", "state_layers", ShapeError, "state", lambda P: model(P, "atlas_omega")(GOOD_IDS, state=[])),
    Case("AtlasOmegaConfig", "gate_floor_values", ConfigError, "gate_floor_values",
         lambda P: config("atlas_omega", gate_floor_values=(0.3,)), ("shared",)),
    Case("AtlasOmegaBlock", "x_dim", ShapeError, "x",
         lambda P: P.atlas_omega.AtlasOmegaBlock(config("atlas_omega"))(f32(2, 3, 6), None, torch.tensor(0.3), True)),
    Case("HAMT", "beyond_max_seq_len", ShapeError, "max_seq_len", lambda P: model(P, "hamt")(ints(1, 17))),
    Case("HAMT", "state_type", ShapeError, "state",
         lambda P: model(P, "hamt")(GOOD_IDS, state=tuple(hamt_state(P, 2)))),
    Case("HAMT", "state_batch", ShapeError, "state.memory",
         lambda P: model(P, "hamt")(GOOD_IDS, state=hamt_state(P, 3))),
    Case("HAMT.step", "token_ids_rank2", ShapeError, "token_ids",
         lambda P: model(P, "hamt").step(hamt_state(P, 2), GOOD_IDS)),
    Case("HAMT.step", "cache_batch", ShapeError, "cache", lambda P: model(P, "hamt").step(hamt_state(P, 3), ints(2))),
    Case("HAMT.step", "id_ge_vocab", ShapeError, "token_ids",
         lambda P: model(P, "hamt").step(hamt_state(P, 1), torch.tensor([VOCAB]))),
    Case("HAMTLayer", "x_dim", ShapeError, "x", lambda P: P.hamt.HAMTLayer(config("hamt"))(f32(2, 3, 6))),
    Case("HAMTLayer", "state_shape", ShapeError, "state",
         lambda P: P.hamt.HAMTLayer(config("hamt"))(f32(2, 3, 8), f32(2, 3, 16))),
    Case("HAMTConfig", "num_slots_0", ConfigError, "num_slots", lambda P: config("hamt", num_slots=0), ("shared",)),
    Case("HAMTConfig", "decay_0", ConfigError, "decay", lambda P: config("hamt", decay=0.0), ("shared",)),
    Case("HAMTConfig", "decay_above_1", ConfigError, "decay", lambda P: config("hamt", decay=1.5), ("shared",)),
    Case("HAMTConfig", "bad_binding", ConfigError, "binding", lambda P: config("hamt", binding="xor"), ("shared",)),
    Case("EMMAConfig", "layout_vocab", ConfigError, "vocab_size",
         lambda P: config("emma_liquid", num_filler=2, num_keys=2, num_values=2), ("shared",)),
    Case("EMMAConfig", "top_k_above_rows", ConfigError, "top_k", lambda P: config("emma_liquid", top_k=12),
         ("shared",)),
    Case("EMMAConfig", "memory_decay_above_1", ConfigError, "memory_decay",
         lambda P: config("emma_liquid", memory_decay=1.5), ("shared",)),
    Case("EMMAConfig", "deq_lipschitz_1", ConfigError, "deq_lipschitz",
         lambda P: config("emma_liquid", deq_lipschitz=1.0), ("shared",)),
    Case("UnifiedMambaHopfieldDEQ", "z_init_shape", ShapeError, "z_init",
         lambda P: model(P, "unified")(GOOD_IDS, z_init=f32(2, 2, 8))),
    Case("UnifiedMambaHopfieldDEQ.step", "token_ids_rank2", ShapeError, "token_ids",
         lambda P: model(P, "unified").step(model(P, "unified").init_cache(2), GOOD_IDS)),
    Case("UnifiedMambaHopfieldDEQ.step", "cache_layers", ShapeError, "cache",
         lambda P: model(P, "unified").step(P.unified.UnifiedCache([]), ints(2))),
    Case("UnifiedMambaHopfieldDEQ.generate", "max_length_short", ConfigError, "max_length",
         lambda P: model(P, "unified").generate(GOOD_IDS, 2)),
    Case("UnifiedMambaHopfieldDEQ.generate", "temperature_negative", ConfigError, "temperature",
         lambda P: model(P, "unified").generate(GOOD_IDS, 4, temperature=-1.0)),
    Case("UnifiedMambaHopfieldDEQ.generate", "top_k_negative", ConfigError, "top_k",
         lambda P: model(P, "unified").generate(GOOD_IDS, 4, top_k=-1)),
    Case("UnifiedConfig", "bad_solver_type", ConfigError, "solver_type",
         lambda P: config("unified", solver_type="newton"), ("shared",)),
    Case("UnifiedConfig", "beta_0", ConfigError, "beta", lambda P: config("unified", beta=0.0), ("shared",)),
    Case("UnifiedConfig", "memory_size_0", ConfigError, "memory_size", lambda P: config("unified", memory_size=0),
         ("shared",)),
    Case("UnifiedConfig", "simultaneous_mix_1", ConfigError, "simultaneous_mix",
         lambda P: config("unified", simultaneous_mix=1.0), ("shared",)),
    # -- liquid cell
    Case("LiquidCell", "ode_unfolds_0", ConfigError, "ode_unfolds", lambda P: P.liquid.LiquidCell(4, 8, ode_unfolds=0)),
    Case("LiquidCell", "dt_0", ConfigError, "dt", lambda P: P.liquid.LiquidCell(4, 8, dt=0.0)),
    Case("LiquidCell", "x_dim", ShapeError, "x", lambda P: P.liquid.LiquidCell(4, 8)(f32(2, 5, 3))),
    Case("LiquidCell", "x_rank2", ShapeError, "x", lambda P: P.liquid.LiquidCell(4, 8)(f32(5, 4))),
    Case("LiquidCell", "int_x", DTypeError, "x", lambda P: P.liquid.LiquidCell(4, 8)(ints(2, 5, 4))),
    Case("LiquidCell", "h0_shape", ShapeError, "h0", lambda P: P.liquid.LiquidCell(4, 8)(f32(2, 5, 4), f32(2, 7))),
    # -- DEQ solvers and blocks
    Case("solve", "bad_method", ConfigError, "method", lambda P: P.deq.solve(contraction, f64(2, 3), method="newton")),
    Case("solve", "tol_0", ConfigError, "tol", lambda P: P.deq.solve(contraction, f64(2, 3), tol=0.0)),
    Case("solve", "max_iter_negative", ConfigError, "max_iter",
         lambda P: P.deq.solve(contraction, f64(2, 3), max_iter=-1)),
    Case("solve", "bad_policy", ConfigError, "policy", lambda P: P.deq.solve(contraction, f64(2, 3), policy="ignore")),
    Case("solve", "int_z0", DTypeError, "z0", lambda P: P.deq.solve(contraction, ints(2, 3))),
    Case("solve", "empty_batch", ShapeError, "z0", lambda P: P.deq.solve(contraction, f64(0, 3))),
    Case("solve", "f_changes_shape", ShapeError, "f", lambda P: P.deq.solve(lambda z: z[:, :2], f64(2, 3))),
    Case("solve", "nan_z0", NonFiniteError, "z_0", lambda P: P.deq.solve(contraction, nan_at_0(f64(2, 3)))),
    Case("solve", "raise_policy", ConvergenceError, "max_iter",
         lambda P: P.deq.solve(lambda z: 0.99 * z + 1, f64(2, 3), max_iter=2, policy="raise")),
    Case("anderson", "m_0", ConfigError, "m", lambda P: P.deq.anderson(contraction, f64(2, 3), m=0)),
    Case("anderson", "beta_above_1", ConfigError, "beta", lambda P: P.deq.anderson(contraction, f64(2, 3), beta=1.5)),
    Case("anderson", "lam_negative", ConfigError, "lam", lambda P: P.deq.anderson(contraction, f64(2, 3), lam=-1.0)),
    Case("broyden", "tol_negative", ConfigError, "tol", lambda P: P.deq.broyden(contraction, f64(2, 3), tol=-1.0)),
    Case("fixed_point_iteration", "max_iter_float", ConfigError, "max_iter",
         lambda P: P.deq.fixed_point_iteration(contraction, f64(2, 3), max_iter=2.5)),
    Case("energy_stop", "tol_energy_0", ConfigError, "tol_energy",
         lambda P: P.deq.energy_stop(lambda z: z.sum(-1), 0.0)),
    Case("equilibrium", "nan_z0", NonFiniteError, "z_0", lambda P: P.deq.equilibrium(contraction, nan_at_0(f64(2, 3)))),
    Case("DEQConfig", "bad_solver", ConfigError, "solver", lambda P: load("reference.deq", "DEQConfig")(solver="x"),
         ("shared",)),
    Case("DEQConfig", "bad_backward", ConfigError, "backward",
         lambda P: load("reference.deq", "DEQConfig")(backward="adjoint"), ("shared",)),
    Case("DEQConfig", "anderson_beta_0", ConfigError, "anderson_beta",
         lambda P: load("reference.deq", "DEQConfig")(anderson_beta=0.0), ("shared",)),
    Case("FixedPointBlock", "x_dim", ShapeError, "x", lambda P: block(P)(f32(2, 5, 3))),
    Case("FixedPointBlock", "mem_dim", ShapeError, "mem", lambda P: block(P)(f32(2, 5, 4), f32(2, 5, 2))),
    Case("FixedPointBlock", "mem_without_d_mem", ConfigError, "mem",
         lambda P: P.deq.FixedPointBlock(4)(f32(2, 5, 4), f32(2, 5, 3))),
    Case("FixedPointBlock", "z_init_shape", ShapeError, "z_init",
         lambda P: block(P)(f32(2, 5, 4), f32(2, 5, 3), z_init=f32(2, 4, 4))),
    Case("FixedPointBlock", "nan_x", NonFiniteError, "x", lambda P: block(P)(nan_at_0(f32(2, 5, 4)), f32(2, 5, 3))),
    Case("FixedPointBlock", "nan_mem", NonFiniteError, "mem", lambda P: block(P)(f32(2, 5, 4), nan_at_0(f32(2, 5, 3)))),
    Case("FixedPointBlock", "int_x", DTypeError, "x", lambda P: block(P)(ints(2, 5, 4), f32(2, 5, 3))),
    Case("SpectralNormLinear", "lipschitz_0", ConfigError, "lipschitz",
         lambda P: P.deq.SpectralNormLinear(4, 4, lipschitz=0.0)),
    Case("SpectralNormLinear", "bad_sigma_method", ConfigError, "sigma_method",
         lambda P: P.deq.SpectralNormLinear(4, 4, sigma_method="svd")),
    Case("SpectralNormLinear", "n_power_iterations_0", ConfigError, "n_power_iterations",
         lambda P: P.deq.SpectralNormLinear(4, 4, n_power_iterations=0)),
    Case("stability_loss", "contraction_target_0", ConfigError, "contraction_target",
         lambda P: P.deq.stability_loss(contraction, f64(2, 3), 0.0)),
    Case("jacobian_spectral_norm", "int_z", DTypeError, "z",
         lambda P: P.deq.jacobian_spectral_norm(contraction, ints(2, 3))),
    Case("jacobian_frobenius_sq", "int_z", DTypeError, "z",
         lambda P: P.deq.jacobian_frobenius_sq(contraction, ints(2, 3))),
    # -- selective scan (the checks live in reference/ssm.py and run in both implementations)
    Case("selective_scan", "u_rank2", ShapeError, "u", lambda P: scan(P, u=f64(4, 5))),
    Case("selective_scan", "empty_seq", ShapeError, "u", lambda P: scan(P, u=f64(2, 4, 0), delta=f64(2, 4, 0),
                                                                          B=f64(2, 3, 0), C=f64(2, 3, 0), z=None)),
    Case("selective_scan", "int_u", DTypeError, "u", lambda P: scan(P, u=ints(2, 4, 5))),
    Case("selective_scan", "delta_shape", ShapeError, "delta", lambda P: scan(P, delta=f64(2, 4, 4))),
    Case("selective_scan", "A_channels", ShapeError, "A", lambda P: scan(P, A=-f64(3, 3).exp())),
    Case("selective_scan", "B_shape", ShapeError, "B", lambda P: scan(P, B=f64(2, 2, 5))),
    Case("selective_scan", "C_groups", ShapeError, "C", lambda P: scan(P, C=f64(2, 3, 3, 5))),
    Case("selective_scan", "D_shape", ShapeError, "D", lambda P: scan(P, D=f64(3))),
    Case("selective_scan", "z_shape", ShapeError, "z", lambda P: scan(P, z=f64(2, 4, 4))),
    Case("selective_scan", "delta_bias_shape", ShapeError, "delta_bias", lambda P: scan(P, delta_bias=f64(2, 4))),
    Case("selective_scan", "initial_state_shape", ShapeError, "initial_state",
         lambda P: scan(P, initial_state=f64(2, 4, 2))),
    Case("selective_scan_step", "state_shape", ShapeError, "state", lambda P: scan_step(P, state=f64(2, 4, 2))),
    Case("selective_scan_step", "u_t_rank", ShapeError, "u_t", lambda P: scan_step(P, u_t=f64(2, 4, 1))),
    Case("selective_scan_step", "delta_t_shape", ShapeError, "delta_t", lambda P: scan_step(P, delta_t=f64(2, 3))),
    Case("selective_scan_step", "B_t_shape", ShapeError, "B_t", lambda P: scan_step(P, B_t=f64(2, 2))),
    # -- Mamba
    Case("MambaBlock", "d_state_0", ConfigError, "d_state", lambda P: P.mamba.MambaBlock(8, d_state=0)),
    Case("MambaBlock", "dt_min_above_dt_max", ConfigError, "dt_min",
         lambda P: P.mamba.MambaBlock(8, dt_min=0.2, dt_max=0.1)),
    Case("MambaBlock", "x_dim", ShapeError, "x", lambda P: P.mamba.MambaBlock(8, 4)(f32(2, 5, 6))),
    Case("MambaBlock", "x_rank2", ShapeError, "x", lambda P: P.mamba.MambaBlock(8, 4)(f32(5, 8))),
    Case("MambaBlock", "int_x", DTypeError, "x", lambda P: P.mamba.MambaBlock(8, 4)(ints(2, 5, 8))),
    Case("MambaBlock.step", "x_t_rank3", ShapeError, "x",
         lambda P: P.mamba.MambaBlock(8, 4).step(f32(2, 1, 8), P.mamba.MambaBlock(8, 4).init_state(2))),
    Case("MambaStack", "n_layers_0", ConfigError, "n_layers", lambda P: P.mamba.MambaStack(8, 4, n_layers=0)),
    Case("MambaStack.step", "states_count", ShapeError, "states",
         lambda P: P.mamba.MambaStack(8, 4, n_layers=2).step(f32(2, 8), [])),
    # -- Hopfield memory
    Case("hopfield_retrieve", "beta_0", ConfigError, "beta",
         lambda P: P.hopfield.hopfield_retrieve(f64(3, 4), f64(5, 4), 0.0)),
    Case("hopfield_retrieve", "beta_inf", ConfigError, "beta",
         lambda P: P.hopfield.hopfield_retrieve(f64(3, 4), f64(5, 4), math.inf)),
    Case("hopfield_retrieve", "X_rank1", ShapeError, "X",
         lambda P: P.hopfield.hopfield_retrieve(f64(3, 4), f64(4), 1.0)),
    Case("hopfield_retrieve", "X_empty", ShapeError, "X",
         lambda P: P.hopfield.hopfield_retrieve(f64(3, 4), f64(0, 4), 1.0)),
    Case("hopfield_retrieve", "xi_dim", ShapeError, "xi",
         lambda P: P.hopfield.hopfield_retrieve(f64(3, 5), f64(5, 4), 1.0)),
    Case("hopfield_retrieve", "int_xi", DTypeError, "xi",
         lambda P: P.hopfield.hopfield_retrieve(ints(3, 4), f64(5, 4), 1.0)),
    Case("hopfield_retrieve", "float64_mix", DTypeError, "X",
         lambda P: P.hopfield.hopfield_retrieve(f32(3, 4), f64(5, 4), 1.0)),
    Case("hopfield_retrieve", "chunk_size_0", ConfigError, "chunk_size",
         lambda P: P.hopfield.hopfield_retrieve(f64(3, 4), f64(5, 4), 1.0, chunk_size=0), ("opt",)),
    Case("hopfield_energy", "beta_negative", ConfigError, "beta",
         lambda P: P.hopfield.hopfield_energy(f64(3, 4), f64(5, 4), -1.0)),
    Case("separation", "one_pattern", ShapeError, "X", lambda P: P.hopfield.separation(f64(1, 4), 0)),
    Case("separation", "i_out_of_range", ShapeError, "i", lambda P: P.hopfield.separation(f64(3, 4), 3)),
    Case("retrieval_error_bound", "xi_shape", ShapeError, "xi",
         lambda P: P.hopfield.retrieval_error_bound(f64(3, 4), 0, f64(2, 4), 1.0)),
    Case("HopfieldMemory", "memory_size_0", ConfigError, "memory_size", lambda P: P.hopfield.HopfieldMemory(0, 4)),
    Case("HopfieldMemory", "beta_0", ConfigError, "beta", lambda P: P.hopfield.HopfieldMemory(5, 4, 0.0)),
    Case("HopfieldMemory", "xi_dim", ShapeError, "xi", lambda P: P.hopfield.HopfieldMemory(5, 4)(f32(3, 5))),
    Case("HopfieldMemory.write", "patterns_dim", ShapeError, "patterns",
         lambda P: P.hopfield.HopfieldMemory(5, 4).write(f32(2, 3))),
    Case("HopfieldMemory.write", "start_past_end", ShapeError, "start",
         lambda P: P.hopfield.HopfieldMemory(5, 4).write(f32(2, 4), start=4)),
    # -- training: model building, configs, tasks, the trainer, checkpoints, generation
    Case("build_model", "unknown_model", ConfigError, "model.name",
         lambda P: load("training.registry", "build_model")({"name": "transformer", "vocab_size": 5}), ("shared",)),
    Case("build_model", "bad_impl", ConfigError, "impl",
         lambda P: load("training.registry", "build_model")({"name": "gru", "vocab_size": 5}, "fast"), ("shared",)),
    Case("build_model", "no_name", ConfigError, "name",
         lambda P: load("training.registry", "build_model")({"vocab_size": 5}), ("shared",)),
    Case("build_model", "not_a_config", ConfigError, "config",
         lambda P: load("training.registry", "build_model")(3), ("shared",)),
    Case("load_yaml", "missing_file", ConfigError, "no-such-file.yaml",
         lambda P: load("training.config", "load_yaml")(ROOT / "no-such-file.yaml"), ("shared",)),
    Case("load_experiment", "unknown_key", ConfigError, "model.hidden", lambda P: experiment(model={"hidden": 3}),
         ("shared",)),
    Case("load_experiment", "unknown_section", ConfigError, "optim",
         lambda P: load("training.config", "load_experiment")({**GRU_RUN, "optim": {}}), ("shared",)),
    Case("load_experiment", "missing_section", ConfigError, "task",
         lambda P: load("training.config", "load_experiment")({"model": GRU_RUN["model"]}), ("shared",)),
    Case("load_experiment", "vocab_below_task", ConfigError, "model.vocab_size",
         lambda P: experiment(model={"vocab_size": 3}), ("shared",)),
    Case("load_experiment", "wrong_type", ConfigError, "train.lr", lambda P: experiment(train={"lr": "fast"}),
         ("shared",)),
    Case("load_experiment", "bool_for_int", ConfigError, "model.hidden_dim",
         lambda P: experiment(model={"hidden_dim": True}), ("shared",)),
    Case("apply_overrides", "no_section", ConfigError, "--set",
         lambda P: load("training.config", "apply_overrides")(GRU_RUN, ["lr=3"]), ("shared",)),
    Case("apply_overrides", "unknown_section", ConfigError, "optim",
         lambda P: load("training.config", "apply_overrides")(GRU_RUN, ["optim.lr=3"]), ("shared",)),
    Case("TrainConfig", "steps_0", ConfigError, "steps", lambda P: experiment(train={"steps": 0}), ("shared",)),
    Case("TrainConfig", "betas_1", ConfigError, "betas", lambda P: experiment(train={"betas": [0.9, 1.0]}),
         ("shared",)),
    Case("TrainConfig", "unknown_probe", ConfigError, "probes", lambda P: experiment(train={"probes": ["nope"]}),
         ("shared",)),
    Case("NeedleConfig", "n_needles_above_L", ConfigError, "n_needles",
         lambda P: experiment(task={"n_needles": 4, "num_keys": 4}), ("shared",)),
    Case("NeedleConfig", "num_keys_below_n", ConfigError, "num_keys",
         lambda P: experiment(task={"n_needles": 3, "seq_len": 8}), ("shared",)),
    Case("ModularConfig", "p_1", ConfigError, "p", lambda P: task("modular", p=1), ("shared",)),
    Case("TextConfig", "no_files", ConfigError, "files", lambda P: task("text", files=()), ("shared",)),
    Case("Task.batch", "bad_split", ConfigError, "split",
         lambda P: task("needle", n_needles=1, seq_len=6).batch("dev", 0, 2, 0), ("shared",)),
    Case("Task.batch", "batch_size_0", ConfigError, "batch_size",
         lambda P: task("needle", n_needles=1, seq_len=6).batch("train", 0, 0, 0), ("shared",)),
    Case("Task.batch", "index_negative", ConfigError, "index",
         lambda P: task("modular", p=5).batch("train", -1, 2, 0), ("shared",)),
    Case("train", "max_steps_negative", ConfigError, "--max-steps", lambda P: run_train(max_steps=-1), ("shared",)),
    Case("train", "resume_without_checkpoint", ConfigError, "checkpoint", lambda P: run_train(resume=True),
         ("shared",)),
    Case("train", "resume_other_config", ConfigError, "--resume",
         lambda P: run_train(resume=True, out=trained_checkpoint().parent, lr=1e-4), ("shared",)),
    Case("load_checkpoint", "missing", ConfigError, "checkpoint",
         lambda P: load("training.checkpoint", "load_checkpoint")(ROOT / "no-such-run" / "checkpoint.pt"), ("shared",)),
    Case("load_checkpoint", "truncated", ConfigError, "checkpoint", lambda P: truncated_checkpoint(), ("shared",)),
    Case("load_model_weights", "other_model", ConfigError, "emma_liquid",
         lambda P: load("training.checkpoint", "load_model_weights")(
             _model("optimized", "gru"), load("training.checkpoint", "load_checkpoint")(trained_checkpoint()),
             "emma_liquid"), ("shared",)),
    Case("generate", "prompt_rank1", ConfigError, "prompt",
         lambda P: load("training.generation", "generate")(_model("optimized", "gru"), GOOD_IDS[0], 2), ("shared",)),
    Case("generate", "max_new_tokens_negative", ConfigError, "max_new_tokens",
         lambda P: load("training.generation", "generate")(_model("optimized", "gru"), GOOD_IDS, -1), ("shared",)),
    Case("generate", "temperature_negative", ConfigError, "temperature",
         lambda P: load("training.generation", "generate")(_model("optimized", "gru"), GOOD_IDS, 2, temperature=-1.0),
         ("shared",)),
    Case("generate", "top_k_negative", ConfigError, "top_k",
         lambda P: load("training.generation", "generate")(_model("optimized", "gru"), GOOD_IDS, 2, top_k=-1),
         ("shared",)),
    Case("resolve_device", "unknown_device", ConfigError, "--device",
         lambda P: load("training.device", "resolve_device")("tpu"), ("shared",)),
    Case("load_tokenizer", "not_local", ConfigError, "tokenizer",
         lambda P: load("training.tokenizer", "load_tokenizer")("gpt2"), ("shared",)),
]


def truncated_checkpoint() -> object:
    from training.checkpoint import load_checkpoint

    blob = trained_checkpoint().read_bytes()
    path = Path(tmp_out()) / "checkpoint.pt"
    path.write_bytes(blob[: len(blob) // 2])
    return load_checkpoint(path)


def named(arg: str) -> str:
    """A regex that finds `arg` as a whole word (not inside a longer identifier)."""
    return rf"(?<![\w]){re.escape(arg)}(?![\w])"


CASE_PARAMS = [pytest.param(impl, case, id=f"{impl}-{case.entry}-{case.bad}") for case in CASES for impl in case.impls]


@pytest.mark.parametrize(("impl", "case"), CASE_PARAMS)
def test_bad_input(impl: str, case: Case) -> None:
    with pytest.raises(MemarchError) as info:
        case.call(Impl(PACKAGES[impl]))
    assert isinstance(info.value, case.error), f"{type(info.value).__name__} is not a {case.error.__name__}"
    assert re.search(named(case.arg), str(info.value)), f"the message does not name {case.arg!r}: {info.value}"


# ---------------------------------------------------------------------------------------------- empty sequences

@dataclass(frozen=True)
class Empty:
    """An entry point for which L = 0 is well defined: it returns an empty result of this shape."""

    entry: str
    call: Callable[[Impl], Any]
    shape: tuple[int, ...]


EMPTY: list[Empty] = [
    Empty("conv1d", lambda P: P.primitives.causal_depthwise_conv1d(f64(2, 0, 4), f64(4, 3)), (2, 0, 4)),
    Empty("swa", lambda P: P.attention.sliding_window_attention(f64(1, 2, 0, 4), f64(1, 2, 0, 4), f64(1, 2, 0, 3), 2),
          (1, 2, 0, 3)),
    Empty("omega_memory", lambda P: P.omega.omega_memory(f64(1, 2, 0, 4), f64(1, 2, 0, 4), f64(1, 2, 0), 2),
          (1, 2, 0, 4)),
    Empty("titans_memory", lambda P: titans(P, q=f64(1, 2, 0, 4), k=f64(1, 2, 0, 4), v=f64(1, 2, 0, 3),
                                            alpha=f64(1, 2, 0), eta=f64(1, 2, 0), theta=f64(1, 2, 0))[0],
          (1, 2, 0, 3)),
    Empty("qk_projection", lambda P: P.titans.qk_projection(f64(1, 2, 0, 4), f64(1, 2, 0, 4))[0], (1, 2, 0, 4)),
    Empty("decayed_cumsum", lambda P: P.vsa.decayed_cumsum(f64(2, 0, 3, 4), f64(2, 0, 3)), (2, 0, 3, 4)),
    Empty("SlotMemory", lambda P: slot_forward(P, keys=f64(2, 0, 8), values=f64(2, 0, 8), queries=f64(2, 0, 8))[0],
          (2, 0, 2, 8)),
    Empty("LiquidCell", lambda P: P.liquid.LiquidCell(4, 8)(f32(2, 0, 4))[0], (2, 0, 8)),
]


@pytest.mark.parametrize(("impl", "case"), [pytest.param(impl, case, id=f"{impl}-{case.entry}")
                                            for case in EMPTY for impl in BOTH])
def test_empty_sequence_gives_an_empty_result(impl: str, case: Empty) -> None:
    out = case.call(Impl(PACKAGES[impl]))
    assert isinstance(out, Tensor) and tuple(out.shape) == case.shape


# ---------------------------------------------------------------------------------------------- the CLIs

script = load_script


def write_yaml(data: object) -> str:
    path = Path(tmp_out()) / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def with_model(name: str, **changes: Any) -> dict[str, Any]:
    return {**GRU_RUN, "model": {"name": name, **changes}}


@dataclass(frozen=True)
class CliCase:
    script: str
    bad: str
    arg: str  # the `error:` line must name it
    argv: Callable[[], list[str]]


TRAIN = ["--device", "cpu", "--no-progress"]
CLI_CASES: list[CliCase] = [
    CliCase("train", "missing_config", "config file not found",
            lambda: ["--config", str(ROOT / "no-such.yaml"), "--out", tmp_out(), *TRAIN]),
    CliCase("train", "unknown_key", "model.hidden",
            lambda: ["--config", write_yaml(with_model("gru", hidden=3)), "--out", tmp_out(), *TRAIN]),
    CliCase("train", "unknown_model", "model.name",
            lambda: ["--config", write_yaml(with_model("transformer")), "--out", tmp_out(), *TRAIN]),
    CliCase("train", "bad_impl", "--impl", lambda: ["--impl", "fast", *TRAIN]),
    CliCase("train", "negative_max_steps", "--max-steps",
            lambda: ["--config", write_yaml(GRU_RUN), "--out", tmp_out(), "--max-steps", "-1", *TRAIN]),
    CliCase("train", "resume_without_checkpoint", "checkpoint",
            lambda: ["--config", write_yaml(GRU_RUN), "--out", tmp_out(), "--resume", *TRAIN]),
    CliCase("train", "resume_other_model", "--resume",
            lambda: ["--config", write_yaml(with_model("hamt", **TINY["hamt"])), "--out",
                     str(trained_checkpoint().parent), "--resume", *TRAIN]),
    CliCase("train", "bad_device", "--device", lambda: ["--config", write_yaml(GRU_RUN), "--device", "tpu"]),
    CliCase("train", "bad_set", "--set", lambda: ["--config", write_yaml(GRU_RUN), "--set", "lr=3", *TRAIN]),
    CliCase("evaluate", "no_checkpoint", "checkpoint", lambda: ["--out", tmp_out(), "--device", "cpu"]),
    CliCase("evaluate", "batches_0", "--batches",
            lambda: ["--out", str(trained_checkpoint().parent), "--batches", "0", "--device", "cpu"]),
    CliCase("evaluate", "bad_split", "--split", lambda: ["--out", tmp_out(), "--split", "dev"]),
    CliCase("generate", "no_checkpoint", "checkpoint", lambda: ["--model", tmp_out(), "--device", "cpu"]),
    CliCase("generate", "negative_max_tokens", "--max-tokens",
            lambda: ["--model", str(trained_checkpoint()), "--max-tokens", "-1", "--device", "cpu"]),
    CliCase("bench", "unknown_op", "--op", lambda: ["--op", "nope", "--device", "cpu"]),
    CliCase("bench", "unknown_model", "--model", lambda: ["--model", "nope", "--device", "cpu"]),
    CliCase("bench", "unknown_config_field", "memory_sise",
            lambda: ["--model", "unified", "--set", "memory_sise=5000", "--device", "cpu"]),
    CliCase("bench", "set_without_value", "--set",
            lambda: ["--model", "gru", "--set", "hidden_dim", "--device", "cpu"]),
    CliCase("bench", "tokens_per_step_with_batch_size", "--tokens-per-step",
            lambda: ["--model", "gru", "--tokens-per-step", "64", "--batch-size", "2", "--device", "cpu"]),
    CliCase("bench", "tokens_per_step_below_seq_len", "--tokens-per-step",
            lambda: ["--model", "gru", "--tokens-per-step", "16", "--seq-lens", "32", "--device", "cpu"]),
    CliCase("demo", "missing_config", "config file not found", lambda: ["--config", str(ROOT / "no-such.yaml")]),
    CliCase("demo", "not_hamt", "--config", lambda: ["--config", write_yaml(GRU_RUN)]),
    CliCase("demo", "steps_0", "--steps", lambda: ["--steps", "0"]),
    CliCase("analyze_checkpoint", "no_checkpoint", "checkpoint", lambda: ["--model", tmp_out(), "--device", "cpu"]),
    CliCase("profile_step", "autocast_on_cpu", "--autocast",
            lambda: ["--model", "gru", "--seq-len", "8", "--autocast", "--device", "cpu"]),
    CliCase("profile_step", "seq_len_0", "--seq-len", lambda: ["--model", "gru", "--seq-len", "0", "--device", "cpu"]),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=f"{c.script}-{c.bad}") for c in CLI_CASES])
def test_cli_bad_input(case: CliCase, capsys: pytest.CaptureFixture[str]) -> None:
    argv = case.argv()
    main = script(case.script).main
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert re.search(named(case.arg), lines[0]), f"the error line does not name {case.arg!r}: {lines[0]}"


# ---------------------------------------------------------------------------------------------- the table

def expand(pattern: str) -> list[str]:
    """Shell-style brace expansion without nesting: `a-{x,y}-{1,2}` → a-x-1, a-x-2, a-y-1, a-y-2."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [out for option in match.group(1).split(",") for out in expand(head + option + tail)]


def table_rows() -> Iterator[tuple[str, set[str], list[str]]]:
    """(entry point, error names, test ids) of every row of the "Bad input" table in specs/README.md."""
    text = (ROOT / "specs" / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Bad input", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("entry point", "") or set(cells[0]) <= set("-: "):
            continue
        errors = set(re.findall(r"`(\w+Error)`", cells[2]))
        ids = [i for spec in re.findall(r"`([^`]+)`", cells[3]) for i in expand(spec)]
        yield cells[0], errors, ids


def test_the_bad_input_table_in_specs_lists_exactly_the_collected_cases() -> None:
    collected = {f"test_bad_input[{p.id}]" for p in CASE_PARAMS}
    collected |= {f"test_empty_sequence_gives_an_empty_result[{impl}-{c.entry}]" for c in EMPTY for impl in BOTH}
    collected |= {f"test_cli_bad_input[{c.script}-{c.bad}]" for c in CLI_CASES}
    errors_of = {f"test_bad_input[{i}]": c.error.__name__ for c in CASES for i in c.ids()}
    listed: list[str] = []
    for entry, errors, ids in table_rows():
        assert ids, f"row {entry!r} lists no test id"
        unknown = [i for i in ids if i not in collected]
        assert not unknown, f"row {entry!r} lists test ids that are not collected: {unknown}"
        raised = {errors_of[i] for i in ids if i in errors_of}
        assert raised == errors, f"row {entry!r}: the table says {sorted(errors)}, the cases raise {sorted(raised)}"
        listed += ids
    missing = sorted(collected - set(listed))
    assert not missing, f"cases missing from the table in specs/README.md: {missing}"
    assert len(listed) == len(set(listed)), "a test id is listed twice"
