"""Process-group setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and small helpers."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: global rank, number of processes, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device ``name`` means: ``auto`` -> this process's GPU when CUDA is available, else CPU;
    ``cuda`` -> GPU ``local_rank``; ``cpu`` and ``cuda:N`` as named. ValueError for unknown names and for
    GPUs that are not there."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA device is available (use auto or cpu)")
    count = torch.cuda.device_count()
    index = local_rank % count if device.index is None else device.index
    if index >= count:
        raise ValueError(f"device {name!r}: there are only {count} CUDA devices (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=60), device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, dev)


def barrier() -> None:
    """Wait for every process (no-op when not distributed)."""
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every process (returned unchanged when not distributed)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj) -> list:
    """A list with every rank's ``obj`` in rank order (``[obj]`` when not distributed)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    """Leave the process group if joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the global batch of all processes (any backend).

    The embedding head's BatchNorm1d sits after the 2-D norms; with ``model.norm`` syncsn/syncbn the whole
    network should see global-batch statistics, and ``torch.nn.SyncBatchNorm`` runs on GPUs only. Assumes
    the same batch size on every process (as the training loader guarantees with ``drop_last``).
    ``process_group``: the processes whose batches are pooled (default: all, as ``SyncSwitchNorm2d``).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size(self.process_group) > 1):
            return super().forward(x)
        world = dist.get_world_size(self.process_group)
        group = dist.group.WORLD if self.process_group is None else self.process_group
        stats = dist_nn.all_reduce(torch.cat([x.mean(0), (x * x).mean(0)]), group=group) / world
        mean, mean_sq = stats.chunk(2)
        var = (mean_sq - mean * mean).clamp_min(0)
        if self.track_running_stats:
            count = x.shape[0] * world
            with torch.no_grad():
                self.num_batches_tracked += 1
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * count / max(1, count - 1), self.momentum)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


def sync_batchnorm1d(model: nn.Module, process_group=None) -> nn.Module:
    """Replace every ``nn.BatchNorm1d`` in ``model`` by :class:`SyncBatchNorm1d` over ``process_group``
    (same state dict keys)."""
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm1d:
            sync = SyncBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats, process_group).to(child.weight.device)
            sync.load_state_dict(child.state_dict())
            if child.affine:
                sync.weight.requires_grad_(child.weight.requires_grad)
                sync.bias.requires_grad_(child.bias.requires_grad)
            setattr(model, name, sync)
        else:
            sync_batchnorm1d(child, process_group)
    return model
