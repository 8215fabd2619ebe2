"""Pieces shared by the mixers and blocks: where each token sits (`SeqInfo`), the linear layer, RMSNorm, RoPE,
SwiGLU, and the causal depthwise convolution with a decoding state and document resets.

Hidden states are [B, T, C]; per-head tensors [B, T, H, D]; a packed batch is one row (B == 1) holding the
documents given by `cu_seqlens` (int64 [N+1]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers import initialization as init

from tttlm.fast import to_device


@dataclass
class SeqInfo:
    """Where each token of a forward call sits.

    pos: [B, T] int64, the index of each token inside its own sequence (0 at a document start; a call that
        continues a cache starts at the number of tokens the cache has seen).
    cu_seqlens: int64 [N+1] document boundaries of a packed batch (B == 1), or None.
    attn_mask: the attention's document mask of a packed batch (`tttlm.ops.attention.document_mask`), built
        once per batch for every layer, or None.
    rope: the `rope_tables` of these positions as the model's mixers rotate them (their `rope_tables(pos)`),
        built once per batch for every layer by the model, or None (each mixer builds its own). Compiled, each
        block would otherwise compute the angles' cos and sin again for every head.
    """

    pos: Tensor
    cu_seqlens: Tensor | None = None
    attn_mask: object | None = None
    rope: tuple[Tensor, Tensor] | None = None

    @classmethod
    def contiguous(cls, batch: int, length: int, offset: int, device) -> SeqInfo:
        """B rows of one sequence each, continuing after `offset` tokens."""
        pos = torch.arange(offset, offset + length, device=device)
        return cls(pos.expand(batch, length), None)

    @classmethod
    def packed(cls, cu_seqlens: Tensor, device=None, attention: bool = False) -> SeqInfo:
        """One packed row with the documents of cu_seqlens [N+1], for tensors on `device` (default: cu_seqlens'
        own). cu_seqlens on the CPU gives everything without waiting for the GPU. attention: also build the
        attention's document mask."""
        device = cu_seqlens.device if device is None else torch.device(device)
        T = int(cu_seqlens[-1])
        t = torch.arange(T, device=cu_seqlens.device)
        doc = torch.searchsorted(cu_seqlens[1:], t, right=True)
        pos = (t - cu_seqlens[doc])[None]
        mask = None
        if attention:
            from tttlm.ops.attention import document_mask

            mask = document_mask(cu_seqlens, device)
        return cls(to_device(pos, device), to_device(cu_seqlens, device), mask)

    def rows(self, x: Tensor) -> Tensor:
        """The packed x [1, T, ...] laid out one document per row, [N, longest document, ...], zeros after each
        document's end (a packed prefill's keys and values, for decoding)."""
        cu = self.cu_seqlens
        longest = int((cu[1:] - cu[:-1]).max())
        doc = torch.searchsorted(cu[1:], torch.arange(x.shape[1], device=x.device), right=True)
        out = x.new_zeros(cu.numel() - 1, longest, *x.shape[2:])
        out[doc, self.pos[0]] = x[0]
        return out

    @property
    def num_sequences(self) -> int:
        """N: rows of the recurrent states (B, or the number of packed documents)."""
        return self.pos.shape[0] if self.cu_seqlens is None else self.cu_seqlens.numel() - 1


# Rows (tokens of a call) at most that a `Linear` computes as a reduction in compiled code without gradients
FEW_ROWS = 8


