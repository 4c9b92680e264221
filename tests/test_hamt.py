"""HAMT ([HAMT-1] … [HAMT-11]): optimized ≡ reference (float64 and float32, forward and gradients, both binding
modes), causality, segment-wise forward with the carried state ≡ one full pass, generation with the carried
state ≡ recomputing the prefix, a state whose size does not depend on L, superposition recall above the spec's
bound, decay never growing the trace, the parameter count of the seed's demo model, bad input, CPU training
(loss falls, with and without truncated BPTT) and associative recall learned on CPU."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import optimized.hamt as opt
import optimized.vsa as opt_vsa
import reference.hamt as ref
import reference.vsa as ref_vsa
from reference.validation import ConfigError, DTypeError, ShapeError
from tests.causality import assert_causal
from tests.equivalence import assert_close_scaled, assert_modules_equivalent
from tests.strategies import make_tensor, seeds
from tests.tolerances import tolerance
from training import load_experiment
from training.generation import generate
from training.loop import train

ROOT = Path(__file__).resolve().parent.parent
MODES = pytest.mark.parametrize("mode", ["elementwise", "circular"])
IMPLS = pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])


def tiny_config(**kw: Any) -> ref.HAMTConfig:
    base: dict[str, Any] = {"key_conv": 3,
                            "vocab_size": 13, "hidden_dim": 8, "hcm_dim": 12, "num_layers": 2, "num_slots": 3,
                            "max_seq_len": 40, "ffn_dim": 10, "gate_hidden_dim": 6, "chunk_size": 4,
                            "init_std": 0.3}
    base.update(kw)
    return ref.HAMTConfig(**base)


def build(impl: Any, cfg: ref.HAMTConfig, seed: int = 0) -> ref.HAMT:
    torch.manual_seed(seed)
    model: ref.HAMT = impl.HAMT(cfg)
    return model.double()


def tokens(cfg: ref.HAMTConfig, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def logits_and_aux(out: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return out["logits"], out["aux_loss"]


# ---------------------------------------------------------------------------------------------- equivalence

@MODES
@given(dtype=st.sampled_from([torch.float64, torch.float32]), length=st.integers(1, 9), seed=seeds)
def test_optimized_model_matches_reference_outputs_and_gradients(mode: str, dtype: torch.dtype, length: int,
                                                                   seed: int) -> None:
    cfg = tiny_config(binding=mode, tie_embeddings=seed % 2 == 0)
    x = tokens(cfg, (2, length), seed)
    torch.manual_seed(seed)
    assert_modules_equivalent(ref.HAMT(cfg), opt.HAMT(cfg), (x,), dtype=dtype, output=logits_and_aux)


@MODES
def test_optimized_model_matches_reference_when_continuing_a_state(mode: str) -> None:
    cfg = tiny_config(binding=mode)
    r, o = build(ref, cfg), build(opt, cfg)
    o.load_state_dict(r.state_dict())
    x = tokens(cfg, (2, 11), 5)
    state = r(x[:, :4], return_state=True)["state"]
    a, b = r(x[:, 4:], state=state, return_state=True), o(x[:, 4:], state=state, return_state=True)
    tol = tolerance(torch.float64, model=True)
    assert_close_scaled(b["logits"], a["logits"], tol, "logits")
    assert_close_scaled(b["state"].memory, a["state"].memory, tol, "state")
    assert_close_scaled(b["state"].key_context, a["state"].key_context, tol, "key window")
    assert a["state"].position == b["state"].position == 11


def test_parameter_layouts_are_identical_and_only_the_memory_differs() -> None:
    cfg = tiny_config()
    r, o = ref.HAMT(cfg), opt.HAMT(cfg)
    assert list(r.state_dict()) == list(o.state_dict())
    assert isinstance(o.layers[0].memory, opt_vsa.SlotMemory) and type(r.layers[0].memory) is ref_vsa.SlotMemory


# ---------------------------------------------------------------------------------------------- causality, state

@IMPLS
@MODES
@given(t=st.integers(1, 8), seed=seeds)
def test_model_is_causal(impl: Any, mode: str, t: int, seed: int) -> None:
    cfg = tiny_config(binding=mode)
    model = build(impl, cfg, seed)
    x = tokens(cfg, (2, 9), seed)
    assert_causal(lambda ids: model(ids)["logits"], x, t, vocab_size=cfg.vocab_size, seed=seed)


@IMPLS
@MODES
@given(cuts=st.lists(st.integers(1, 11), min_size=1, max_size=3, unique=True), seed=seeds)
def test_segment_wise_forward_with_carried_state_equals_one_full_pass(impl: Any, mode: str, cuts: list[int],
                                                                       seed: int) -> None:
    cfg = tiny_config(binding=mode)
    model = build(impl, cfg, seed)
    x = tokens(cfg, (2, 12), seed)
    full = model(x, return_state=True)
    bounds = [0, *sorted(cuts), 12]
    state, pieces = None, []
    for start, end in itertools.pairwise(bounds):
        out = model(x[:, start:end], state=state, return_state=True)
        state = model.detach_state(out["state"])
        pieces.append(out["logits"])
    tol = tolerance(torch.float64, model=True)
    assert_close_scaled(torch.cat(pieces, dim=1), full["logits"], tol, "segmented logits")
    assert state is not None
    assert_close_scaled(state.memory, full["state"].memory, tol, "end state")
    assert_close_scaled(state.key_context, full["state"].key_context, tol, "end key window")
    assert state.position == 12 and not state.memory.requires_grad


@IMPLS
@MODES
def test_generation_with_carried_state_equals_recomputing_the_prefix(impl: Any, mode: str) -> None:
    cfg = tiny_config(binding=mode)
    model = build(impl, cfg, 3).eval()
    x = tokens(cfg, (3, 10), 3)
    cache = model.init_cache(3)
    steps = []
    for t in range(10):
        logits, cache = model.step(cache, x[:, t])
        steps.append(logits)
    tol = tolerance(torch.float64, model=True)
    assert_close_scaled(torch.stack(steps, dim=1), model(x)["logits"], tol, "step-by-step logits")
    end = model(x, return_state=True)["state"]
    assert_close_scaled(cache.memory, end.memory, tol, "cache")
    assert_close_scaled(cache.key_context, end.key_context, tol, "cache key window")


class _Recompute(nn.Module):
    """The same model seen without init_cache/step: `generate` then recomputes the prefix every token."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> Any:
        return self.model(ids)


