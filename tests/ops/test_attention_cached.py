"""Attention over a static key/value cache with a valid prefix per row, against its float64 spec.

The Triton kernels run on CUDA in bf16 and on CPU under TRITON_INTERPRET=1 (tests/conftest.py) in float32.
Slots past each row's valid prefix hold NaN: a kernel that reads one fails.
"""

import pytest
import torch

from tttlm.ops.attention import attention_ref
from tttlm.ops.attention_cached import cached_attention, cached_attention_ref
from tttlm.ops.compare import rel_rmse

F64 = torch.float64
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
TOL = 1e-2 if CUDA else 1e-5  # relative RMSE


def make_cache(B, S, H, D, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(B, S, H, D, generator=g, dtype=F64) for _ in range(2))
    for b, n in enumerate(lengths):
        k[b, n:] = float("nan")
        v[b, n:] = float("nan")
    return k, v


@pytest.mark.parametrize("B, S, H, D, lengths", [
    (3, 300, 2, 16, [1, 129, 300]),   # a row of one key; splits half full and all full
    (2, 70, 3, 24, [64, 65]),         # head dim not a power of two; a block boundary
])
def test_triton_one_query_equals_spec(B, S, H, D, lengths):
    k, v = make_cache(B, S, H, D, lengths)
    q = torch.randn(B, 1, H, D, generator=torch.Generator().manual_seed(1), dtype=F64)
    pos = torch.tensor(lengths)[:, None] - 1
    q, k, v = (t.to(DTYPE).to(F64) for t in (q, k, v))
    ref = cached_attention_ref(q, k.nan_to_num(), v.nan_to_num(), pos)
    out = cached_attention(q.to(DEV, DTYPE), k.to(DEV, DTYPE), v.to(DEV, DTYPE), pos.to(DEV), backend="triton")
    assert out.dtype == DTYPE and out.shape == (B, 1, H, D)
    assert rel_rmse(out, ref) <= TOL


def test_torch_path_equals_spec_and_causal_attention():
    """Several queries per row (the masked SDPA path) equal the spec; a full row equals plain causal attention."""
    B, S, H, D = 2, 20, 2, 8
    k, v = make_cache(B, S, H, D, [20, 20])
    q = torch.randn(B, S, H, D, generator=torch.Generator().manual_seed(2), dtype=F64)
    pos = torch.arange(S).expand(B, S)
    out = cached_attention(q, k, v, pos, backend="torch")
    assert (out - attention_ref(q, k, v)).abs().max().item() <= 1e-12
    pos2 = torch.tensor([[3, 4], [10, 11]])
    out2 = cached_attention(q[:, :2], k, v, pos2, backend="torch")
    assert (out2 - cached_attention_ref(q[:, :2], k, v, pos2)).abs().max().item() <= 1e-12


def test_bad_inputs_raise():
    q = torch.zeros(2, 1, 2, 8)
    kv = torch.zeros(2, 5, 2, 8)
    with pytest.raises(ValueError, match="pos"):
        cached_attention(q, kv, kv, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="k_cache"):
        cached_attention(q, kv[:1], kv, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="T == 1"):
        cached_attention(torch.zeros(2, 2, 2, 8), kv, kv, torch.zeros(2, 2, dtype=torch.long), backend="triton")
