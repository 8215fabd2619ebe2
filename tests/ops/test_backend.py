"""The one rule by which every op picks its Triton kernels or its PyTorch path (`tttlm.ops.backend`)."""

import importlib

import pytest
import torch

from tttlm import fast
from tttlm.ops import backend
from tttlm.ops.backend import use_triton

X = torch.zeros(2)


def _never():
    raise AssertionError("supports() must not be asked")


def test_default_follows_the_kernels_switch(monkeypatch):
    assert not use_triton(X, None, _never, _never)  # a CPU tensor: tttlm's GPU kernels are for CUDA
    monkeypatch.setattr(fast, "KERNEL_DEVICES", ("cuda", "cpu"))
    assert use_triton(X, None, lambda: True, _never)
    assert not use_triton(X, None, lambda: False, _never)  # shapes the kernels do not take: PyTorch, no error
    with fast.fast_paths(kernels=False):
        assert not use_triton(X, None, _never, _never)
        assert use_triton(X, "triton", lambda: True, _never)  # a forced backend is taken whatever the switch


def test_forced_backends():
    assert not use_triton(X, "torch", _never, _never)
    with pytest.raises(ValueError, match="the kernels cannot"):
        use_triton(X, "triton", lambda: False, lambda: "the kernels cannot")
    with pytest.raises(ValueError, match="backend must be one of"):
        use_triton(X, "cuda", _never, _never)


def test_without_triton(monkeypatch):
    monkeypatch.setattr(backend, "have_triton", lambda: False)
    monkeypatch.setattr(fast, "KERNEL_DEVICES", ("cuda", "cpu"))
    assert not use_triton(X, None, _never, _never)
    with pytest.raises(ValueError, match="needs the triton package"):
        use_triton(X, "triton", _never, _never)


@pytest.mark.parametrize("op", ["ttt_linear", "ttt_mlp", "mesa", "selective_scan", "ssd", "cached_attention"])
def test_every_op_follows_the_rule(op, monkeypatch):
    """Each op hands its choice to `backend.use_triton` (a spy sees the call and turns the kernels down)."""
    from tttlm.ops import attention_cached, ttt_common
    from tttlm.ops.state import TTTLinearState, TTTMLPState

    mesa, selective_scan, ssd = (importlib.import_module(f"tttlm.ops.{m}") for m in ("mesa", "selective_scan", "ssd"))

    seen = []

    def spy(x, backend_, supports, unsupported):
        seen.append(backend_)
        return False

    for module in (attention_cached, mesa, selective_scan, ssd):
        monkeypatch.setattr(module, "use_triton", spy)
    monkeypatch.setattr(ttt_common, "backend_choice", spy)
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
    assert seen == ["torch"]