class Linear(nn.Linear):
    """nn.Linear (same parameters, same results up to rounding) that, inside compiled code without gradients and
    for at most FEW_ROWS rows (decoding), multiplies as an elementwise product summed over the input features:
    the compiler turns that into one reduction kernel that reads the weight once and takes in the ops around it
    (a norm before, an activation after). cuBLAS's kernels for one row read the weight at under a tenth of the
    memory bandwidth and run 4-5 us each (H200, bf16, 768 x 768), and with a long input dim launch a second
    kernel to add up a split sum; a decode step of a 125m model runs 7-9 of them per layer."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling() and not torch.is_grad_enabled() and x.numel() <= FEW_ROWS * x.shape[-1]:
            return few_rows_linear(x, self.weight, self.bias)
        return super().forward(x)


def few_rows_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear(x, weight, bias) as sum(x[..., None, :] * weight, -1), accumulated in float32 (float64 stays),
    in F.linear's output dtype (autocast's where it is on). x [..., K], weight [N, K], bias [N] or None."""
    if torch.is_autocast_enabled(x.device.type):
        out = torch.get_autocast_dtype(x.device.type)
    else:
        out = torch.promote_types(x.dtype, weight.dtype)
    acc = torch.promote_types(out, torch.float32)
    y = (x.to(acc).unsqueeze(-2) * weight.to(acc)).sum(-1)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(out)


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight over the last dim, computed in float32. x [..., C]."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    """The block MLP: down(silu(gate(x)) * up(x)), no biases. x [..., C]."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_tables(pos: Tensor, D: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin [B, T, 1, D/2] (float32) of the rotary angles pos * theta^(-2i/D) of positions pos [B, T]."""
    inv_freq = theta ** (-torch.arange(0, D, 2, device=pos.device, dtype=torch.float32) / D)  # [D/2]
    ang = pos.to(torch.float32)[..., None, None] * inv_freq
    return ang.cos(), ang.sin()


def rope(x: Tensor, tables: tuple[Tensor, Tensor]) -> Tensor:
    """Rotary position embedding (Su et al. 2021), rotating the two halves of the head dim: x [B, T, H, D] (D
    even) by the `rope_tables` of its positions, in float32."""
    cos, sin = tables
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class ShortConv(nn.Module):
    """Causal depthwise convolution over time, kernel width K: y_t = sum_k w[:, K-1-k] * x_{t-k} (+ bias).

    A token never reads across a document start: the term x_{t-k} counts only when pos_t >= k. A decoding
    state holds the K-1 previous inputs of each row ([B, K-1, C], zeros before the document's start), so a call
    that continues a sequence equals the whole sequence read at once; one token per row (decoding) reads the
    state without position masks, in a few kernels instead of 3K.
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = True):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"conv kernel_size must be >= 1, got {kernel_size}")
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def init_parameters(self, std: float) -> None:
        # nn.Conv1d's default: uniform with bound 1/sqrt(fan_in), fan_in = kernel width for a depthwise conv
        bound = 1.0 / math.sqrt(self.kernel_size)
        init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            init.uniform_(self.bias, -bound, bound)

    def forward(
        self, x: Tensor, pos: Tensor, state: Tensor | None = None, cu_seqlens: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """x [B, T, C], pos [B, T], state [B, K-1, C] or None (zeros). Returns y [B, T, C] and the new state;
        with cu_seqlens (x packed, B == 1) the state of each document, [N, K-1, C]."""
        B, T, C = x.shape
        K = self.kernel_size
        prev = x.new_zeros(B, K - 1, C) if state is None else state.to(x.dtype)
        xx = torch.cat([prev, x], dim=1)  # [B, T+K-1, C]
        if T == 1 and state is not None:
            y = (xx * self.weight.T).sum(1, keepdim=True)
            return (y if self.bias is None else y + self.bias).to(x.dtype), xx[:, 1:]
        y = x * self.weight[:, K - 1]
        # keep[..., k-1]: x_{t-k} lies in token t's document; computed once, multiplied in (fewer kernels)
        keep = (pos[..., None] >= torch.arange(1, K, device=pos.device)).to(x.dtype)  # [B, T, K-1]
        for k in range(1, K):
            y = y + xx[:, K - 1 - k : K - 1 - k + T] * self.weight[:, K - 1 - k] * keep[..., k - 1, None]
        if self.bias is not None:
            y = y + self.bias
        y = y.to(x.dtype)  # float32 weights must not promote x (autocast leaves mul alone)
        if cu_seqlens is None:
            return y, xx[:, T:]
        # each document's last K-1 inputs, zeros before its start
        idx = cu_seqlens[1:, None] - (K - 1) + torch.arange(K - 1, device=x.device)  # [N, K-1]
        return y, x[0, idx.clamp_min(0)] * (idx >= cu_seqlens[:-1, None])[..., None].to(x.dtype)


def check_heads(hidden_size: int, num_heads: int, what: str = "num_attention_heads") -> int:
    """The head dim hidden_size / num_heads; a ValueError naming both when it does not divide."""
    if num_heads < 1 or hidden_size % num_heads:
        raise ValueError(f"{what} = {num_heads} must divide hidden_size = {hidden_size}")
    return hidden_size // num_heads
