"""Processes and devices: one process, or several under torchrun (DDP or FSDP2), on CPU (gloo) or GPUs (NCCL)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

_joined = False  # set by start when this process joins a process group


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

    def all_sum(self, values: list[float]) -> list[float]:
        """Each value summed over the processes (one collective; the values themselves on one process)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the processes, in place on its device: no host synchronisation under NCCL."""
        if self.distributed:
            dist.all_reduce(t)
        return t

    def first_error(self, message: str | None) -> str | None:
        """The first process's error message of those that have one, on every process (None when none has)."""
        if not self.distributed:
            return message
        messages = [None] * self.world_size
        dist.all_gather_object(messages, message)
        return next((m for m in messages if m is not None), None)

    def broadcast(self, obj):
        """The main process's obj (any picklable value), on every process."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def autocast(self):
        """bfloat16 autocast when the compute dtype is bfloat16 (GPU), else nothing."""
        if self.dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def start(device: str = "auto", dtype: str = "auto") -> Runtime:
    """Joins the torchrun process group when WORLD_SIZE > 1 (NCCL on GPUs, gloo on CPU) and picks the device."""
    global _joined
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but no GPU is visible")
        if device != "cuda" and world > 1:
            raise ValueError(f"device {device!r}: under torchrun each process takes the GPU of its LOCAL_RANK: pass "
                             f"cuda")
        dev = torch.device("cuda", local) if device == "cuda" else torch.device(device)
        torch.cuda.set_device(dev)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
        _joined = True
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    return Runtime(rank, world, local, dev, getattr(torch, dtype))


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def joined() -> bool:
    """Whether this process has joined a torchrun process group (see `tttlm.cli.run` for why that matters)."""
    return _joined


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


def lost_peer(error: BaseException) -> str | None:
    """How a collective failed because another process is gone, in a few words, or None when `error` is not
    such a failure: gloo sees the connection closed at once (a RuntimeError); NCCL's watchdog reports a timeout
    or an aborted communicator (a DistError)."""
    text = str(error)
    for words in ("connection closed by peer", "connection reset by peer", "broken pipe"):
        if isinstance(error, RuntimeError) and words in text.lower():
            return words
    if isinstance(error, dist.DistError):
        return f"{type(error).__name__}: {text.splitlines()[0][:100] if text else ''}"
    return None
