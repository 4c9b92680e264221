"""torch.distributed on CPU (gloo): 2-process training equals 1-process training on the same global batch,
for two architectures and for DDP and FSDP2; a checkpoint saved by 2 ranks resumes on 1; recurrent state
stays per rank."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import yaml
from torch.multiprocessing.spawn import spawn

from training import load_experiment
from training.checkpoint import load_checkpoint
from training.distributed import DistInfo, shard_rows, wrap_model
from training.loop import segment_losses, train

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
# float64 so that the only difference between 1 and 2 processes is the order of the gradient all-reduce:
# parameters must agree to 1e-10 (relative to their scale) after the run.
TOL = 1e-10
TASK = {"name": "needle", "n_needles": 2, "seq_len": 12, "num_keys": 4, "num_values": 4, "num_filler": 4}
TRAIN = {"steps": 6, "batch_size": 8, "lr": 1e-2, "warmup_steps": 2, "eval_every": 3, "eval_batches": 1,
         "checkpoint_every": 3, "dtype": "float64", "grad_accum_steps": 2, "seed": 5}
MODELS: dict[str, dict[str, Any]] = {
    "gru": {"name": "gru", "embed_dim": 8, "hidden_dim": 12},
    "atlas_mag": {"name": "atlas_mag", "dim": 16, "num_layers": 1, "num_heads": 2, "window": 4, "omega_window": 4,
                  "num_persistent": 2},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(cfg: Path, out: Path, *extra: str, steps: int | None = None) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(ROOT / "scripts" / "train.py"), "--config", str(cfg), "--out", str(out), "--device", "cpu",
           "--no-progress", *extra]
    if steps is not None:
        cmd += ["--max-steps", str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        scale = max(1.0, float(a[k].abs().max()))
        err = float((a[k] - b[k]).abs().max())
        assert err <= TOL * scale, f"{k}: {err:.3e}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_two_process_ddp_equals_one_process_and_resumes_on_one(tmp_path: Path, name: str) -> None:
    data = {"model": MODELS[name], "task": TASK, "train": TRAIN}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    exp = load_experiment(cfg)
    single = train(exp, impl="optimized", device=CPU, out_dir=tmp_path / "one", progress=False)
    torchrun(cfg, tmp_path / "two", steps=3)  # 2 ranks stop at step 3 and checkpoint ...
    assert load_checkpoint(tmp_path / "two" / "checkpoint.pt")["world_size"] == 2
    resumed = train(exp, impl="optimized", device=CPU, out_dir=tmp_path / "two", resume=True, progress=False)
    assert resumed["steps"] == single["steps"] == 6  # ... and 1 process finishes the run
    assert_same_weights(load_checkpoint(tmp_path / "one" / "checkpoint.pt")["model"],
                        load_checkpoint(tmp_path / "two" / "checkpoint.pt")["model"])
    assert resumed["final_loss"] == pytest.approx(single["final_loss"], rel=1e-9)


def test_two_process_fsdp_equals_one_process(tmp_path: Path) -> None:
    data = {"model": MODELS["gru"], "task": TASK, "train": TRAIN}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    train(load_experiment(cfg), impl="optimized", device=CPU, out_dir=tmp_path / "one", progress=False)
    torchrun(cfg, tmp_path / "fsdp", "--fsdp")
    assert_same_weights(load_checkpoint(tmp_path / "one" / "checkpoint.pt")["model"],
                        load_checkpoint(tmp_path / "fsdp" / "checkpoint.pt")["model"])


def _state_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    exp = load_experiment({"model": MODELS["gru"], "task": TASK, "train": {**TRAIN, "tbptt_length": 4}})
    from training.registry import build_model

    info = DistInfo(rank=rank, world_size=2)
    model = wrap_model(build_model(exp, "optimized").double(), info, CPU)
    x = torch.randint(0, 13, (4, 12), generator=torch.Generator().manual_seed(1))
    xs = shard_rows(x, info)
    out_state = model(xs, state=None, return_state=True)["state"]
    loss = sum(part[0] for part in segment_losses(model, xs, xs, 4))
    assert isinstance(loss, torch.Tensor)
    loss.backward()  # gradients are all-reduced; the state above must not be
    torch.save(out_state.detach(), f"{out}/state{rank}.pt")
    dist.destroy_process_group()


def test_recurrent_state_is_per_rank_and_never_all_reduced(tmp_path: Path) -> None:
    spawn(_state_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    exp = load_experiment({"model": MODELS["gru"], "task": TASK, "train": TRAIN})
    from training.registry import build_model

    model = build_model(exp, "optimized").double()
    x = torch.randint(0, 13, (4, 12), generator=torch.Generator().manual_seed(1))
    full = model(x, return_state=True)["state"]  # (layers, 4, H)
    s0, s1 = (torch.load(tmp_path / f"state{r}.pt", weights_only=True) for r in (0, 1))
    torch.testing.assert_close(torch.cat([s0, s1], dim=1), full, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(s0, s1)  # each rank kept its own sequences' state