def test_sampled_generation_equals_prefix_recomputation() -> None:
    cfg = tiny_config()
    model = build(opt, cfg, 1)
    prompt = tokens(cfg, (2, 4), 1)
    carried = generate(model, prompt, 8, temperature=1.0, seed=7)
    recomputed = generate(_Recompute(model), prompt, 8, temperature=1.0, seed=7)
    assert carried.shape == (2, 12) and torch.equal(carried, recomputed)


@IMPLS
@pytest.mark.parametrize("length", [1, 5, 30])
def test_state_shape_is_constant_in_sequence_length(impl: Any, length: int) -> None:
    cfg = tiny_config()
    model = build(impl, cfg)
    state = model(tokens(cfg, (2, length), 0), return_state=True)["state"]
    assert tuple(state.memory.shape) == (2, cfg.num_layers, cfg.num_slots, cfg.hcm_dim)
    assert tuple(state.key_context.shape) == (2, cfg.num_layers, cfg.hcm_dim, cfg.key_conv)
    cache = model.init_cache(2)
    assert cache.memory.shape == state.memory.shape and cache.key_context.shape == state.key_context.shape


# ---------------------------------------------------------------------------------------------- memory properties

@given(num_pairs=st.integers(1, 8), dim=st.integers(2048, 4096), seed=seeds)
def test_hcm_recalls_superposed_pairs_above_the_capacity_bound(num_pairs: int, dim: int, seed: int) -> None:
    layer = opt.HAMTLayer(tiny_config(hcm_dim=dim, binding="circular", num_slots=2))
    g = torch.Generator().manual_seed(seed)
    keys = ref_vsa.random_hrr(dim, (1, num_pairs), generator=g, dtype=torch.float64)  # (1, k, D)
    values = ref_vsa.random_hrr(dim, (1, num_pairs), generator=g, dtype=torch.float64)
    _, M = layer.memory(keys, values, keys)  # every pair written into both slots, M (1, S, D)
    distractors = ref_vsa.random_hrr(dim, (8,), generator=g, dtype=torch.float64)
    codebook = torch.cat([values[0], distractors])  # (k + 8, D)
    bound = ref_vsa.hrr_recall_bound(num_pairs, dim)
    hits = 0
    for i in range(num_pairs):
        read = layer.memory.read(M, keys[:, i])[0, 0]  # (D,), RMS-normalised: the cosine is unchanged
        assert float(ref_vsa.cosine(read, values[0, i])) >= bound
        hits += int(opt_vsa.cleanup(read, codebook).indices[0] == i)
    assert hits / num_pairs >= ref_vsa.hrr_recall_accuracy_bound(num_pairs, dim, num_pairs + 8)


