"""Unified Mamba–Hopfield–DEQ ([UNI-1] … [UNI-10]): optimized ≡ reference for every solver mode (float64 and
float32, logits and gradients), causality, the energy never rising in descent phases (alternating's descent
half-steps, the cascade's refinement), per-token stopping rules, warm start, the seed's API (keyword construction,
diagnostics, `model.solver.max_iter`, gradient checkpointing, memory optimizer groups), cached generation ≡
uncached generation, the trainer integration (objective in forward, curriculum, registry), bad input, and CPU
training: the loss falls (default suite) and associative recall reaches 90% (slow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import optimized.unified as opt
import reference.unified as ref
from reference.validation import ConfigError, DTypeError, ShapeError
from tests.causality import assert_causal
from tests.equivalence import assert_modules_equivalent
from tests.strategies import make_tensor, seeds
from training import build_model, load_experiment
from training.generation import generate
from training.loop import train

ROOT = Path(__file__).resolve().parent.parent
MODES = pytest.mark.parametrize("mode", list(ref.SOLVER_TYPES))
IMPLS = pytest.mark.parametrize("impl", [ref, opt], ids=["reference", "optimized"])


def tiny(**kw: Any) -> ref.UnifiedConfig:
    base: dict[str, Any] = {"vocab_size": 13, "d_model": 8, "d_state": 4, "d_conv": 3, "n_layers": 2,
                            "memory_size": 10, "beta": 2.0, "max_iterations": 60, "tol_fixedpoint": 1e-6,
                            "tol_energy": 1e-8, "init_std": 0.5, "memory_chunk": 4}
    base.update(kw)
    return ref.UnifiedConfig(**base)


def build(impl: Any, cfg: ref.UnifiedConfig, seed: int = 0) -> ref.UnifiedMambaHopfieldDEQ:
    torch.manual_seed(seed)
    model: ref.UnifiedMambaHopfieldDEQ = impl.UnifiedMambaHopfieldDEQ(cfg)
    return model.double()


def tokens(vocab: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@MODES
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_optimized_model_matches_reference(mode: str, dtype: torch.dtype) -> None:
    # float32 cannot resolve energy changes of 1e-8 (they round to 0 at random points of a slow approach), so
    # its run iterates to the budget; both then sit at the equilibrium to well below the float32 tolerance.
    cfg = tiny(solver_type=mode, tol_energy=1e-8 if dtype == torch.float64 else 1e-30)
    r, o = build(ref, cfg), build(opt, cfg)
    assert_modules_equivalent(r, o, [tokens(13, (2, 6), 1)], dtype=dtype)


@given(seed=seeds, mode=st.sampled_from(ref.SOLVER_TYPES), backward=st.sampled_from(["implicit", "phantom"]))
def test_optimized_model_matches_reference_over_draws(seed: int, mode: str, backward: str) -> None:
    cfg = tiny(solver_type=mode, backward=backward, memory_size=7)
    r, o = build(ref, cfg, seed), build(opt, cfg, seed)
    assert_modules_equivalent(r, o, [tokens(13, (1, 4), seed)])


def test_optimized_diagnostics_match_reference() -> None:
    cfg = tiny(tol_fixedpoint=1e-3, tol_energy=1e-3)
    r, o = build(ref, cfg), build(opt, cfg)
    o.load_state_dict(r.state_dict())
    x = tokens(13, (2, 5), 3)
    _, dr = r(x, return_diagnostics=True)
    _, do = o(x, return_diagnostics=True)
    for key in ("converged", "iterations"):
        assert torch.equal(dr["solver_info"][key], do["solver_info"][key])


@MODES
@IMPLS
def test_model_is_causal(impl: Any, mode: str) -> None:
    model = build(impl, tiny(solver_type=mode)).eval()  # training mode advances W̃'s power-iteration vector
    x = tokens(13, (2, 9), 0)
    for t in (1, 4, 8):
        assert_causal(lambda ids: model(ids), x, t, vocab_size=13, atol=1e-12)


@given(seed=seeds, beta=st.sampled_from([0.5, 2.0, 10.0]), scale=st.sampled_from([0.3, 1.0, 4.0]),
       pattern_scale=st.sampled_from([0.3, 1.0, 2.0]))
def test_energy_descent_step_never_raises_the_energy(seed: int, beta: float, scale: float,
                                                     pattern_scale: float) -> None:
    """[UNI-3] E(D_E(z)) ≤ E(z) for every z, context and stored patterns (CCCP): every descent phase is monotone."""
    model = build(ref, tiny(beta=beta), seed)
    model.memory.write(make_tensor((10, 8), seed + 2, scale=pattern_scale))
    c = make_tensor((12, 8), seed, scale=scale)
    z = make_tensor((12, 8), seed + 1, scale=scale)
    with torch.no_grad():
        maps = model.step_maps(c)
        for _ in range(8):  # from a random start and along the descent trajectory
            z_next = maps.descent(z)
            E0, E1 = maps.energy(z), maps.energy(z_next)
            assert (E1 <= E0 + 1e-12 * (1 + E0.abs())).all()
            z = z_next


@IMPLS
def test_alternating_descent_phases_are_monotone(impl: Any) -> None:
    """[UNI-4] Along a solve, every descent half-step z_{k+½} = D_E(z_k) lowers (never raises) E."""
    model = build(impl, tiny())
    x = tokens(13, (2, 7), 5)
    with torch.no_grad():
        c = model.dynamics.mamba(model.embedding(x)).reshape(-1, 8)
        maps = model.step_maps(c)
        z = c
        for _ in range(15):
            half = maps.descent(z)
            assert (maps.energy(half) <= maps.energy(z) + 1e-12).all()
            z = maps.update(half)


@IMPLS
def test_cascade_refinement_energy_is_non_increasing(impl: Any) -> None:
    """[UNI-6] The recorded energy trace of the cascade's refinement phase is non-increasing per token."""
    model = build(impl, tiny(solver_type="cascade", beta=6.0))
    x = tokens(13, (2, 7), 6)
    with torch.no_grad():
        c = model.dynamics.mamba(model.embedding(x)).reshape(-1, 8)
        maps = model.step_maps(c)
        trace: list[torch.Tensor] = []
        _, steps, settled = model.solver.refine(maps, make_tensor((14, 8), 2, scale=2.0), 40, trace)
    E = torch.stack(trace)  # (T, N)
    assert (E[1:] <= E[:-1] + 1e-12).all()
    assert (steps >= 1).all() and settled.all()


