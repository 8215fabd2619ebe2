"""Causal attention of new tokens over a static key/value cache whose rows hold prefixes of different lengths.

A decoding batch keeps every row's keys and values in preallocated buffers [B, S, H, D] (S: the capacity),
row b's first `pos + 1` slots valid. `cached_attention` is the op; `cached_attention_ref` the readable spec it
is tested against. On CUDA one query per row (decoding) runs the split-KV Triton kernels of
`attention_cached_triton` (the work follows each row's valid length, not the capacity, and never leaves the
GPU to learn it); other calls run SDPA with a boolean mask over the whole capacity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tttlm.ops.backend import use_triton

KERNELS = "tttlm.ops.attention_cached_triton"


def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must have shape [B, T, H, D], got {list(q.shape)}")
    B, T, H, D = q.shape
    if k_cache.dim() != 4 or k_cache.shape[0] != B or k_cache.shape[2:] != (H, D):
        raise ValueError(f"k_cache must have shape [B={B}, S, H={H}, D={D}], got {list(k_cache.shape)}")
    if v_cache.dim() != 4 or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"v_cache must have shape [B, S, H, Dv] with k_cache's B, S, H = "
                         f"{list(k_cache.shape[:3])}, got {list(v_cache.shape)}")
    if pos.shape != (B, T) or pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"pos must be an integer tensor [B={B}, T={T}], got {pos.dtype} {list(pos.shape)}")


def cached_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, *, backend: str | None = None) -> Tensor:
    """Attention of T new queries per row over a static cache that already holds their own keys.

    Args:
        q: [B, T, H, D] queries.
        k_cache: [B, S, H, D], v_cache: [B, S, H, Dv]: keys and values by position. Slots past a row's valid
            prefix do not change the result but must be finite for the PyTorch path (a masked NaN value still
            poisons its products); the Triton kernels never read them.
        pos: [B, T] int64, each query's position: query (b, t) attends to keys 0 .. pos[b, t] of row b.
            Every pos must lie in [0, S) (not checked: that would make the host wait for the GPU).
        backend: None picks the Triton kernels for one query per row on CUDA (while `tttlm.fast` allows them),
            else PyTorch; "triton" (T == 1 only; also under TRITON_INTERPRET=1 on CPU) or "torch" forces one.

    Returns:
        o: [B, T, H, Dv] in q's dtype. Scale 1/sqrt(D).
    """
    _check(q, k_cache, v_cache, pos)
    if use_triton(backend, KERNELS, q=q):
        from tttlm.ops.attention_cached_triton import cached_attention_triton

        return cached_attention_triton(q[:, 0], k_cache, v_cache, pos[:, 0])[:, None]
    S = k_cache.shape[1]
    mask = torch.arange(S, device=q.device) <= pos[..., None]  # [B, T, S]
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k_cache.to(q.dtype), v_cache.to(q.dtype)))
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask[:, None])
    return o.transpose(1, 2)


def cached_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor) -> Tensor:
    """The spec of `cached_attention` (same arguments): an explicit masked softmax in q's dtype."""
    _check(q, k_cache, v_cache, pos)
    S = k_cache.shape[1]
    mask = torch.arange(S, device=q.device) <= pos[..., None]  # [B, T, S]
    scores = torch.einsum("bthd,bshd->bhts", q, k_cache.to(q.dtype)) / q.shape[-1] ** 0.5
    p = torch.softmax(scores.masked_fill(~mask[:, None], float("-inf")), dim=-1)
    return torch.einsum("bhts,bshd->bthd", p, v_cache.to(q.dtype))
