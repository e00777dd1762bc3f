"""Multi-process training under `torchrun`: who am I, and the few collective steps training needs.

`torchrun --nproc_per_node N -m distill.run v3 ...` sets RANK, WORLD_SIZE and LOCAL_RANK; without
them everything here is a no-op for a single process, so the training loop (`loop.py`) has one code path. Backend:
NCCL on CUDA, gloo on CPU (the tests run two CPU processes). Also the process's device
(`pick_device`) and moving a batch onto it (`to_device`), shared by training and the cache command.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes files, logs and shows progress bars; the others only compute."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def pick_device(spec: str, local_rank: int = 0, key: str = "train.device", world: int = 1) -> torch.device:
    """`auto`: CUDA when present (under torchrun, the process's own GPU), else the CPU. `key` names
    the setting in the error; `world`: the processes of a torchrun job, each of which takes its own GPU."""
    given = spec
    if spec == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if spec == "auto":   # the checks below: a torchrun job of more processes than GPUs
        spec = "cuda"
    try:
        device = torch.device(spec)
    except RuntimeError:   # torch's own message lists twenty device types this project never runs on
        device = None
    # the devices this project runs and measures on (MPS: never tried; its ops and AMP differ)
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise ValueError(f"{key}={spec}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and device.index is not None and world > 1:   # NCCL fails on a shared GPU, later
        raise ValueError(f"{key}={spec} puts all {world} processes of this torchrun job on one GPU; use {key}=cuda "
                         f"(or auto): each process takes the GPU of its local rank")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}={spec} but CUDA is not available here; use {key}=cpu or auto")
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        fix = (f"run at most {torch.cuda.device_count()} torchrun processes (--nproc_per_node)" if world > 1
               else f"pick one of them, or {key}=auto")
        raise ValueError(f"{key}={given} asks for cuda:{device.index}, but this machine has {torch.cuda.device_count()} "
                         f"GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}; {fix}")
    return device


def sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """The model with batch statistics over every process's batch. timm's conversion, not torch's:
    torch's replaces timm's BatchNormAct2d (MobileNetV3's 33 norms with their ReLU / hardswish) by a
    plain SyncBatchNorm that drops the activation, so a multi-GPU run trained and validated another
    network than the one best.safetensors rebuilds (depth 5.8% apart on the same weights)."""
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors on `device` (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def from_environment() -> Dist:
    """The process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(d: Dist, device: torch.device) -> bool:
    """Join the process group (once); a no-op for a single process. On CUDA each rank first makes its
    own GPU current (NCCL works on the current device), and CPU tensors (the epoch means, the
    broadcast objects) go through gloo beside NCCL: an NCCL-only group refuses a CPU all-reduce.
    Returns whether it created the group (one the caller made is left to the caller)."""
    if d.active and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=d.rank, world_size=d.world)
        return True
    return False


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def broadcast(d: Dist, value):
    """Rank 0's `value` on every rank (any picklable object)."""
    if not d.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_across(d: Dist, values: dict[str, float]) -> dict[str, float]:
    """Each key averaged over ranks (epoch losses: every rank logs and weights by the same numbers)."""
    if not d.active or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / d.world for k, v in zip(keys, t.tolist())}


def average_gradients(d: Dist, params) -> None:
    """All-reduce the gradients of parameters outside the DDP-wrapped model (Kendall's
    log-variances, feature-KD projections), so every rank takes the same step."""
    if not d.active:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= d.world


def broadcast_module(d: Dist, module: torch.nn.Module | None) -> None:
    """Rank 0's parameters and buffers on every rank, for modules outside the DDP wrapper."""
    if d.active and module is not None:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)