@MODES
def test_converged_tokens_meet_the_stopping_rule(mode: str) -> None:
    model = build(ref, tiny(solver_type=mode, tol_fixedpoint=1e-4, tol_energy=1e-6))
    x = tokens(13, (2, 6), 7)
    with torch.no_grad():
        _, diag = model(x, return_diagnostics=True)
    info = diag["solver_info"]
    assert info["converged"].all()
    if mode != "cascade":
        assert (info["residual"] <= 1e-4).all()
    model.solver.max_iter = 0  # the seed's curriculum knob: no iterations, nothing converges
    with torch.no_grad():
        _, diag0 = model(x, return_diagnostics=True)
    assert (diag0["solver_info"]["iterations"] == 0).all()


@MODES
def test_warm_start_from_the_equilibrium_needs_fewer_iterations(mode: str) -> None:
    model = build(opt, tiny(solver_type=mode, tol_fixedpoint=1e-3, tol_energy=1e-3))
    x = tokens(13, (2, 6), 8)
    with torch.no_grad():
        _, cold = model(x, return_diagnostics=True)
        _, warm = model(x, z_init=cold["z_equilibrium"], return_diagnostics=True)
    assert warm["solver_info"]["iterations"].sum() < cold["solver_info"]["iterations"].sum()


def test_seed_api_keyword_construction_and_diagnostics() -> None:
    model = opt.UnifiedMambaHopfieldDEQ(vocab_size=50, d_model=16, d_state=4, memory_size=20,
                                        solver_type="alternating", n_layers=1)
    assert model.config.d_conv == 4 and model.config.max_iterations == 30
    ids = torch.randint(0, 50, (2, 5))
    logits = model(ids)
    assert logits.shape == (2, 5, 50)
    logits, diagnostics = model(ids, return_diagnostics=True)
    assert f"{diagnostics['solver_info']['final_energy']:.4f}"
    assert diagnostics["solver_info"]["converged"].shape == (2, 5)
    assert diagnostics["z_equilibrium"].shape == (2, 5, 16)
    groups: list[dict[str, Any]] = [{"params": [p for n, p in model.named_parameters() if "memory" not in n]},
                                    {"params": [model.memory_patterns], "lr": 1e-5}]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    torch.optim.AdamW(groups, lr=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    cfg = tiny()
    a, b = build(opt, cfg), build(opt, cfg)
    b.dynamics.mamba.gradient_checkpointing_enable()
    x = tokens(13, (2, 5), 9)
    a(x).pow(2).sum().backward()
    b(x).pow(2).sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert pa.grad is not None and pb.grad is not None, name
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-10, atol=1e-12)


