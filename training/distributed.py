"""Data-parallel and sharded training through torch.distributed, applied around an unchanged model.

`torchrun --nproc-per-node N scripts/train.py …` sets the environment this module reads. Every rank builds the
same model from the same seed; DDP (default) or FSDP2 `fully_shard` (`--fsdp`) wraps it. Each rank takes its
contiguous slice of the global batch (`train.batch_size` rows), so N ranks see exactly the data one process
would, and gradients are averaged with weights that make the loss the global-batch mean. Only parameters'
gradients are communicated: recurrent memory state (Titans M/S, HCM state, DEQ warm starts) lives in each
rank's forward pass and is never all-reduced (DDP runs with `broadcast_buffers=False`).

Checkpoints hold the full (gathered) state dict in the single-process format, written by rank 0, so a run
saved on N ranks resumes on M ranks or on one CPU.
"""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from reference.validation import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    fsdp: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistInfo()


def init_distributed(device_name: str, *, fsdp: bool = False) -> tuple[DistInfo, str]:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); returns (info, device name).

    Backend: NCCL for CUDA, gloo otherwise; on CUDA each rank takes `cuda:LOCAL_RANK`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if fsdp:
            raise ConfigError("--fsdp needs several processes: launch with torchrun --nproc-per-node N")
        return SINGLE, device_name
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
        device_name = f"cuda:{local}"
    elif device_name == "auto":
        device_name = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    return DistInfo(rank=rank, world_size=world, local_rank=local, fsdp=fsdp), device_name


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP or FSDP2 around the model (already on `device`); the model itself is unchanged."""
    if not info.enabled:
        return model
    if info.fsdp:
        from torch.distributed.fsdp import fully_shard

        for child in model.children():  # shard each top-level submodule, then the root
            if any(p.requires_grad for p in child.parameters()):
                fully_shard(child)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    with warnings.catch_warnings():  # newer torch renames the flag; its meaning (no buffer sync) is what we want
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper (FSDP2 shards in place, so the model is itself)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) and type(model).__name__ == "DistributedDataParallel" else model


def shard_rows(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's contiguous slice of the global batch (rows)."""
    if not info.enabled:
        return x
    if x.shape[0] % info.world_size:
        raise ConfigError(f"train.batch_size ({x.shape[0]}) must be divisible by the number of processes "
                          f"({info.world_size})")
    per = x.shape[0] // info.world_size
    return x[info.rank * per : (info.rank + 1) * per]


def global_count(local: int, info: DistInfo, device: torch.device) -> int:
    """Sum of an integer over ranks (one all-reduce)."""
    if not info.enabled:
        return local
    t = torch.tensor([local], dtype=torch.long, device=device)
    dist.all_reduce(t)
    return int(t.item())


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True when `flag` is set on any rank (so every rank stops, or skips a step, together)."""
    if not info.enabled:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> tuple[dict[str, Any],
                                                                                               dict[str, Any]]:
    """Model and optimizer state in single-process form (gathered on rank 0 under FSDP; empty elsewhere)."""
    if info.fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)
    return unwrap(model).state_dict(), optimizer.state_dict()


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                    optim_state: dict[str, Any], info: DistInfo) -> None:
    """Load single-process state into a (possibly sharded) model and its optimizer."""
    if info.fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_state, options=opts)
        set_optimizer_state_dict(model, optimizer, optim_state, options=opts)
        return
    optimizer.load_state_dict(optim_state)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
