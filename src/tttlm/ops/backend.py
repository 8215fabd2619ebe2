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
from collections.abc import Callable

from torch import Tensor

from tttlm.fast import kernels_enabled

BACKENDS = (None, "triton", "torch")


@functools.cache
def have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernel_device(t: Tensor) -> bool:
    """Whether Triton kernels can run on t's device: CUDA, or the CPU under TRITON_INTERPRET=1 (the tests)."""
    return t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def use_triton(x: Tensor, backend: str | None, supports: Callable[[], bool], unsupported: Callable[[], str]) -> bool:
    """Whether an op runs its Triton kernels on inputs whose device is x's.

    supports() says whether the kernels take the inputs (it may import the kernels' module: it is called only
    when the triton package is there); unsupported() is the message of the error for backend="triton" when they
    do not.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend is None and not kernels_enabled(x.device)):
        return False
    if not have_triton():
        if backend == "triton":
            raise ValueError("backend='triton' needs the triton package")
        return False
    ok = supports()
    if backend == "triton" and not ok:
        raise ValueError(unsupported())
    return ok