@IMPLS
@MODES
@given(seed=seeds)
def test_learned_forget_gate_never_increases_the_trace_norm_without_writes(impl: Any, mode: str, seed: int) -> None:
    cfg = tiny_config(binding=mode, decay=0.9)
    layer = build(impl, cfg, seed).layers[0]
    assert isinstance(layer, ref.HAMTLayer)
    x = make_tensor((2, 7, cfg.hidden_dim), seed)
    k, v, q, _, lam = layer.projections(x, layer.key_sequence(x, None)[0])
    no_write = torch.zeros_like(lam)
    M = make_tensor((2, cfg.num_slots, cfg.hcm_dim), seed + 1)
    norms = [M.norm(dim=-1)]
    for t in range(7):
        M = layer.memory.write(M, k[:, t], v[:, t], no_write[:, t], lam[:, t])
        norms.append(M.norm(dim=-1))
    assert all(bool((b <= a * cfg.decay + 1e-12).all()) for a, b in itertools.pairwise(norms))
    _, last = layer.memory(k, v, q, no_write, lam, make_tensor((2, cfg.num_slots, cfg.hcm_dim), seed + 1))
    assert bool((last.norm(dim=-1) <= norms[0] * cfg.decay**7 + 1e-9).all())


def test_aux_loss_trains_the_decoder_and_is_off_in_eval_mode() -> None:
    cfg = tiny_config()
    model = build(opt, cfg)
    out = model(tokens(cfg, (2, 6), 0))
    assert float(out["aux_loss"].detach()) > 0
    out["aux_loss"].backward()
    layer = model.layers[0]
    assert isinstance(layer, ref.HAMTLayer) and layer.reconstruct.weight.grad is not None
    assert float(layer.reconstruct.weight.grad.abs().sum()) > 0
    assert float(model.eval()(tokens(cfg, (2, 6), 0))["aux_loss"]) == 0.0
    assert float(build(opt, tiny_config(aux_loss_weight=0.0))(tokens(cfg, (2, 6), 0))["aux_loss"]) == 0.0


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, Any], int]:
    """The model's output and the bytes of the distinct storages autograd keeps for backward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return out, sum(storages.values())


@IMPLS
@MODES
def test_memory_checkpoint_keeps_values_and_gradients_and_saves_less(impl: Any, mode: str) -> None:
    """[HAMT-12] `memory_checkpoint` recomputes the slot memory in backward: the same logits, aux loss and
    gradients (float64, to rounding), and fewer bytes kept for backward (the memory's (B, L, S, D) activations)."""
    x = tokens(tiny_config(), (2, 24), 5)
    results = []
    for checkpointed in (False, True):
        model = build(impl, tiny_config(binding=mode, hcm_dim=64, memory_checkpoint=checkpointed))
        out, saved = _saved_bytes(model, x)
        logits, aux = logits_and_aux(out)
        (logits.pow(2).mean() + aux).backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), aux.detach(), grads, saved))
    (logits, aux, grads, saved), (logits_ck, aux_ck, grads_ck, saved_ck) = results
    torch.testing.assert_close(logits_ck, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(aux_ck, aux, rtol=1e-12, atol=1e-12)
    assert grads_ck.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ck[name], grad, rtol=1e-10, atol=1e-12, msg=name)
    assert saved_ck < 0.7 * saved, (saved_ck, saved)


