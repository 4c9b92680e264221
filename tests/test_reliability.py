"""Reliability: hard kills lose nothing, faults are skipped or stop cleanly, checkpoints are checked on load,
checkpoints cross implementations, and the config loader never crashes on arbitrary input."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import training.loop
from reference.validation import ConfigError
from training import build_model, load_experiment
from training.checkpoint import load_checkpoint, load_model_weights
from training.loop import evaluate, train
from training.registry import get_task_spec

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
SMALL: dict[str, Any] = {
    "model": {"name": "gru", "embed_dim": 8, "hidden_dim": 16},
    "task": {"name": "needle", "n_needles": 2, "seq_len": 12, "num_keys": 4, "num_values": 4, "num_filler": 4},
    "train": {"steps": 60, "batch_size": 8, "lr": 1e-2, "warmup_steps": 3, "eval_every": 20, "eval_batches": 2,
              "checkpoint_every": 5, "seed": 11},
}


def launch(cfg: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(cfg), "--out",
                             str(out), "--device", "cpu", "--no-progress"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.02)


def test_sigkill_at_a_random_step_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    data = {**SMALL, "train": {**SMALL["train"], "steps": 120}}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    kill_after = random.Random(1234).randint(8, 100)
    out = tmp_path / "killed"
    proc = launch(cfg, out)
    wait_for_lines(out / "metrics.jsonl", kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    step = load_checkpoint(out / "checkpoint.pt")["step"]
    assert 5 <= step < 120
    exp = load_experiment(cfg)
    resumed = train(exp, impl="optimized", device=CPU, out_dir=out, resume=True, progress=False)
    full = train(exp, impl="optimized", device=CPU, out_dir=tmp_path / "full", progress=False)
    for key in ("final_loss", "val_loss", "val_accuracy", "steps"):
        assert resumed[key] == full[key], key
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 121))  # no gap, no duplicate, no torn line


def test_sigint_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    data = {**SMALL, "train": {**SMALL["train"], "steps": 5000, "checkpoint_every": 10_000}}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    proc = launch(cfg, tmp_path / "run")
    wait_for_lines(tmp_path / "run" / "metrics.jsonl", 10, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "interrupted (SIGINT)" in stdout
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] >= 10


def poison(monkeypatch: pytest.MonkeyPatch, bad_calls: set[int] | None = None, after: int | None = None) -> None:
    real = training.loop.loss_and_accuracy
    calls = {"n": 0}

    def poisoned(logits: torch.Tensor, targets: torch.Tensor,
                 kind: str = "cross_entropy") -> tuple[torch.Tensor, torch.Tensor]:
        loss, acc = real(logits, targets, kind)
        if logits.requires_grad:  # training calls only
            calls["n"] += 1
            if (bad_calls and calls["n"] in bad_calls) or (after is not None and calls["n"] > after):
                loss = loss * float("nan")
        return loss, acc

    monkeypatch.setattr(training.loop, "loss_and_accuracy", poisoned)


def test_a_nan_batch_mid_run_is_skipped_and_the_run_completes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    poison(monkeypatch, bad_calls={17, 33})
    summary = train(load_experiment(SMALL), impl="optimized", device=CPU, out_dir=tmp_path, progress=False)
    assert summary["status"] == "completed" and summary["steps"] == 60
    assert summary["skipped_steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["skipped"]] == [17, 33]


def test_persistent_nan_stops_with_the_documented_message_and_a_loadable_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    poison(monkeypatch, after=12)
    exp = load_experiment({**SMALL, "train": {**SMALL["train"], "max_bad_steps": 4}})
    with pytest.raises(training.loop.TrainingError, match=r"4 consecutive steps had a non-finite loss or gradient "
                                                          r"\(step 15\); stopping\. The last good checkpoint is"):
        train(exp, impl="optimized", device=CPU, out_dir=tmp_path, progress=False)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 15  # saved at step 15 (a multiple of checkpoint_every), weights from step 12
    model = build_model(exp, "reference")
    load_model_weights(model, state, "gru")
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize(("trained", "evaluated"), [("optimized", "reference"), ("reference", "optimized")])
def test_a_checkpoint_trained_with_one_impl_evaluates_identically_with_the_other(tmp_path: Path, trained: str,
                                                                                evaluated: str) -> None:
    exp = load_experiment({**SMALL, "train": {**SMALL["train"], "steps": 8}})
    train(exp, impl=trained, device=CPU, out_dir=tmp_path, progress=False)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    task = get_task_spec("needle").build(exp.task)
    losses = []
    for impl in (trained, evaluated):
        model = build_model(exp, impl)
        load_model_weights(model, state, "gru")
        losses.append(evaluate(model.double(), task, exp, CPU)["val_loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-9, abs=1e-12)


def test_truncated_foreign_and_mismatched_checkpoints_are_refused(tmp_path: Path) -> None:
    exp = load_experiment({**SMALL, "train": {**SMALL["train"], "steps": 2}})
    train(exp, impl="optimized", device=CPU, out_dir=tmp_path, progress=False)
    path = tmp_path / "checkpoint.pt"
    blob = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ConfigError, match=r"truncated or corrupt checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ConfigError, match=r"not a memarch checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    state = load_checkpoint(path)
    with pytest.raises(ConfigError, match=r"checkpoint holds a 'gru' model, not 'emma_liquid'"):
        load_model_weights(build_model(exp, "optimized"), state, "emma_liquid")
    bigger = build_model({**SMALL, "model": {**SMALL["model"], "hidden_dim": 32}}, "optimized")
    with pytest.raises(RuntimeError, match=r"size mismatch"):
        load_model_weights(bigger, state, "gru")
    state["config"]["train"]["lr"] = 1.0
    torch.save(state, tmp_path / "tampered.pt")
    with pytest.raises(ConfigError, match=r"does not match its hash"):
        load_checkpoint(tmp_path / "tampered.pt")


scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)
known_keys = st.sampled_from(["name", "hidden_dim", "embed_dim", "num_layers", "vocab_size", "n_needles", "seq_len",
                              "num_keys", "steps", "lr", "batch_size", "schedule", "betas", "probes", "files"])


@st.composite
def experiments(draw: st.DrawFn) -> Any:
    doc: dict[Any, Any] = {}
    for section in draw(st.lists(st.sampled_from(["model", "task", "train", "optim", "ünïcode"]), max_size=4)):
        keys = draw(st.lists(st.one_of(known_keys, st.text(max_size=8)), max_size=5))
        doc[section] = {k: draw(values) for k in keys}
        if section in ("model", "task") and draw(st.booleans()):
            doc[section]["name"] = draw(st.sampled_from(["gru", "needle", "text", "nope", 3]))
    return draw(st.one_of(st.just(doc), values))


@settings(max_examples=200)
@given(experiments())
def test_the_config_loader_either_builds_or_raises_config_error(doc: Any) -> None:
    try:
        exp = load_experiment(doc) if isinstance(doc, dict) else load_experiment({"model": doc, "task": doc})
    except ConfigError:
        return
    assert exp.train.steps >= 1  # it built a valid config


@given(st.text(max_size=200))
def test_arbitrary_yaml_text_never_crashes_the_loader(text: str) -> None:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"fuzz-{os.getpid()}.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_experiment(path)
    except ConfigError:
        pass
    finally:
        path.unlink(missing_ok=True)
