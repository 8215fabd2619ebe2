"""Transformer++ attention (the TTT paper's Transformer baseline, Llama-style): q/k/v/o projections without
biases, RoPE on q and k, causal softmax attention through torch SDPA, a KV cache for decoding (growing, or
static: preallocated, written at each row's position)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from tttlm.fast import opaque
from tttlm.layers.common import Linear, SeqInfo, check_heads, rope, rope_tables
from tttlm.ops.attention import attention
from tttlm.ops.attention_cached import cached_attention

_cached_attention_op = opaque(cached_attention)  # its kernels run outside the compiled decode step around it


class AttentionMixer(nn.Module):
    """Multi-head causal self-attention. x [B, T, C] -> [B, T, C].

    Decoding cache (`cache.state`): (k, v), each [B, S, H, D], the RoPE-rotated keys and the values so far (after
    a packed prefill, one row per document, zeros after its end). On a static cache (`cache.static`) they are
    buffers of a fixed capacity S: each token's key and value are written at its position, and a query attends
    to its row's keys up to its own position.
    """

    def __init__(self, config):
        super().__init__()
        C = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = check_heads(C, self.num_heads)
        self.rope_theta = config.rope_theta
        self.q_proj = Linear(C, C, bias=False)
        self.k_proj = Linear(C, C, bias=False)
        self.v_proj = Linear(C, C, bias=False)
        self.o_proj = Linear(C, C, bias=False)

    def rope_tables(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE's cos and sin tables of positions pos [B, T]."""
        return rope_tables(pos, self.head_dim, self.rope_theta)

    def forward(self, x: Tensor, info: SeqInfo, cache=None) -> Tensor:
        B, T, C = x.shape
        shape = (B, T, self.num_heads, self.head_dim)
        tables = info.rope if info.rope is not None else self.rope_tables(info.pos)
        q = rope(self.q_proj(x).view(shape), tables)
        k = rope(self.k_proj(x).view(shape), tables)
        v = self.v_proj(x).view(shape)
        if cache is not None and cache.static:
            k_buf, v_buf = cache.state
            rows = torch.arange(B, device=x.device)[:, None].expand(B, T)
            k_buf.index_put_((rows, info.pos), k.to(k_buf.dtype))
            v_buf.index_put_((rows, info.pos), v.to(v_buf.dtype))
            o = _cached_attention_op(q, k_buf, v_buf, info.pos)
            return self.o_proj(o.reshape(B, T, C))
        if cache is not None and info.cu_seqlens is not None:
            cache.state = (info.rows(k), info.rows(v))
        elif cache is not None:
            if cache.state is not None:
                k = torch.cat([cache.state[0], k], dim=1)
                v = torch.cat([cache.state[1], v], dim=1)
            cache.state = (k, v)
        o = attention(q, k, v, cu_seqlens=info.cu_seqlens, mask=info.attn_mask)
        return self.o_proj(o.reshape(B, T, C))