@MODES
@IMPLS
def test_cached_generation_equals_uncached_at_temperature_zero(impl: Any, mode: str) -> None:
    model = build(impl, tiny(solver_type=mode, tol_fixedpoint=1e-3, tol_energy=1e-3))
    prompt = tokens(13, (2, 3), 10)
    cached = model.generate(prompt, max_length=9, temperature=0.0)
    uncached = model.generate(prompt, max_length=9, temperature=0.0, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape == (2, 9)
    assert torch.equal(generate(model, prompt, 6, temperature=0.0), cached)  # the shared pipeline, recurrent
    sampled = model.generate(prompt, 9, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 9) and torch.equal(sampled[:, :3], prompt)


def test_recurrent_step_matches_the_full_forward() -> None:
    model = build(opt, tiny(tol_fixedpoint=1e-9, tol_energy=1e-12, max_iterations=200)).eval()
    x = tokens(13, (2, 6), 11)
    with torch.no_grad():
        full = model(x)
        cache = model.init_cache(2)
        steps = []
        for t in range(6):
            logits, cache = model.step(cache, x[:, t])
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-7, atol=1e-7)


def test_objective_in_forward_returns_the_trainer_dict_and_curriculum() -> None:
    model = build(opt, tiny(objective_in_forward=True, stability_weight=0.1, curriculum_start=2,
                            curriculum_steps=10, max_iterations=12))
    x = tokens(13, (2, 5), 12)
    out = model(x)
    assert set(out) == {"logits", "aux_loss", "metrics"} and out["aux_loss"].requires_grad
    assert {"energy", "convergence", "stability", "deq_iterations"} <= set(out["metrics"])
    out["aux_loss"].backward()
    assert model.memory_patterns.grad is not None and model.dynamics.w_z.weight.grad is not None
    model.eval()
    with torch.no_grad():
        assert float(model(x)["aux_loss"]) == 0.0
    model.on_step(0, 100)
    assert model.solver.max_iter == 2
    model.on_step(5, 100)
    assert model.solver.max_iter == 7
    model.on_step(50, 100)
    assert model.solver.max_iter == 12
    assert [ref.curriculum_max_iter(t, 0, 30, 10) for t in (0, 5)] == [30, 30]


def test_registry_builds_both_impls_with_one_parameter_layout() -> None:
    exp = load_experiment(ROOT / "configs" / "unified_cpu.yaml")
    r = build_model(exp.model, "reference")
    o = build_model(exp.model, "optimized")
    assert isinstance(r, ref.UnifiedMambaHopfieldDEQ) and isinstance(o, opt.UnifiedMambaHopfieldDEQ)
    assert list(r.state_dict()) == list(o.state_dict())
    default = load_experiment(ROOT / "configs" / "unified_default.yaml").model
    assert (default.d_model, default.d_state, default.d_conv, default.n_layers, default.memory_size) == \
        (512, 64, 4, 6, 10000)
    assert (default.beta, default.solver_type, default.max_iterations) == (2.0, "alternating", 30)


