"""The fast paths of a forward pass, and the one switch of each.

compile: torch.compile of the model's blocks, with or without a decoding cache (each block's code is compiled
    once and shared by every layer; the ops' own kernels run between the compiled parts; decoding's CUDA graph
    captures the compiled step) and of the TTT ops' PyTorch mini-batch step. The setting is None (the default: on
    for CUDA tensors, off on the CPU, where float32 results stay those of the plain PyTorch code), True (on any
    device) or False; the environment variable TTTLM_COMPILE=0 / 1 sets the default, and `tttlm train` /
    `tttlm throughput` take --compile / --no-compile.
kernels: tttlm's own GPU paths on CUDA tensors: the Triton kernels of every op called with backend=None (TTT-Linear,
    TTT-MLP, Mesa, the Mamba and Mamba2 scans, decoding's attention over a static cache; the rule is
    `tttlm.ops.backend.use_triton`), FlexAttention over the documents of a packed batch and the fused linear +
    cross-entropy loss; on by default. Turning them off (with compile off) gives the plain PyTorch model, which
    the GPU check compares the fast paths against. An op called with backend="triton" or "torch" takes that one.

`configure(...)` sets either for the process; `fast_paths(...)` sets them inside a `with` block.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

_settings: dict = {"compile": None, "kernels": True}
# torch.compile's backend; tests on the CPU use "aot_eager" (tracing and autograd without code generation)
BACKEND = "inductor"
# devices of tttlm's own GPU paths; tests add "cpu" to run them under TRITON_INTERPRET=1
KERNEL_DEVICES = ("cuda",)


def _env_compile() -> bool | None:
    value = os.environ.get("TTTLM_COMPILE")
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"TTTLM_COMPILE must be 0 or 1, got {value!r}")
    return value == "1"


def configure(*, compile: bool | None = ..., kernels: bool = ...) -> None:
    """Sets the process-wide fast paths (arguments left out keep their value). compile: None (auto: CUDA only),
    True or False; kernels: True or False."""
    if compile is not ...:
        if compile not in (None, True, False):
            raise ValueError(f"compile must be None, True or False, got {compile!r}")
        _settings["compile"] = compile
    if kernels is not ...:
        if kernels not in (True, False):
            raise ValueError(f"kernels must be True or False, got {kernels!r}")
        _settings["kernels"] = kernels


@contextlib.contextmanager
def fast_paths(*, compile: bool | None = ..., kernels: bool = ...):
    """`configure` for the duration of a with block."""
    saved = dict(_settings)
    configure(compile=compile, kernels=kernels)
    try:
        yield
    finally:
        _settings.update(saved)


def compile_enabled(device: torch.device) -> bool:
    """Whether the code that runs on `device` is compiled."""
    setting = _settings["compile"]
    if setting is None:
        setting = _env_compile()
    if setting is None:
        return device.type == "cuda"
    return setting


def kernels_enabled(device: torch.device) -> bool:
    """Whether tttlm's own GPU paths run for tensors on `device` (CUDA only)."""
    return device.type in KERNEL_DEVICES and _settings["kernels"]


def compiled(fn):
    """fn compiled once for all its callers (a function, or a method taken from its class so that every
    instance shares the code). Shapes are dynamic from the first call, so that a new batch shape reuses it."""
    return _compiled(fn, BACKEND)


# Compiled code per code object: one block forward serves every mixer kind, each in plain and packed batches,
# training and evaluation; dynamo's default of 8 versions per code object would send the rest back to eager
RECOMPILE_LIMIT = 64


@functools.cache
def _compiled(fn, backend: str):
    import torch._dynamo

    config = torch._dynamo.config
    config.cache_size_limit = max(config.cache_size_limit, RECOMPILE_LIMIT)
    return torch.compile(fn, backend=backend, dynamic=True)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on `device`; a CPU tensor goes to a GPU through pinned memory, without the host waiting for the GPU."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def opaque(fn):
    """fn run as plain PyTorch inside a compiled caller (an op with its own kernels, or host logic): the
    compiled code stops before it and resumes after it."""
    return torch.compiler.disable(fn, recursive=True)