# ---------------------------------------------------------------------------------------------- sizes, errors

def test_demo_model_has_the_seeds_parameter_count_within_two_percent() -> None:
    demo = load_experiment(ROOT / "configs" / "hamt_demo.yaml").model
    default = load_experiment(ROOT / "configs" / "hamt_default.yaml").model
    for cfg in (demo, default, tiny_config(), tiny_config(tie_embeddings=False)):
        with torch.device("meta"):
            model = ref.HAMT(cfg)
        assert sum(p.numel() for p in model.parameters()) == ref.count_parameters(cfg)
    assert (demo.hidden_dim, demo.hcm_dim, demo.num_layers) == (256, 1024, 4)
    assert ref.count_parameters(demo) == 21_078_848
    assert abs(ref.count_parameters(demo) / 21.09e6 - 1) < 0.02
    assert (default.hidden_dim, default.hcm_dim, default.num_layers, default.num_slots) == (512, 2048, 8, 8)
    assert default.binding == "elementwise" and default.aux_loss_weight == 0.05


@pytest.mark.parametrize(("field", "value", "message"), [
    ("hidden_dim", 0, r"hidden_dim: must be an integer >= 1, got 0"),
    ("binding", "fft", r"binding: must be one of 'elementwise', 'circular', got 'fft'"),
    ("aux_loss_weight", -1.0, r"aux_loss_weight: must be a number >= 0, got -1.0"),
    ("decay", 1.5, r"decay: must be a number in \(0, 1\], got 1.5"),
    ("ffn_dim", -2, r"ffn_dim: must be an integer >= 0"),
    ("memory_checkpoint", "yes", r"memory_checkpoint: must be true or false, got 'yes'"),
])
def test_config_rejects_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(**{field: value})


@IMPLS
def test_bad_inputs_and_states_are_clear_errors(impl: Any) -> None:
    cfg = tiny_config()
    model = build(impl, cfg)
    with pytest.raises(ShapeError, match=r"input_ids must have 2 dim"):
        model(tokens(cfg, (5,), 0))
    with pytest.raises(DTypeError, match=r"input_ids must be int64/int32 token ids, got torch.float32"):
        model(torch.zeros(2, 3))
    with pytest.raises(ShapeError, match=r"seq_len 0"):
        model(tokens(cfg, (2, 0), 0))
    with pytest.raises(ShapeError, match=r"positions 0 … 40 exceed max_seq_len = 40"):
        model(tokens(cfg, (1, 41), 0))
    state = model(tokens(cfg, (2, 38), 0), return_state=True)["state"]
    with pytest.raises(ShapeError, match=r"positions 38 … 40 exceed max_seq_len = 40"):
        model(tokens(cfg, (2, 3), 0), state=state)
    with pytest.raises(ShapeError, match=r"state.memory must have shape \(B, N, S, D\) = \(3, 2, 3, 12\)"):
        model(tokens(cfg, (3, 2), 0), state=state)
    with pytest.raises(ShapeError, match=r"state must be a HAMTState"):
        model(tokens(cfg, (2, 2), 0), state=(state.memory, state.key_context, 0))
    with pytest.raises(ShapeError, match=r"token_ids must have 1 dim"):
        model.step(model.init_cache(2), tokens(cfg, (2, 1), 0))