def test_bad_input_raises_named_errors() -> None:
    model = build(ref, tiny())
    with pytest.raises(ShapeError, match="token ids must lie"):
        model(torch.tensor([[0, 13]]))
    with pytest.raises(DTypeError, match="input_ids"):
        model(torch.zeros(1, 3))
    with pytest.raises(ShapeError, match="input_ids"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ShapeError, match="z_init must have shape"):
        model(torch.zeros(1, 3, dtype=torch.long), z_init=torch.zeros(1, 2, 8, dtype=torch.float64))
    with pytest.raises(ConfigError, match="solver_type"):
        tiny(solver_type="newton")
    with pytest.raises(ConfigError, match="beta"):
        tiny(beta=0.0)
    with pytest.raises(ConfigError, match="memory_size"):
        ref.UnifiedMambaHopfieldDEQ(vocab_size=5, memory_size=0)
    model.solver.solver_type = "newton"
    with pytest.raises(ConfigError, match=r"solver\.solver_type"):
        model(torch.zeros(1, 3, dtype=torch.long))
    model.solver.solver_type = "alternating"
    with pytest.raises(ConfigError, match="max_length"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), max_length=2)
    with pytest.raises(ShapeError, match="cache"):
        model.step(ref.UnifiedCache([]), torch.zeros(1, dtype=torch.long))


def _experiment(steps: int) -> Any:
    return load_experiment({
        "model": {"name": "unified", "d_model": 32, "d_state": 8, "n_layers": 1, "memory_size": 16,
                  "max_iterations": 8, "objective_in_forward": True, "energy_weight": 0.01, "init_std": 0.1},
        "task": {"name": "needle", "n_needles": 2, "seq_len": 6, "num_keys": 4, "num_values": 4, "num_filler": 2},
        "train": {"steps": steps, "batch_size": 32, "lr": 1e-2, "warmup_steps": 5, "eval_every": steps,
                  "eval_batches": 2, "checkpoint_every": steps, "seed": 0},
    })


def test_training_on_cpu_lowers_the_loss(tmp_path: Path) -> None:
    summary = train(_experiment(40), impl="optimized", device=torch.device("cpu"), out_dir=tmp_path,
                    progress=False)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    import json

    losses = [json.loads(line)["loss"] for line in lines if '"loss"' in line and '"step"' in line]
    assert len(losses) >= 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert summary["val_loss"] < 2.0


@pytest.mark.slow
def test_associative_recall_is_learned_on_cpu(tmp_path: Path) -> None:
    """The issue's learning check: configs/unified_cpu.yaml reaches >= 90% recall (measured in the spec)."""
    from training.experiments import AssociativeRecallExperiment

    exp = load_experiment(ROOT / "configs" / "unified_cpu.yaml")
    summary = train(exp, impl="optimized", device=torch.device("cpu"), out_dir=tmp_path, progress=False)
    assert summary["val_accuracy"] >= 0.9
    model = build_model(exp.model, "optimized")
    state = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    model.load_state_dict(state)
    result = AssociativeRecallExperiment(model, task=exp.task).evaluate(num_trials=256)
    assert result.accuracy >= 0.9


@pytest.mark.gpu
@MODES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_optimized_model_matches_reference(mode: str, dtype: torch.dtype) -> None:
    cfg = tiny(solver_type=mode, d_model=32, d_state=8, memory_size=300, memory_chunk=128,
               tol_fixedpoint=1e-4 if dtype == torch.float32 else 1e-2, tol_energy=1e-4)
    r, o = build(ref, cfg), build(opt, cfg)
    assert_modules_equivalent(r, o, [tokens(13, (2, 64), 1)], dtype=dtype, device="cuda")


@IMPLS
def test_bf16_autocast_training_step_with_the_implicit_backward(impl: Any) -> None:
    """Found by the soak: under autocast the adjoint solve returned a float32 gradient for a bf16 value."""
    torch.manual_seed(0)
    model = impl.UnifiedMambaHopfieldDEQ(tiny(max_iterations=8, tol_fixedpoint=1e-3))
    ids = torch.randint(0, 13, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    logits.float().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None for g in grads)
    assert all(g is None or (g.dtype == torch.float32 and bool(torch.isfinite(g).all())) for g in grads)
