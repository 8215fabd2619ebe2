"""Causal softmax attention for the Transformer++ baseline.

`attention` is the fast path: torch's scaled_dot_product_attention for whole rows (its default backend, cuDNN
on Hopper, where shapes are fixed), and for the documents of a packed row one FlexAttention call per batch with
a document mask built once per batch by `document_mask` (CUDA), or one SDPA call per document elsewhere and in
float64 (FlexAttention's compiled kernels have none: on CUDA they accumulate in float32 and fail to compile for
float64 operands, on the CPU they refuse them). `attention_ref` is the readable spec it is tested against.

Calls whose shapes change from call to call (decoding with a growing cache, documents of a packed batch)
leave out SDPA's cuDNN backend: it builds an execution plan for every new shape, ~9 ms of host time on an
H100 with torch 2.11, which made each decoded token cost ~50 ms (docs/benchmarks.md).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from tttlm.fast import kernels_enabled, opaque, to_device

_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
FLEX_BLOCK = 128  # FlexAttention's tile of queries and keys
FLEX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what its compiled kernels take


def _check(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must have shape [B, T, H, D], got {list(q.shape)}")
    B, T, H, D = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[2:] != (H, D) or k.shape[1] < T:
        raise ValueError(f"k must have shape [B={B}, S>=T={T}, H={H}, D={D}], got {list(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must have shape [B, S, H, Dv] with k's B, S, H = {list(k.shape[:3])}, got {list(v.shape)}")
    if cu_seqlens is not None:
        if B != 1 or k.shape[1] != T:
            raise ValueError("with cu_seqlens, q, k, v must be one packed row (B == 1) with no cached keys (S == T)")
        if cu_seqlens.dim() != 1:
            raise ValueError(f"cu_seqlens must be an int64 [N+1] tensor from 0 to T = {T}")
        # its values are checked where reading them makes the host wait for nobody
        if not cu_seqlens.is_cuda and (int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T):
            raise ValueError(f"cu_seqlens must be an int64 [N+1] tensor from 0 to T = {T}")


def document_mask(cu_seqlens: Tensor, device: torch.device | str):
    """FlexAttention's block mask of causal attention inside the documents of one packed row, for the keys and
    queries of cu_seqlens [N+1] (int64, on any device: on the CPU it is built without waiting for the GPU) on
    `device`; None where `attention` runs per document instead (not CUDA, or tttlm's kernels off).

    Built once per batch and shared by every layer. Tiles of FLEX_BLOCK queries x keys are skipped where no pair
    may attend, computed without a mask where every pair may (both in one document, keys before the queries'
    tile), and masked by document and position elsewhere.
    """
    device = torch.device(device)
    return flex_document_mask(cu_seqlens, device) if kernels_enabled(device) else None


def flex_document_mask(cu_seqlens: Tensor, device: torch.device):
    """`document_mask` on any device (FlexAttention's compiled kernels need CUDA; its eager form runs anywhere)."""

    cu = cu_seqlens.long()
    T = int(cu[-1])
    doc = torch.searchsorted(cu[1:], torch.arange(T, device=cu.device), right=True)  # [T]
    nb = -(-T // FLEX_BLOCK)
    first = torch.arange(nb, device=cu.device) * FLEX_BLOCK
    last = (first + FLEX_BLOCK - 1).clamp_max(T - 1)
    lo = cu[doc[first]] // FLEX_BLOCK  # the first key tile that a query of tile i may see
    i, j = torch.arange(nb, device=cu.device)[:, None], torch.arange(nb, device=cu.device)[None, :]
    visible = (j >= lo[:, None]) & (j <= i)
    whole = (doc[first] == doc[last]) & (last - first == FLEX_BLOCK - 1)  # a tile of one document, not cut by T
    full = (j < i) & whole[:, None] & whole[None, :] & (doc[first][:, None] == doc[first][None, :])
    partial = visible & ~full

    def indices(m: Tensor) -> tuple[Tensor, Tensor]:
        order = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True)  # tiles in order, first
        counts = m.sum(-1, dtype=torch.int32)[None, None]
        return to_device(counts, device), to_device(order.to(torch.int32)[None, None].contiguous(), device)

    doc_on = to_device(doc.to(torch.int32), device)

    def same_document_causal(b, h, q_idx, kv_idx):
        return (doc_on[q_idx] == doc_on[kv_idx]) & (q_idx >= kv_idx)

    return BlockMask.from_kv_blocks(
        *indices(partial), *indices(full), BLOCK_SIZE=FLEX_BLOCK, mask_mod=same_document_causal, seq_lengths=(T, T)
    )


_flex_compiled = torch.compile(flex_attention, dynamic=False)


@opaque
def _flex(q: Tensor, k: Tensor, v: Tensor, mask) -> Tensor:
    """FlexAttention compiled on its own, for static shapes (a packed batch keeps its length from step to step),
    and opaque to the compiled code around it (whose shapes are dynamic). The compiled function is called from
    here, not made opaque itself: `torch.compiler.disable` of a compiled function runs it uncompiled."""
    return _flex_compiled(q, k, v, block_mask=mask)


def attention(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None = None, mask=None) -> Tensor:
    """Causal attention of T queries over S >= T keys, the last T of which are the queries' own tokens.

    Args:
        q: [B, T, H, D]; k: [B, S, H, D]; v: [B, S, H, Dv]. The first S - T keys come from a cache (earlier
            tokens, visible to every query); query i sees keys j <= S - T + i. Scale 1/sqrt(D).
        cu_seqlens: int64 [N+1], documents packed in one row (B == 1, S == T): attention stays inside each.
        mask: `document_mask(cu_seqlens, q.device)` when it is not None: one FlexAttention call for all the
            documents instead of one SDPA call each (float64 ignores it: one SDPA call per document).

    Returns:
        o: [B, T, H, Dv] in q's dtype.
    """
    _check(q, k, v, cu_seqlens)
    T, S = q.shape[1], k.shape[1]
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, *, D]
    if cu_seqlens is not None and mask is not None and q.dtype in FLEX_DTYPES:
        return _flex(qh, kh, vh, mask).transpose(1, 2)
    if cu_seqlens is not None:
        # one causal call per document keeps the flash kernels (no [T, T] mask) and nothing crosses a boundary
        bounds = cu_seqlens.tolist()
        with sdpa_kernel(_NO_CUDNN):
            outs = [
                F.scaled_dot_product_attention(qh[:, :, a:b], kh[:, :, a:b], vh[:, :, a:b], is_causal=True)
                for a, b in itertools.pairwise(bounds)
            ]
        return torch.cat(outs, dim=2).transpose(1, 2)
    if S == T:
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True).transpose(1, 2)
    with sdpa_kernel(_NO_CUDNN):
        if T == 1:
            o = F.scaled_dot_product_attention(qh, kh, vh)
        else:
            i = torch.arange(T, device=q.device)[:, None]
            j = torch.arange(S, device=q.device)[None, :]
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=j <= i + (S - T))
    return o.transpose(1, 2)


def attention_ref(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None = None) -> Tensor:
    """The spec of `attention` (same arguments): an explicit masked softmax, in q's dtype."""
    _check(q, k, v, cu_seqlens)
    T, S = q.shape[1], k.shape[1]
    i = torch.arange(T, device=q.device)[:, None] + (S - T)
    j = torch.arange(S, device=q.device)[None, :]
    mask = j <= i
    if cu_seqlens is not None:
        doc = torch.searchsorted(cu_seqlens[1:], torch.arange(T, device=q.device), right=True)
        mask = mask & (doc[:, None] == doc[None, :])
    scores = torch.einsum("bthd,bshd->bhts", q, k) / q.shape[-1] ** 0.5
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("bhts,bshd->bthd", p, v)
