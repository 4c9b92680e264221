"""End to end: the training CLI learns, resumes exactly, survives SIGTERM, and rejects bad input clearly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from training import load_experiment
from training.checkpoint import load_checkpoint
from training.device import resolve_device
from training.loop import train

ROOT = Path(__file__).resolve().parent.parent
SMALL: dict[str, Any] = {
    "model": {"name": "gru", "embed_dim": 8, "hidden_dim": 16},
    "task": {"name": "needle", "n_needles": 2, "seq_len": 12, "num_keys": 4, "num_values": 4, "num_filler": 4},
    "train": {"steps": 30, "batch_size": 8, "lr": 1e-2, "warmup_steps": 3, "eval_every": 10, "eval_batches": 2,
              "checkpoint_every": 7, "seed": 3},
}
CPU = torch.device("cpu")


def read_metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("impl", ["reference", "optimized"])
def test_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path: Path, impl: str) -> None:
    exp = load_experiment(SMALL)
    full = train(exp, impl=impl, device=CPU, out_dir=tmp_path / "full", progress=False)
    part = train(exp, impl=impl, device=CPU, out_dir=tmp_path / "part", max_steps=13, progress=False)
    assert part["status"] == "stopped at --max-steps" and part["steps"] == 13
    resumed = train(exp, impl=impl, device=CPU, out_dir=tmp_path / "part", resume=True, progress=False)
    assert resumed["steps"] == full["steps"] == 30
    assert resumed["final_loss"] == full["final_loss"]
    assert resumed["val_loss"] == full["val_loss"]
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in read_metrics(tmp_path / "part")] == [m["loss"] for m in read_metrics(tmp_path / "full")]


def test_same_seed_gives_bit_identical_runs_and_another_seed_does_not(tmp_path: Path) -> None:
    """specs/training.md "Determinism": on CPU one seed fixes initialisation, data and every RNG."""
    exp = load_experiment({**SMALL, "train": {**SMALL["train"], "steps": 8, "checkpoint_every": 8}})
    other = load_experiment({**SMALL, "train": {**SMALL["train"], "steps": 8, "checkpoint_every": 8, "seed": 4}})
    runs = [train(e, impl="optimized", device=CPU, out_dir=tmp_path / name, progress=False)
            for name, e in (("a", exp), ("b", exp), ("c", other))]
    models = [load_checkpoint(tmp_path / name / "checkpoint.pt")["model"] for name in "abc"]
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    assert [m["loss"] for m in read_metrics(tmp_path / "a")] == [m["loss"] for m in read_metrics(tmp_path / "b")]
    assert runs[0]["final_loss"] == runs[1]["final_loss"]
    assert not all(torch.equal(models[0][k], models[2][k]) for k in models[0])


def test_resuming_a_finished_run_keeps_its_summary(tmp_path: Path) -> None:
    """A run killed after its last checkpoint but before summary.json: the resumed summary has the losses."""
    exp = load_experiment({**SMALL, "train": {**SMALL["train"], "steps": 6, "checkpoint_every": 3}})
    full = train(exp, impl="optimized", device=CPU, out_dir=tmp_path, progress=False)
    (tmp_path / "summary.json").unlink()
    again = train(exp, impl="optimized", device=CPU, out_dir=tmp_path, resume=True, progress=False)
    assert again["first_loss"] == full["first_loss"] is not None
    assert again["final_loss"] == full["final_loss"] is not None
    assert json.loads((tmp_path / "summary.json").read_text())["final_loss"] == full["final_loss"]


def test_resuming_a_finished_run_restores_the_model_schedule_state(tmp_path: Path) -> None:
    """EMMA's mem_scale / oracle-mix schedules live in the model (`on_step`): a run resumed at its last step must
    evaluate with them as they were at that step (found by the soak: val_loss differed with equal weights)."""
    exp = load_experiment({"model": {"name": "emma_liquid", "embed_dim": 8, "hidden_dim": 16, "mem_dim": 16,
                                     "steps_per_epoch": 2, "warm_start_epochs": 1, "oracle_mix_ramp_epochs": 1,
                                     "mem_scale_start": 0.5, "mem_scale_end": 1.0, "mem_scale_ramp_epochs": 2,
                                     "num_filler": 4, "num_keys": 4, "num_values": 4},
                           "task": SMALL["task"],
                           "train": {**SMALL["train"], "steps": 6, "checkpoint_every": 6}})
    full = train(exp, impl="optimized", device=CPU, out_dir=tmp_path, progress=False)
    (tmp_path / "summary.json").unlink()
    again = train(exp, impl="optimized", device=CPU, out_dir=tmp_path, resume=True, progress=False)
    assert again["val_loss"] == full["val_loss"]


def test_resume_refuses_a_different_config(tmp_path: Path) -> None:
    train(load_experiment(SMALL), impl="optimized", device=CPU, out_dir=tmp_path, max_steps=2, progress=False)
    other = load_experiment({**SMALL, "train": {**SMALL["train"], "lr": 5e-3}})
    with pytest.raises(ValueError, match=r"--resume: the config differs"):
        train(other, impl="optimized", device=CPU, out_dir=tmp_path, resume=True, progress=False)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"checkpoint not found: .*checkpoint\.pt"):
        train(load_experiment(SMALL), impl="optimized", device=CPU, out_dir=tmp_path, resume=True, progress=False)


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.loop

    real = training.loop.loss_and_accuracy
    calls = {"n": 0}

    def poisoned(logits: torch.Tensor, targets: torch.Tensor,
                 kind: str = "cross_entropy") -> tuple[torch.Tensor, torch.Tensor]:
        loss, acc = real(logits, targets, kind)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 5 else loss), acc  # steps 1-5 fine, then every loss NaN

    monkeypatch.setattr(training.loop, "loss_and_accuracy", poisoned)
    exp = load_experiment({**SMALL, "train": {**SMALL["train"], "max_bad_steps": 3, "eval_every": 100}})
    with pytest.raises(RuntimeError, match=r"3 consecutive steps had a non-finite loss or gradient \(step 7\)"):
        train(exp, impl="optimized", device=CPU, out_dir=tmp_path, progress=False)
    flags = [m["skipped"] for m in read_metrics(tmp_path)]
    assert flags == [False] * 5 + [True] * 2  # the third bad step raises before it is logged


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_metrics_checkpoint_and_summary(tmp_path: Path) -> None:
    cfg = tmp_path / "small.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(SMALL))
    result = run_cli("--impl", "optimized", "--config", str(cfg), "--out", str(tmp_path / "run"), "--device", "cpu",
                     "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "task accuracy (val):" in result.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["impl"] == "optimized" and summary["device"] == "cpu"
    assert {"final_loss", "val_accuracy", "wall_time_s", "first_loss"} <= set(summary)
    assert len(read_metrics(tmp_path / "run")) == 30
    # throughput over the training steps only (input tokens: batch × sequence length per step); no GPU memory here
    tokens = 30 * SMALL["train"]["batch_size"] * SMALL["task"]["seq_len"]
    assert 0 < summary["train_tokens_per_s"] and tokens / summary["train_tokens_per_s"] <= summary["wall_time_s"]
    assert summary["peak_memory_mib"] is None
    assert '"train_tokens_per_s"' in result.stdout


def test_cli_bad_input_gives_one_clear_error(tmp_path: Path) -> None:
    result = run_cli("--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "r"))
    assert result.returncode == 2
    assert "error: config file not found" in result.stderr and "Traceback" not in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: gru, hidden: 3}\ntask: {name: needle}\n")
    result = run_cli("--config", str(bad), "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "model.hidden: unknown key" in result.stderr


def test_sigterm_saves_a_checkpoint_and_resuming_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    import yaml

    data = {**SMALL, "train": {**SMALL["train"], "steps": 400, "checkpoint_every": 1000, "eval_every": 1000}}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(cfg), "--out",
                             str(out), "--device", "cpu", "--no-progress"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    while time.time() < deadline and len((out / "metrics.jsonl").read_text().splitlines()) < 20:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert '"status": "interrupted (SIGTERM)"' in stdout
    stopped_at = load_checkpoint(out / "checkpoint.pt")["step"]
    assert 20 <= stopped_at < 400
    exp = load_experiment(cfg)
    resumed = train(exp, impl="optimized", device=CPU, out_dir=out, resume=True, progress=False)
    full = train(exp, impl="optimized", device=CPU, out_dir=tmp_path / "full", progress=False)
    assert resumed["final_loss"] == full["final_loss"]


def test_gru_learns_the_small_needle_task(tmp_path: Path) -> None:
    """A real learning check: the shipped needle_tiny config reaches >= 90% validation accuracy (~20 s)."""
    exp = load_experiment(ROOT / "configs" / "needle_tiny.yaml")
    summary = train(exp, impl="optimized", device=CPU, out_dir=tmp_path, progress=False)
    assert summary["val_accuracy"] >= 0.9, summary
    assert summary["final_loss"] < summary["first_loss"] / 4


def test_resolve_device() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match=r"--device must be one of"):
        resolve_device("tpu")


def test_train_compile_runs_the_training_forward_through_torch_compile(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`train.compile: MODE` hands the wrapped model to `torch.compile(mode=MODE)` (stubbed here: it records the
    mode and counts calls) and runs every training forward through it, while evaluation and the checkpoint use the
    model itself (no `_orig_mod.` keys); the run equals the eager one (the stub computes the same thing)."""
    calls: list[str | None] = []

    class Compiled(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> Any:
            calls.append("forward")
            return self.inner(x)

    def fake_compile(model: torch.nn.Module, mode: str | None = None) -> torch.nn.Module:
        calls.append(mode)
        return Compiled(model)

    train_cfg = {**SMALL["train"], "steps": 4, "eval_every": 2, "checkpoint_every": 4}
    eager = train(load_experiment({**SMALL, "train": train_cfg}), impl="optimized", device=CPU,
                  out_dir=tmp_path / "eager", progress=False)
    monkeypatch.setattr(torch, "compile", fake_compile)
    compiled = train(load_experiment({**SMALL, "train": {**train_cfg, "compile": "reduce-overhead"}}),
                     impl="optimized", device=CPU, out_dir=tmp_path / "compiled", progress=False)
    assert calls == ["reduce-overhead"] + ["forward"] * 4  # one compile, one compiled forward per training step
    assert compiled["final_loss"] == eager["final_loss"] and compiled["val_loss"] == eager["val_loss"]
    a = load_checkpoint(tmp_path / "eager" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "compiled" / "checkpoint.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_train_compile_default_matches_eager_on_the_cpu(tmp_path: Path) -> None:
    """`train.compile: default` for real (inductor's C++ backend on the CPU): the same losses as eager to float32
    reassociation (1e-5 relative)."""
    train_cfg = {**SMALL["train"], "steps": 3, "eval_every": 3, "checkpoint_every": 3}
    runs = [train(load_experiment({**SMALL, "train": {**train_cfg, "compile": mode}}), impl="optimized", device=CPU,
                  out_dir=tmp_path / mode, progress=False) for mode in ("none", "default")]
    losses = [[m["loss"] for m in read_metrics(tmp_path / mode)] for mode in ("none", "default")]
    assert len(losses[0]) == 3
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=0.0)
    assert runs[1]["val_loss"] == pytest.approx(runs[0]["val_loss"], rel=1e-5)


@pytest.mark.gpu
def test_train_compile_reduce_overhead_matches_eager_on_cuda(tmp_path: Path) -> None:
    """`train.compile: reduce-overhead` on the Atlas-MAG CPU config (the Omega and attention kernels inside CUDA
    graphs, λ(t) changing at the anneal step): the same per-step losses as eager to 1e-4 relative (inductor's
    reassociation of float32 reductions)."""
    exp = load_experiment(ROOT / "configs" / "atlas_mag_cpu.yaml").as_dict()
    # the synthetic needle task at the config's length: the SmolLM fixtures need `datasets`, absent on GPU images
    task = {"name": "needle", "n_needles": 2, "seq_len": 64, "num_keys": 8, "num_values": 8, "num_filler": 8}
    cuda = torch.device("cuda")
    losses = []
    for mode in ("none", "reduce-overhead"):
        run = load_experiment({**exp, "task": task, "train": {**exp["train"], "steps": 6, "eval_every": 6,
                                                               "checkpoint_every": 6, "probes": [],
                                                               "compile": mode}})
        train(run, impl="optimized", device=cuda, out_dir=tmp_path / mode, progress=False)
        losses.append(torch.tensor([m["loss"] for m in read_metrics(tmp_path / mode)]))
    assert len(losses[0]) == 6
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=0.0)
