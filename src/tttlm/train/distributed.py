"""Processes and devices: one process, or several under torchrun (DDP or FSDP2), on CPU (gloo) or GPUs (NCCL)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    """Where this process runs: rank among world_size processes, its device, and the compute dtype."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dtype: torch.dtype

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_sum(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def autocast(self):
        """bfloat16 autocast when the compute dtype is bfloat16 (GPU), else nothing."""
        if self.dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def start(device: str = "auto", dtype: str = "auto") -> Runtime:
    """Joins the torchrun process group when WORLD_SIZE > 1 (NCCL on GPUs, gloo on CPU) and picks the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but no GPU is visible")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    return Runtime(rank, world, local, dev, getattr(torch, dtype))


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, rt: Runtime, parallel: str) -> torch.nn.Module:
    """The model to train: itself on one process, DDP, or FSDP2 (fully_shard on every block, then the root;
    bfloat16 parameters with float32 gradient reduction when the compute dtype is bfloat16)."""
    if not rt.distributed:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # no device_ids: DDP would copy every input to the GPU, the CPU position ids too, whose document
        # boundaries the model reads on the host without waiting for the GPU (the ids are there already)
        return DistributedDataParallel(model)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=rt.dtype, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and not hasattr(model, "config") else model


def grad_sync(model: torch.nn.Module, sync: bool):
    """Context of one accumulation micro-step: gradients are synchronised only when `sync` (the last one)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    elif not sync and hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    return contextlib.nullcontext()
