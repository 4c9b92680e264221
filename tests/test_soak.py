"""Soak: random small models trained through `scripts/train.py`, hard-killed or interrupted at random moments and
resumed with `--resume`, until `MEMARCH_SOAK_SECONDS` (default 1800) have passed.

Every interruption is followed by a check that the checkpoint loads and is not older than the metrics promise; every
run must finish with a `summary.json` that says `completed`, a final checkpoint at the planned step and one metrics
record per step; about half the interrupted runs are also compared with an uninterrupted run of the same config,
which must give the same final loss bit for bit. The counts go to stdout and, as JSON, to `MEMARCH_SOAK_REPORT`
when set. `MEMARCH_SOAK_SEED` replays a soak.

    MEMARCH_SOAK_SECONDS=180 MEMARCH_SOAK_REPORT=soak.json python -m pytest -q -m slow tests/test_soak.py -s
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from reference.deq_solvers import ConvergenceWarning
from reference.validation import MemarchError
from tests.tiny_models import TINY_MODELS
from training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from training.config import load_experiment
from training.loop import METRICS_NAME, SUMMARY_NAME, train

ROOT = Path(__file__).resolve().parent.parent
NEEDLE = {"name": "needle", "n_needles": 2, "seq_len": 8, "num_keys": 3, "num_values": 3, "num_filler": 3}
# the shared tiny models; EMMA also takes the needle task's sizes and a short epoch (its schedule is in epochs)
MODELS: dict[str, dict[str, Any]] = {**TINY_MODELS, "emma_liquid": {**TINY_MODELS["emma_liquid"], "steps_per_epoch": 5,
                                                                   "num_filler": 3, "num_keys": 3, "num_values": 3}}
RECURRENT = ("gru", "hamt")  # models whose forward carries a state: truncated BPTT applies
COUNTS = ("runs", "completed_runs", "kills", "sigints", "sigints_outside_loop", "resumes",
          "restarts_without_checkpoint", "checkpoints_verified", "exact_resume_checks", "summaries_without_final_loss",
          "lost_checkpoints", "crashes", "inconsistent", "resume_mismatches")
PHASE_TIMEOUT = 600.0  # seconds one train.py process may take before it counts as hung


def random_experiment(rng: random.Random, name: str) -> dict[str, Any]:
    steps = rng.randint(3, 40)
    train_cfg: dict[str, Any] = {
        "steps": steps, "batch_size": rng.choice([2, 4, 8]), "lr": rng.choice([1e-3, 3e-3, 1e-2]),
        "warmup_steps": rng.randint(0, 3), "schedule": rng.choice(["constant", "cosine", "linear"]),
        "eval_every": rng.randint(2, 20), "eval_batches": 1, "checkpoint_every": rng.randint(1, 10),
        "seed": rng.randint(0, 10_000), "grad_accum_steps": rng.choice([1, 1, 2]),
        "loss": rng.choice(["cross_entropy", "cross_entropy", "stablemax"]),
        "perp_grad": rng.random() < 0.2,
        "dtype": "float64" if rng.random() < 0.15 else "float32",
    }
    if train_cfg["dtype"] == "float32" and rng.random() < 0.15:
        train_cfg["autocast"] = "bf16"
    if name in RECURRENT and rng.random() < 0.4:
        train_cfg["tbptt_length"] = rng.choice([2, 4])
    return {"model": {"name": name, **MODELS[name]}, "task": dict(NEEDLE), "train": train_cfg}


def metric_steps(path: Path) -> list[int]:
    """The steps of the complete metric records (a line torn by a hard kill is skipped)."""
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return steps


def same(a: object, b: object) -> bool:
    """Equal, counting NaN as equal to NaN (a run may end on a skipped non-finite step)."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


