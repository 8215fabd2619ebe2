"""The one rule by which every op picks its Triton kernels or its PyTorch path (`tttlm.ops.backend`)."""

import importlib.util
import sys
import types

import pytest
import torch

from tttlm import fast
from tttlm.ops import backend
from tttlm.ops.backend import use_triton

X = torch.zeros(2)


@pytest.fixture
def kernels(monkeypatch):
    """A kernels module, "fake_kernels", whose supports(x, size) answers `answer[0]` (None: must not be asked)."""
    module = types.ModuleType("fake_kernels")
    module.LIMITS = "sizes up to 4"
    module.answer = [None]

    def supports(x, size):
        assert module.answer[0] is not None, "supports() must not be asked"
        return module.answer[0]

    module.supports = supports
    monkeypatch.setitem(sys.modules, "fake_kernels", module)
    return module


def test_default_follows_the_kernels_switch(monkeypatch, kernels):
    assert not use_triton(None, "fake_kernels", x=X, size=2)  # a CPU tensor: tttlm's GPU kernels are for CUDA
    monkeypatch.setattr(fast, "KERNEL_DEVICES", ("cuda", "cpu"))
    kernels.answer[0] = True
    assert use_triton(None, "fake_kernels", x=X, size=2)
    kernels.answer[0] = False
    assert not use_triton(None, "fake_kernels", x=X, size=8)  # inputs the kernels do not take: PyTorch, no error
    with fast.fast_paths(kernels=False):
        kernels.answer[0] = None
        assert not use_triton(None, "fake_kernels", x=X, size=2)
        kernels.answer[0] = True
        assert use_triton("triton", "fake_kernels", x=X, size=2)  # a forced backend is taken whatever the switch


def test_forced_backends(kernels):
    assert not use_triton("torch", "fake_kernels", x=X, size=2)
    kernels.answer[0] = False
    message = r"do not support x \[2\] \(torch.float32\) on cpu, size=8; they take sizes up to 4"
    with pytest.raises(ValueError, match=message):
        use_triton("triton", "fake_kernels", x=X, size=8)
    with pytest.raises(ValueError, match="backend must be one of"):
        use_triton("cuda", "fake_kernels", x=X, size=2)


def test_without_triton(monkeypatch, kernels):
    monkeypatch.setattr(backend, "have_triton", lambda: False)
    monkeypatch.setattr(fast, "KERNEL_DEVICES", ("cuda", "cpu"))
    assert not use_triton(None, "fake_kernels", x=X, size=2)
    with pytest.raises(ValueError, match="needs the triton package"):
        use_triton("triton", "fake_kernels", x=X, size=2)


@pytest.mark.parametrize("kernels_module", ["tttlm.ops.ttt_linear.triton_chunk", "tttlm.ops.ttt_mlp.triton_parts",
                                            "tttlm.ops.mesa.triton_chunk", "tttlm.ops.selective_scan.triton_scan",
                                            "tttlm.ops.ssd.triton_ssd", "tttlm.ops.attention_cached_triton"])
def test_every_kernels_module_says_what_it_takes(kernels_module):
    module = importlib.import_module(kernels_module)
    assert callable(module.supports) and "TRITON_INTERPRET" in module.LIMITS


@pytest.mark.parametrize("op", ["ttt_linear", "ttt_mlp", "mesa", "selective_scan", "ssd", "cached_attention"])
def test_every_op_follows_the_rule(op, monkeypatch):
    """Each op hands its choice to `backend.use_triton` (a spy sees the call and turns the kernels down)."""
    from tttlm.ops import attention_cached
    from tttlm.ops.state import TTTLinearState, TTTMLPState

    mesa, selective_scan, ssd = (importlib.import_module(f"tttlm.ops.{m}") for m in ("mesa", "selective_scan", "ssd"))

    seen = []

    def spy(backend_, kernels_, **inputs):
        seen.append((backend_, kernels_))
        return False

    modules = [attention_cached, mesa, selective_scan, ssd]
    modules += [importlib.import_module(f"tttlm.ops.{m}") for m in ("ttt_linear", "ttt_mlp")]
    for module in modules:
        monkeypatch.setattr(module, "use_triton", spy)
    B, T, H, D = 1, 4, 2, 8
    x = torch.randn(B, T, H, D)
    eta = torch.rand(B, T, H)
    ln = torch.ones(H, D)
    if op == "ttt_linear":
        from tttlm.ops import ttt_linear

        state = TTTLinearState.start(torch.zeros(B, H, D, D), torch.zeros(B, H, D))
        ttt_linear(x, x, x, eta, ln, ln, state, mini_batch_size=4, backend="torch")
    elif op == "ttt_mlp":
        from tttlm.ops import ttt_mlp

        state = TTTMLPState.start(torch.zeros(B, H, D, 4 * D), torch.zeros(B, H, 4 * D),
                                  torch.zeros(B, H, 4 * D, D), torch.zeros(B, H, D))
        ttt_mlp(x, x, x, eta, ln, ln, state, mini_batch_size=4, backend="torch")
    elif op == "mesa":
        mesa.mesa(x, x, x, -eta, eta, torch.ones(H, D), backend="torch", chunk_size=4)
    elif op == "selective_scan":
        u = torch.randn(B, T, D)
        selective_scan.selective_scan(u, u.abs(), -torch.ones(D, 4), torch.randn(B, T, 4), torch.randn(B, T, 4),
                                      backend="torch")
    elif op == "ssd":
        ssd.ssd(x, eta, -torch.ones(H), torch.randn(B, T, 1, 4), torch.randn(B, T, 1, 4), chunk_size=4,
                backend="torch")
    else:
        attention_cached.cached_attention(x[:, :1], x, x, torch.zeros(B, 1, dtype=torch.long), backend="torch")
    assert [b for b, _ in seen] == ["torch"] and importlib.util.find_spec(seen[0][1])
