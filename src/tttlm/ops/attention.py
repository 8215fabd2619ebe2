"""Causal softmax attention for the Transformer++ baseline, through torch's scaled_dot_product_attention.

`attention` is the fast path (SDPA picks FlashAttention / memory-efficient kernels where it can);
`attention_ref` is the readable spec it is tested against.

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

_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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
        if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
            raise ValueError(f"cu_seqlens must be an int64 [N+1] tensor from 0 to T = {T}")


def attention(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None = None) -> Tensor:
    """Causal attention of T queries over S >= T keys, the last T of which are the queries' own tokens.

    Args:
        q: [B, T, H, D]; k: [B, S, H, D]; v: [B, S, H, Dv]. The first S - T keys come from a cache (earlier
            tokens, visible to every query); query i sees keys j <= S - T + i. Scale 1/sqrt(D).
        cu_seqlens: int64 [N+1], documents packed in one row (B == 1, S == T): attention stays inside each.

    Returns:
        o: [B, T, H, Dv] in q's dtype.
    """
    _check(q, k, v, cu_seqlens)
    T, S = q.shape[1], k.shape[1]
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, *, D]
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