@dataclass
class Soak:
    rng: random.Random
    root: Path
    counts: Counter[str] = field(default_factory=Counter)
    by_model: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def fail(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        self.failures.append(f"{kind}: {message}")
        print(f"[soak] {kind}: {message}", flush=True)

    def launch(self, cfg: Path, out: Path, impl: str, resume: bool, log: Path) -> subprocess.Popen[bytes]:
        argv = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(cfg), "--out", str(out),
                "--impl", impl, "--device", "cpu", "--no-progress", *(["--resume"] if resume else [])]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with log.open("ab") as handle:
            return subprocess.Popen(argv, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env)

    def check_checkpoint(self, out: Path, floor: int, ceiling: int, tag: str) -> int | None:
        """Load out/checkpoint.pt; its step must lie in [floor, ceiling]. Returns the step (None: no checkpoint)."""
        path = out / CHECKPOINT_NAME
        if not path.exists():
            if floor > 0:
                self.fail("lost_checkpoints", f"{tag}: no checkpoint, but step {floor} was saved")
            return None
        try:
            step = int(load_checkpoint(path)["step"])
        except MemarchError as exc:
            self.fail("lost_checkpoints", f"{tag}: the checkpoint does not load: {exc}")
            return None
        self.counts["checkpoints_verified"] += 1
        if not floor <= step <= ceiling:
            self.fail("lost_checkpoints", f"{tag}: checkpoint at step {step}, expected one in [{floor}, {ceiling}]")
        return step

    def one_run(self, index: int) -> None:
        name = self.rng.choice(sorted(MODELS))
        impl = self.rng.choice(["reference", "optimized"])
        data = random_experiment(self.rng, name)
        tc = data["train"]
        steps, every = tc["steps"], tc["checkpoint_every"]
        folder = self.root / f"run{index:04d}-{name}-{impl}"
        folder.mkdir()
        cfg = folder / "config.yaml"
        cfg.write_text(yaml.safe_dump(data))
        out, log = folder / "out", folder / "train.log"
        tag = f"run {index} ({name}, {impl}, {steps} steps, checkpoint every {every})"
        self.counts["runs"] += 1
        self.by_model[name] += 1
        saved = 0  # the newest checkpoint step known to be on disk
        interrupts = 0
        resume = False
        for attempt in range(8):
            action = "none" if interrupts >= 3 else self.rng.choice(["none", "sigkill", "sigkill", "sigint", "sigint"])
            if resume:
                self.counts["resumes"] += 1
            elif attempt > 0:
                self.counts["restarts_without_checkpoint"] += 1
            metrics = out / METRICS_NAME
            stamp = metrics.stat().st_mtime_ns if metrics.exists() else None
            proc = self.launch(cfg, out, impl, resume, log)
            sent = self.interrupt(proc, out, saved if resume else 0, steps, stamp, action)
            try:
                rc = proc.wait(timeout=PHASE_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                self.fail("crashes", f"{tag}: train.py hung for {PHASE_TIMEOUT:.0f} s (log {log})")
                return
            seen = metric_steps(out / METRICS_NAME)
            last = max(seen, default=0)
            if rc == 0 and (out / SUMMARY_NAME).exists() and sent is None:
                break  # finished on its own
            if rc == 0 and sent == signal.SIGINT:
                self.counts["sigints"] += 1
                summary = json.loads((out / SUMMARY_NAME).read_text())
                if summary["status"] == "completed":
                    break  # the signal came after the last step's checkpoint
                if summary["status"] != "interrupted (SIGINT)":
                    self.fail("inconsistent", f"{tag}: status {summary['status']!r} after SIGINT")
                saved = self.check_checkpoint(out, max(saved, last), last, tag + " after SIGINT") or saved
            elif rc == -signal.SIGKILL and sent == signal.SIGKILL:
                self.counts["kills"] += 1
                # a metric record for step m is written after every checkpoint of a step < m
                promised = max([s for s in range(every, last) if s % every == 0], default=0)
                saved = self.check_checkpoint(out, max(saved, promised), max(last, saved), tag + " after SIGKILL") \
                    or saved
            elif sent == signal.SIGINT and (rc == -signal.SIGINT or (rc in (1, 130) and "KeyboardInterrupt" in
                                                                       log.read_text(errors="replace"))):
                # SIGINT outside the training loop (interpreter start-up, imports, the final evaluation): the default
                # handler ends the process
                self.counts["sigints_outside_loop"] += 1
                saved = self.check_checkpoint(out, saved, max(last, saved), tag + " after an early SIGINT") or saved
            else:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                what = signal.Signals(sent).name if sent is not None else "no signal"
                self.fail("crashes", f"{tag}: exit status {rc} after {what}; log tail:\n{tail}")
                return
            interrupts += 1
            resume = (out / CHECKPOINT_NAME).exists()
        else:
            self.fail("inconsistent", f"{tag}: not finished after 8 attempts")
            return
        self.finished(tag, out, steps, data, impl, interrupted=interrupts > 0)

    def interrupt(self, proc: subprocess.Popen[bytes], out: Path, start: int, steps: int, stamp: int | None,
                  action: str) -> int | None:
        """Send the signal once this process has logged a random step in (start, steps] (sometimes at once, during
        start-up); None if nothing was sent. `stamp` is the metrics file's mtime before the launch: records older
        than this process do not count."""
        if action == "none":
            return None
        target = self.rng.randint(start + 1, steps) if start < steps and self.rng.random() < 0.85 else 0
        path = out / METRICS_NAME
        deadline = time.monotonic() + PHASE_TIMEOUT
        while target > 0 and proc.poll() is None and time.monotonic() < deadline:
            if path.exists() and path.stat().st_mtime_ns != stamp and max(metric_steps(path), default=0) >= target:
                break
            time.sleep(0.02)
        time.sleep(self.rng.random() * 0.05)
        if proc.poll() is not None:
            return None
        sig = signal.SIGKILL if action == "sigkill" else signal.SIGINT
        proc.send_signal(sig)
        return sig

    def finished(self, tag: str, out: Path, steps: int, data: dict[str, Any], impl: str, *, interrupted: bool) -> None:
        summary = json.loads((out / SUMMARY_NAME).read_text())
        if summary["status"] != "completed" or summary["steps"] != steps:
            self.fail("inconsistent", f"{tag}: summary says {summary['status']!r} at step {summary['steps']}")
            return
        self.check_checkpoint(out, steps, steps, tag + " at the end")
        seen = metric_steps(out / METRICS_NAME)
        if seen != list(range(1, steps + 1)):
            self.fail("inconsistent", f"{tag}: metric records for steps {seen}, expected 1 … {steps}")
        self.counts["completed_runs"] += 1
        if summary.get("final_loss") is None:
            # a run resumed from its last checkpoint has no step left to take, so its summary has no final loss
            self.counts["summaries_without_final_loss"] += 1
        if interrupted and self.rng.random() < 0.5:
            self.exact_resume_check(tag, out, summary, data, impl)

    def exact_resume_check(self, tag: str, out: Path, summary: dict[str, Any], data: dict[str, Any],
                           impl: str) -> None:
        """The interrupted run's final weights and validation loss equal an uninterrupted run's, bit for bit."""
        self.counts["exact_resume_checks"] += 1
        full_out = out.parent / "uninterrupted"
        with warnings.catch_warnings():  # tiny DEQ models warn about approximate implicit gradients; not our subject
            warnings.simplefilter("ignore", ConvergenceWarning)
            full = train(load_experiment(data), impl=impl, device=torch.device("cpu"), out_dir=full_out,
                         progress=False)
        a = load_checkpoint(out / CHECKPOINT_NAME)["model"]
        b = load_checkpoint(full_out / CHECKPOINT_NAME)["model"]
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        if differ or not same(full.get("val_loss"), summary.get("val_loss")):
            self.fail("resume_mismatches", f"{tag}: after interruptions val_loss {summary.get('val_loss')!r} and "
                                           f"{len(differ)} differing tensors ({differ[:3]}); uninterrupted val_loss "
                                           f"{full.get('val_loss')!r}")


@pytest.mark.slow
def test_soak_kill_and_resume_never_loses_a_checkpoint(tmp_path: Path) -> None:
    seconds = float(os.environ.get("MEMARCH_SOAK_SECONDS", "1800"))
    seed = int(os.environ.get("MEMARCH_SOAK_SEED", str(int(time.time()))))
    soak = Soak(random.Random(seed), tmp_path)
    print(f"[soak] seed {seed}, {seconds:.0f} s", flush=True)
    start = time.monotonic()
    index = 0
    while time.monotonic() - start < seconds:
        soak.one_run(index)
        index += 1
    counts = {key: soak.counts[key] for key in COUNTS}
    report = {"seed": seed, "seconds": round(time.monotonic() - start, 1), **counts,
              "runs_by_model": dict(sorted(soak.by_model.items())), "failures": soak.failures}
    text = json.dumps(report, indent=2)
    print(text, flush=True)
    if os.environ.get("MEMARCH_SOAK_REPORT"):
        Path(os.environ["MEMARCH_SOAK_REPORT"]).write_text(text + "\n")
    assert counts["runs"] >= 1
    for key in ("lost_checkpoints", "crashes", "inconsistent", "resume_mismatches"):
        assert counts[key] == 0, f"{key}: {soak.failures}"
