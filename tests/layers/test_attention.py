"""SDPA attention against an explicit masked softmax."""

import itertools

import pytest
import torch

from tttlm.ops.attention import attention, attention_ref


def _qkv(B, T, S, H=3, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    return q, k, v


def _naive(q, k, v, offset):
    """Softmax attention written out per query, float64."""
    out = torch.empty_like(q)
    for i in range(q.shape[1]):
        s = torch.einsum("bhd,bshd->bhs", q[:, i], k[:, : offset + i + 1]) / q.shape[-1] ** 0.5
        out[:, i] = torch.einsum("bhs,bshd->bhd", s.softmax(-1), v[:, : offset + i + 1])
    return out


@pytest.mark.parametrize("T,S", [(9, 9), (1, 7), (4, 11)])
def test_causal_with_and_without_cached_keys(T, S):
    q, k, v = _qkv(2, T, S)
    want = _naive(q, k, v, S - T)
    torch.testing.assert_close(attention_ref(q, k, v), want)
    torch.testing.assert_close(attention(q.float(), k.float(), v.float()).double(), want, rtol=1e-5, atol=1e-5)


def test_packed_documents_are_block_diagonal():
    q, k, v = _qkv(1, 20, 20)
    cu = torch.tensor([0, 6, 7, 20])
    got = attention(q.float(), k.float(), v.float(), cu_seqlens=cu).double()
    torch.testing.assert_close(attention_ref(q, k, v, cu_seqlens=cu), got, rtol=1e-5, atol=1e-5)
    for a, b in itertools.pairwise(cu.tolist()):
        torch.testing.assert_close(got[:, a:b], _naive(q[:, a:b], k[:, a:b], v[:, a:b], 0), rtol=1e-5, atol=1e-5)


def test_bad_shapes_raise():
    q, k, v = _qkv(1, 5, 4)
    with pytest.raises(ValueError, match="k must have shape"):
        attention(q, k, v)
