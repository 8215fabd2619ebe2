"""SDPA and FlexAttention against an explicit masked softmax; the document mask's tiles."""

import itertools

import pytest
import torch

from tttlm.ops import attention as attention_module
from tttlm.ops.attention import attention, attention_ref, document_mask, flex_document_mask

CUDA = torch.cuda.is_available()


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


@pytest.mark.parametrize("lengths, block", [([3, 20, 5, 9, 30, 1, 13], 8), ([16, 16, 8, 24], 8), ([300], 128)])
def test_document_mask_tiles(lengths, block, monkeypatch):
    """Tiles of queries x keys: skipped exactly where no pair may attend, computed unmasked only where every
    pair may (so FlexAttention's result does not depend on them), masked by document and position elsewhere."""
    monkeypatch.setattr(attention_module, "FLEX_BLOCK", block)
    cu = torch.tensor([0, *itertools.accumulate(lengths)])
    T = int(cu[-1])
    mask = flex_document_mask(cu, torch.device("cpu"))
    doc = torch.searchsorted(cu[1:], torch.arange(T), right=True)
    t = torch.arange(T)
    allowed = (doc[:, None] == doc[None, :]) & (t[:, None] >= t[None, :])
    nb = -(-T // block)
    pad = torch.zeros(nb * block, nb * block, dtype=torch.bool)
    pad[:T, :T] = allowed
    tiles = pad.view(nb, block, nb, block)
    want_any = tiles.any(dim=(1, 3))
    want_full = tiles.all(dim=(1, 3))  # a tile cut by T is never all allowed: its pairs past T are not
    kv = mask.to_dense()[0, 0].bool()  # partial and full tiles
    assert torch.equal(kv, want_any)
    full = torch.zeros(nb, nb, dtype=torch.bool)
    for i in range(nb):
        full[i, mask.full_kv_indices[0, 0, i, : mask.full_kv_num_blocks[0, 0, i]].long()] = True
    assert not (full & ~want_full).any(), "a tile computed without the mask holds pairs that may not attend"
    if len(lengths) > 1 and block < 128:
        assert full.any(), "no tile is computed unmasked: the test checks nothing of them"
    # the masked tiles' rule: same document, causal
    assert bool(mask.mask_mod(0, 0, torch.tensor(5), torch.tensor(3))) == bool(allowed[5, 3])
    assert bool(mask.mask_mod(0, 0, torch.tensor(3), torch.tensor(2))) == bool(allowed[3, 2])


def test_document_mask_only_on_cuda_with_kernels():
    from tttlm.fast import fast_paths

    cu = torch.tensor([0, 6, 7, 20])
    assert document_mask(cu, "cpu") is None
    if CUDA:
        assert document_mask(cu, "cuda") is not None
        with fast_paths(kernels=False):
            assert document_mask(cu, "cuda") is None


def test_flex_attention_runs_compiled():
    """The opaque FlexAttention call runs its compiled kernel (torch.compiler.disable of a compiled function
    would run FlexAttention's unfused fallback, which holds the [T, T] scores), here on the CPU."""
    import warnings

    q, k, v = (x.float().transpose(1, 2) for x in _qkv(1, 256, 256, H=2, D=16))
    cu = torch.tensor([0, 100, 101, 256])
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        got = attention_module._flex(q, k, v, flex_document_mask(cu, torch.device("cpu")))
    assert not [w for w in caught if "without torch.compile" in str(w.message)]
    want = attention_ref(*(x.double().transpose(1, 2) for x in (q, k, v)), cu_seqlens=cu).transpose(1, 2)
    assert (got.double() - want).abs().max().item() < 1e-5


def test_packed_float64_with_document_mask(monkeypatch):
    """A float64 packed row given FlexAttention's document mask (as a model on CUDA passes it) is attended in float64:
    FlexAttention's compiled kernels have no float64 (on CUDA they accumulate in float32 and fail to compile, on
    the CPU they refuse it), which failed generate(use_cache=False) on left-padded prompts in float64 on CUDA."""
    from tttlm import fast

    monkeypatch.setattr(fast, "KERNEL_DEVICES", ("cuda", "cpu"))
    dev = "cuda" if CUDA else "cpu"
    cu = torch.tensor([0, 6, 7, 20])
    q, k, v = (x.to(dev) for x in _qkv(1, 20, 20))
    mask = document_mask(cu, dev)
    assert mask is not None
    got = attention(q, k, v, cu_seqlens=cu.to(dev), mask=mask)
    assert got.dtype == torch.float64
    assert (got - attention_ref(q, k, v, cu_seqlens=cu.to(dev))).abs().max().item() < 1e-12


@pytest.mark.skipif(not CUDA, reason="FlexAttention's compiled kernels need CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# a row shorter than FLEX_BLOCK (left-padded prompts read without a cache) runs FlexAttention's decoding kernel
@pytest.mark.parametrize("lengths", [[1, 300, 129, 2, 511, 77], [9, 9, 9, 4, 4, 4]])
def test_flex_attention_over_documents(dtype, lengths):
    cu = torch.tensor([0, *itertools.accumulate(lengths)])
    T = int(cu[-1])
    q, k, v = (x.to("cuda", dtype).requires_grad_() for x in _qkv(1, T, T, H=4, D=64))
    want = attention_ref(*(x.detach().double() for x in (q, k, v)), cu_seqlens=cu.cuda())
    got = attention(q, k, v, cu_seqlens=cu.cuda(), mask=document_mask(cu, "cuda"))
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    assert (got.double() - want).abs().max().item() < tol
    w = torch.randn_like(want)
    (got.double() * w).sum().backward()
    refs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    (attention_ref(*refs, cu_seqlens=cu.cuda()) * w).sum().backward()
    for x, r in zip((q, k, v), refs, strict=True):
        err = (x.grad.double() - r.grad).norm() / r.grad.norm()
        assert err.item() < tol
