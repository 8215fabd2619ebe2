"""The fused linear + cross-entropy loss against its float64 spec: losses, their sum and both gradients.

On CUDA in bf16 at the 125m presets' sizes (under autocast, as the model calls it); on CPU under
TRITON_INTERPRET=1 (tests/conftest.py) in float32 at small sizes, with chunks of a few rows.
"""

import pytest
import torch

from tttlm.ops.compare import rel_rmse
from tttlm.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref, triton_ce

F64 = torch.float64
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
TOL = 1e-2 if CUDA else 1e-5  # relative RMSE of the gradients (bf16 logits and products on the GPU)


def make_case(M, C, V, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, C, generator=g, dtype=F64)
    w = torch.randn(V, C, generator=g, dtype=F64) / C**0.25
    t = torch.randint(0, V, (M,), generator=g)
    t[torch.randperm(M, generator=g)[: M // 5]] = -100
    t[0] = V - 1  # the last logit of a row, past every full block
    return h, w, t


SHAPES = [(4096, 768, 32000)] if CUDA else [(37, 8, 50), (5, 16, 300)]


@pytest.mark.parametrize("M, C, V", SHAPES)
def test_sum_and_gradients_match_the_spec(M, C, V, monkeypatch):
    monkeypatch.setattr(triton_ce, "CHUNK_BYTES", (M // 3 + 1) * V * 4)  # three chunks
    monkeypatch.setattr(triton_ce, "MAX_BLOCK", 4096 if CUDA else 32)  # several blocks per row
    h, w, t = make_case(M, C, V, seed=M)
    # the hidden states and the weight as the model holds them (float32) and the kernels read them (DTYPE)
    hd, wd = (x.to(DTYPE).to(F64) for x in (h, w))
    ref_h, ref_w = (x.to(DEV, copy=True).requires_grad_() for x in (hd, wd))  # float64, on the GPU there
    ref = linear_cross_entropy_ref(ref_h, ref_w, t.to(DEV))
    ref.backward()
    dev_h, dev_w = (x.to(DEV, torch.float32, copy=True).requires_grad_() for x in (hd, wd))
    with torch.autocast(DEV, dtype=DTYPE, enabled=CUDA):
        loss = linear_cross_entropy(dev_h, dev_w, t.to(DEV))
    assert loss.dtype == torch.float32 and loss.shape == ()
    (2.5 * loss).backward()  # the backward scales the gradients it computed ahead
    assert rel_rmse(loss, ref) < TOL / 10
    assert rel_rmse(dev_h.grad, 2.5 * ref_h.grad) < TOL
    assert rel_rmse(dev_w.grad, 2.5 * ref_w.grad) < TOL
    assert dev_h.grad.dtype == dev_w.grad.dtype == torch.float32
    assert dev_h.grad[t.to(DEV) == -100].eq(0).all()


def test_losses_without_gradients():
    h, w, t = make_case(37, 8, 50, seed=3)
    with torch.no_grad():
        per_token = linear_cross_entropy(h.to(DEV, DTYPE), w.to(DEV, DTYPE), t.to(DEV), reduction="none")
    ref = linear_cross_entropy_ref(h.to(DTYPE).to(F64), w.to(DTYPE).to(F64), t, reduction="none")
    assert per_token.dtype == torch.float32 and per_token.shape == (37,)
    assert rel_rmse(per_token, ref) < TOL / 10
    assert per_token.cpu()[t == -100].eq(0).all()
    with pytest.raises(ValueError, match="no gradients"):
        linear_cross_entropy(h.to(DEV, DTYPE).requires_grad_(), w.to(DEV, DTYPE), t.to(DEV), reduction="none")


def test_bad_inputs_raise():
    h, w, t = make_case(6, 4, 10, seed=0)
    with pytest.raises(ValueError, match="weight must have shape"):
        linear_cross_entropy(h, w[:, :3], t)
    with pytest.raises(ValueError, match="targets must be"):
        linear_cross_entropy(h, w, t[:5])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="mean")
