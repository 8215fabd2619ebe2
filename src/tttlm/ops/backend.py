"""The choice between an op's Triton kernels and its PyTorch path: one rule for every op that has both.

An op's `backend` argument is None (the default), "triton" or "torch":
    None      the kernels where `tttlm.fast` allows tttlm's GPU kernels for the inputs' device (CUDA tensors
              unless turned off there) and the op's `supports(...)` takes the inputs; else PyTorch.
    "triton"  the kernels, or a ValueError saying what they cannot take.
    "torch"   PyTorch.
"""

from __future__ import annotations

import functools
import importlib.util
import os

from torch import Tensor

from tttlm.fast import kernels_enabled

BACKENDS = (None, "triton", "torch")


@functools.cache
def have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernel_device(t: Tensor) -> bool:
    """Whether Triton kernels can run on t's device: CUDA, or the CPU under TRITON_INTERPRET=1 (the tests)."""
    return t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def use_triton(backend: str | None, kernels: str, **inputs) -> bool:
    """Whether an op runs its Triton kernels on `inputs`, given by name; the first is a tensor, whose device
    counts.

    `kernels` names the module of the op's kernels. Its `supports(**inputs)` says whether they take the inputs;
    its LIMITS says what they take, for the error of backend="triton" when they do not. It is imported only when
    the triton package is there and the kernels are not ruled out already.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    x = next(iter(inputs.values()))
    if backend == "torch" or (backend is None and not kernels_enabled(x.device)):
        return False
    if not have_triton():
        if backend == "triton":
            raise ValueError("backend='triton' needs the triton package")
        return False
    module = importlib.import_module(kernels)
    ok = module.supports(**inputs)
    if backend == "triton" and not ok:
        raise ValueError(f"backend='triton': the Triton kernels do not support {_described(inputs)}; they take "
                         f"{module.LIMITS}")
    return ok


def _described(inputs: dict) -> str:
    """The inputs as an error message names them: tensors by shape, dtype and device, the rest by value."""
    return ", ".join(f"{name} {list(v.shape)} ({v.dtype}) on {v.device}" if isinstance(v, Tensor) else f"{name}={v!r}"
                     for name, v in inputs.items() if v is not None)
