"""Atlas-MAG ([MAG-5] … [MAG-11]): optimized ≡ reference (memory branch, block, model; with and without persistent
memory and with the memory disabled), causality, parameter counts of the seed's four sizes, gate polarization
bounds, the λ schedule, gate statistics, bad configs, and a CPU training run whose loss falls."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import optimized.atlas_mag as opt
import reference.atlas_mag as ref
from reference.validation import ConfigError
from tests.causality import assert_causal
from tests.equivalence import assert_modules_equivalent, assert_same_parameters
from tests.scripts import load_script
from tests.strategies import make_tensor, seeds
from training import load_experiment
from training.probes.niah import niah_batch
from training.tasks.smollm import SmolLMConfig, SmolLMTask

ROOT = Path(__file__).resolve().parent.parent
FIX = "tests/fixtures/smollm"
SIZES = {"tiny": 33.7e6, "small": 54.4e6, "medium": 67.0e6, "base": 195.1e6}


def tiny_config(**kw: object) -> ref.AtlasMAGConfig:
    base: dict[str, object] = {"vocab_size": 23, "dim": 8, "num_layers": 2, "num_heads": 2, "window": 3,
                               "omega_window": 4, "num_persistent": 2, "ffn_hidden_dim": 12, "memory_hidden_dim": 6}
    base.update(kw)
    return ref.AtlasMAGConfig(**base)  # type: ignore[arg-type]


def _logits(out: dict[str, object]) -> object:
    return (out["logits"], out["aux_loss"])


@given(st.sampled_from([0, 2]), st.booleans(), st.sampled_from([torch.float64, torch.float32]), st.integers(1, 9),
       seeds)
def test_optimized_model_matches_reference(P: int, disable: bool, dtype: torch.dtype, L: int, seed: int) -> None:
    torch.manual_seed(seed)
    cfg = tiny_config(num_persistent=P, disable_memory=disable)
    x = torch.randint(0, cfg.vocab_size, (2, L), generator=torch.Generator().manual_seed(seed))
    assert_modules_equivalent(ref.AtlasMAG(cfg), opt.AtlasMAG(cfg), (x,), dtype=dtype, output=_logits)


@pytest.mark.parametrize("P", [0, 3])
def test_optimized_block_and_memory_branch_match_reference(P: int) -> None:
    torch.manual_seed(1)
    cfg = tiny_config(num_persistent=P, omega_window=3)
    x = make_tensor((2, 7, cfg.dim), 4)
    rb, ob = ref.MAGBlock(cfg), opt.MAGBlock(cfg)
    for p in rb.parameters():  # nonzero persistent tokens and norm gains, so that every path matters
        torch.nn.init.normal_(p, std=0.5)
    assert_modules_equivalent(rb, ob, (x,), dtype=torch.float64)
    assert_modules_equivalent(rb, ob, (x,), dtype=torch.float32)
    rm, om = ref.OmegaMemoryBranch(cfg), opt.OmegaMemoryBranch(cfg)
    z = make_tensor((P, cfg.dim), 5) if P else None
    assert_modules_equivalent(rm, om, (x, z), dtype=torch.float64)


@pytest.mark.parametrize("impl", ["reference", "optimized"])
@pytest.mark.parametrize("t", [1, 6])
def test_model_is_causal(impl: str, t: int) -> None:
    torch.manual_seed(0)
    cfg = tiny_config()
    model = (ref.AtlasMAG if impl == "reference" else opt.AtlasMAG)(cfg).double()
    x = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    assert_causal(lambda ids: model(ids)["logits"], x, t, vocab_size=cfg.vocab_size)


def test_memory_reaches_beyond_the_attention_window() -> None:
    """With window 1 attention sees only the current token; the gate (Omega memory, c = 4) still carries the
    previous three tokens, and nothing older."""
    torch.manual_seed(0)
    cfg = tiny_config(window=1, omega_window=4, num_layers=1, num_persistent=0)
    model = opt.AtlasMAG(cfg).double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randint(0, cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(3))
    y = x.clone()
    y[0, 5] = (y[0, 5] + 1) % cfg.vocab_size
    a, b = model(x)["logits"][0], model(y)["logits"][0]
    changed = (a - b).abs().amax(dim=-1) > 1e-12
    assert changed.tolist() == [False] * 5 + [True] * 4 + [False]


def test_parameter_layout_is_shared_and_counted_analytically() -> None:
    for cfg in (tiny_config(), tiny_config(num_persistent=0), tiny_config(disable_memory=True)):
        r, o = ref.AtlasMAG(cfg), opt.AtlasMAG(cfg)
        assert_same_parameters(r, o)
        assert sum(p.numel() for p in r.parameters()) == ref.count_parameters(cfg)
    assert ref.count_parameters(tiny_config(disable_memory=True)) < ref.count_parameters(tiny_config())


@pytest.mark.parametrize("size", sorted(SIZES))
def test_shipped_sizes_match_the_seed_table_within_one_percent(size: str) -> None:
    exp = load_experiment(ROOT / "configs" / f"atlas_mag_{size}.yaml")
    cfg = exp.model
    assert isinstance(cfg, ref.AtlasMAGConfig)
    with torch.device("meta"):
        model = opt.AtlasMAG(cfg)
    built = sum(p.numel() for p in model.parameters())
    assert built == ref.count_parameters(cfg)
    assert abs(built / SIZES[size] - 1) < 0.01, f"{size}: {built / 1e6:.2f}M vs the seed's {SIZES[size] / 1e6}M"


@given(st.floats(0.0, 1.0), st.floats(0.0, 10.0))
def test_polarization_loss_lies_in_zero_lambda(g: float, lam: float) -> None:
    loss = float(ref.polarization_loss(torch.tensor([g], dtype=torch.float64), lam))
    assert -1e-12 <= loss <= lam + 1e-12
    assert loss <= float(ref.polarization_loss(torch.tensor([0.5], dtype=torch.float64), lam)) + 1e-12


def test_polarization_loss_is_zero_at_zero_and_one_and_lambda_at_half() -> None:
    assert float(ref.polarization_loss(torch.tensor([0.0, 1.0, 1.0, 0.0]), 3.0)) == 0.0
    assert float(ref.polarization_loss(torch.tensor([0.5, 0.5]), 3.0)) == 3.0
    assert float(ref.polarization_loss(torch.tensor([0.25]), 2.0)) == pytest.approx(1.0)


@given(st.integers(1, 500), st.integers(0, 60), st.floats(0, 1), st.floats(0, 5), st.floats(0, 5))
def test_lambda_schedule_is_zero_in_warmup_then_bounded_and_non_increasing(total: int, warmup: int, frac: float,
                                                                          initial: float, final: float) -> None:
    kw = {"initial": initial, "final": max(0.0, min(final, initial)), "anneal_fraction": frac,
          "warmup_steps": warmup}
    values = [ref.polar_lambda(s, total, **kw) for s in range(total)]  # type: ignore[arg-type]
    assert all(v == 0.0 for v in values[:warmup])
    after = values[warmup:]
    assert all(0 <= v <= initial for v in after)
    assert all(a >= b for a, b in itertools.pairwise(after))


def test_on_step_sets_lambda_and_the_aux_loss_and_metrics_follow() -> None:
    torch.manual_seed(0)
    cfg = tiny_config(polar_lambda_initial=2.0, polar_lambda_final=0.5, polar_anneal_fraction=0.5,
                      polar_warmup_steps=2)
    model = opt.AtlasMAG(cfg).double()
    x = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    expected = {0: 0.0, 1: 0.0, 2: 2.0, 4: 2.0, 5: 0.5, 9: 0.5}
    for step, lam in expected.items():
        model.on_step(step, 10)
        out = model(x)
        metrics = out["metrics"]
        assert isinstance(metrics, dict) and metrics["polar_lambda"] == lam
        aux = out["aux_loss"]
        assert isinstance(aux, torch.Tensor)
        assert float(aux.detach()) == pytest.approx(lam * float(metrics["gate_polarization"]), rel=1e-12)
    for key in ("gate_mean", "gate_std", "gate_polarized", "omega_gate_mean"):
        assert 0 <= float(metrics[key]) <= 1


def test_gate_statistics_count_polarized_gates() -> None:
    stats = ref.gate_statistics([torch.tensor([[[0.05, 0.5, 0.95, 0.2]]])])
    assert float(stats["gate_polarized"]) == 0.5
    assert float(stats["gate_mean"]) == pytest.approx(0.425)


def test_disabled_memory_is_attention_only() -> None:
    cfg = tiny_config(disable_memory=True)
    model = opt.AtlasMAG(cfg)
    assert not any("memory" in name for name, _ in model.named_parameters())
    out = model(torch.zeros(1, 4, dtype=torch.long))
    assert float(out["aux_loss"]) == 0.0 and "gate_mean" not in out["metrics"]


@pytest.mark.parametrize("bad, match", [
    ({"dim": 10, "num_heads": 4}, r"dim: must be a multiple of num_heads=4, got 10"),
    ({"decay_base": 0.0}, r"decay_base: must be a number in \(0, 1\], got 0.0"),
    ({"omega_window": 0}, r"omega_window: must be an integer >= 1, got 0"),
    ({"polar_anneal_fraction": 1.5}, r"polar_anneal_fraction: must be a number in \[0, 1\], got 1.5"),
    ({"num_heads": 8, "dim": 8}, r"num_heads: must be such that dim / num_heads is even"),
])
def test_bad_configs_are_rejected(bad: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        tiny_config(**bad)


def test_cpu_config_trains_loss_falls_probe_reports_and_checkpoint_analyses(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    analyze_script = load_script("analyze_checkpoint")
    from training.device import resolve_device
    from training.loop import train

    exp = load_experiment(ROOT / "configs" / "atlas_mag_cpu.yaml")
    exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, steps=24, eval_every=24))
    summary = train(exp, impl="optimized", device=resolve_device("cpu"), out_dir=tmp_path, progress=False)
    assert summary["status"] == "completed"
    assert summary["final_loss"] < summary["first_loss"] - 1.0
    assert 0 <= summary["niah/accuracy"] <= 1 and summary["niah/value_logprob"] < 0
    metrics = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert {"gate_mean", "gate_polarized", "polar_loss", "polar_lambda"} <= set(metrics)
    assert analyze_script.main(["--model", str(tmp_path), "--batches", "1", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["layers"]) == 2 and 0 <= report["layers"][0]["gate_polarized"] <= 1
    assert report["layers"][0]["M_persistent_fro"][0] > 0


def _smollm(**kw: object) -> SmolLMConfig:
    base: dict[str, object] = {"cosmopedia": (f"{FIX}/cosmopedia.jsonl",),
                               "fineweb_edu": (f"{FIX}/fineweb_edu.parquet",),
                               "python_edu": (f"{FIX}/python_edu.jsonl",), "seq_len": 16, "val_sequences": 3}
    base.update(kw)
    return SmolLMConfig(**base)  # type: ignore[arg-type]


def test_smollm_batches_are_pure_packed_next_token_windows() -> None:
    task = SmolLMTask(_smollm())
    x, y = task.batch("train", 3, 5, seed=1)
    assert x.shape == y.shape == (5, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    fresh = SmolLMTask(_smollm())
    for split, index in (("val", 0), ("train", 7), ("train", 3), ("val", 1)):  # any order, a fresh task: same data
        assert all(torch.equal(a, b) for a, b in zip(task.batch(split, index, 5, 1), fresh.batch(split, index, 5, 1),
                                                     strict=True))
    assert not torch.equal(task.batch("train", 3, 5, seed=2)[0], x)


def test_smollm_mixture_follows_the_weights_exactly_per_period() -> None:
    task = SmolLMTask(_smollm())
    picks = [task.slot(j, seed=0)[0] for j in range(2000)]
    assert [picks.count(s) for s in range(3)] == [800, 1000, 200]
    numbers = [task.slot(j, seed=0) for j in range(2000)]
    assert len(set(numbers)) == 2000  # every (subset, window) is used once


def test_smollm_reads_text_files_and_text_decodes() -> None:
    task = SmolLMTask(_smollm(python_edu=(f"{FIX}/notes.txt",), weights=(0.0, 0.0, 1.0)))
    x, _ = task.batch("train", 0, 2, seed=0)
    assert "review" in task.tokenizer.decode(x.reshape(-1).tolist()) or "Note" in task.tokenizer.decode(
        x.reshape(-1).tolist())


def test_smollm_rejects_hub_names_and_missing_files_fast() -> None:
    with pytest.raises(ConfigError, match=r"task.cosmopedia: 'HuggingFaceTB/smollm-corpus' looks like a dataset-hub"):
        _smollm(cosmopedia=("HuggingFaceTB/smollm-corpus",))
    with pytest.raises(ConfigError, match=r"task.fineweb_edu: 'nope/missing.parquet' is not a local file"):
        _smollm(fineweb_edu=("nope/missing.parquet",))
    with pytest.raises(ConfigError, match=r"python_edu: must be at least one local file"):
        _smollm(python_edu=())
    with pytest.raises(ConfigError, match=r"weights: must be three non-negative numbers"):
        _smollm(weights=(0.0, 0.0, 0.0))


def test_niah_batches_hold_the_needle_and_end_with_its_key() -> None:
    ids, value = niah_batch(40, 260, 4, seed=0)
    for n in range(4):
        row = ids[n].tolist()
        key = row[-3:]
        hits = [i for i in range(len(row) - 6) if row[i:i + 3] == key and row[i + 3] == int(value[n])]
        assert hits, "needle missing"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimized_model_matches_reference_on_cuda(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(dim=32, num_heads=4, window=8, omega_window=6, num_persistent=4)
    x = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    assert_modules_equivalent(ref.AtlasMAG(cfg), opt.AtlasMAG(cfg), (x,), dtype=dtype, output=_logits,
                              device="cuda")