# ---------------------------------------------------------------------------------------------- training

def _experiment(steps: int, tbptt: int) -> Any:
    """Needle retrieval without TBPTT; next-byte LM on the fixture corpus in segments of `tbptt` tokens (the needle
    task scores only the last position, so most of its segments would hold no target)."""
    task: dict[str, Any] = ({"name": "needle", "n_needles": 1, "seq_len": 8, "num_keys": 4, "num_values": 4,
                             "num_filler": 4} if tbptt == 0 else
                            {"name": "text", "files": ["tests/fixtures/tiny_corpus.txt"], "seq_len": 16})
    return load_experiment({
        "model": {"name": "hamt", "hidden_dim": 16, "hcm_dim": 32, "num_layers": 1, "num_slots": 2,
                  "max_seq_len": 32},
        "task": task,
        "train": {"steps": steps, "batch_size": 16, "lr": 1e-2, "warmup_steps": 2, "eval_every": steps,
                  "eval_batches": 1, "checkpoint_every": steps, "seed": 0, "tbptt_length": tbptt},
    })


@pytest.mark.parametrize("tbptt", [0, 4])
def test_training_on_cpu_lowers_the_loss(tmp_path: Path, tbptt: int) -> None:
    summary = train(_experiment(40, tbptt), impl="optimized", device=torch.device("cpu"), out_dir=tmp_path,
                    progress=False)
    losses = [float(line.split('"task_loss": ')[1].split(",")[0])
              for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 40
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def _recall_accuracy(model_overrides: dict[str, Any], n: int, steps: int, tmp_path: Path) -> float:
    exp = load_experiment(ROOT / "configs" / "hamt_recall_cpu.yaml")
    exp = dataclasses.replace(
        exp, model=dataclasses.replace(exp.model, **model_overrides),
        task=dataclasses.replace(exp.task, n_needles=n, seq_len=2 * n + 2),
        train=dataclasses.replace(exp.train, steps=steps, eval_every=steps, checkpoint_every=steps))
    summary = train(exp, impl="optimized", device=torch.device("cpu"), out_dir=tmp_path, progress=False)
    return float(summary["val_accuracy"])


def test_small_hamt_learns_associative_recall_of_two_pairs(tmp_path: Path) -> None:
    assert _recall_accuracy({}, 2, 250, tmp_path) >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("n", [4, 8])
def test_small_hamt_learns_associative_recall_of_up_to_eight_pairs(tmp_path: Path, n: int) -> None:
    assert _recall_accuracy({}, n, 1000, tmp_path) >= 0.9


# ---------------------------------------------------------------------------------------------- gpu

@pytest.mark.gpu
@MODES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimized_model_on_cuda_matches_reference(mode: str, dtype: torch.dtype) -> None:
    cfg = tiny_config(binding=mode, hidden_dim=32, hcm_dim=64, num_slots=4, max_seq_len=512, chunk_size=64,
                      init_std=0.1)
    torch.manual_seed(0)
    x = tokens(cfg, (2, 130), 0)
    assert_modules_equivalent(ref.HAMT(cfg), opt.HAMT(cfg), (x,), dtype=dtype, output=logits_and_aux, device="cuda")


@pytest.mark.gpu
def test_generation_on_cuda_equals_recomputation_in_fp32() -> None:
    cfg = tiny_config(hidden_dim=32, hcm_dim=64)
    torch.manual_seed(0)
    model = opt.HAMT(cfg).cuda().eval()
    x = tokens(cfg, (2, 20), 0).cuda()
    cache, steps = model.init_cache(2), []
    for t in range(20):
        logits, cache = model.step(cache, x[:, t])
        steps.append(logits)
    assert_close_scaled(torch.stack(steps, 1), model(x)["logits"], tolerance(torch.float32, model=True), "cuda")
