"""The Mamba-2 mixer (Dao & Gu 2024, arXiv 2405.21060, §7): one input projection to (z, x, B, C, dt), a
causal depthwise convolution + SiLU over (x, B, C), the selective SSM (`tttlm.ops.ssd`) with a skip D, a
gated RMSNorm of y * silu(z), and the output projection."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers import initialization as init

from tttlm.fast import opaque
from tttlm.layers.common import Linear, SeqInfo, ShortConv
from tttlm.ops.ssd import ssd, ssd_step

# their kernels run outside the compiled code around them
_ssd_op, _ssd_step_op = opaque(ssd), opaque(ssd_step)


class Mamba2Mixer(nn.Module):
    """x [B, T, C] -> [B, T, C], with inner width E = mamba_expand * C split in E / mamba_headdim heads.

    Decoding cache: `cache.conv["xbc"]` [B, K-1, E + 2 G N] (the convolution's last inputs) and `cache.state`
    [B, heads, headdim, N] (the SSM state, float32).
    """

    def __init__(self, config):
        super().__init__()
        C = config.hidden_size
        self.d_inner = config.mamba_expand * C
        self.headdim = config.mamba_headdim
        self.d_state = config.mamba_d_state
        self.ngroups = config.mamba_ngroups
        self.chunk_size = config.mamba_chunk_size
        if self.headdim < 1 or self.d_inner % self.headdim:
            raise ValueError(f"mamba_headdim = {self.headdim} must divide mamba_expand * hidden_size = {self.d_inner}")
        self.nheads = self.d_inner // self.headdim
        if self.ngroups < 1 or self.nheads % self.ngroups:
            raise ValueError(f"mamba_ngroups = {self.ngroups} must divide the number of SSM heads {self.nheads}")
        conv_dim = self.d_inner + 2 * self.ngroups * self.d_state
        self.in_proj = Linear(C, self.d_inner + conv_dim + self.nheads, bias=False)
        self.conv = ShortConv(conv_dim, config.conv_kernel, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm_weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = Linear(self.d_inner, C, bias=False)
        self.eps = config.rms_norm_eps

    def init_parameters(self, std: float) -> None:
        # the paper's init: dt log-uniform in [1e-3, 1e-1] (dt_bias its inverse softplus), A in [1, 16]
        dt = torch.exp(torch.rand(self.nheads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))
        init.copy_(self.A_log, torch.log(torch.empty(self.nheads).uniform_(1, 16)))
        init.ones_(self.D)
        init.ones_(self.norm_weight)

    def forward(self, x: Tensor, info: SeqInfo, cache=None) -> Tensor:
        Bt, T, _ = x.shape
        E, GN = self.d_inner, self.ngroups * self.d_state
        z, xbc, dt = torch.split(self.in_proj(x), [E, E + 2 * GN, self.nheads], dim=-1)
        xbc, conv_state = self.conv(xbc, info.pos, None if cache is None else cache.conv.get("xbc"), info.cu_seqlens)
        xs, B, C = torch.split(F.silu(xbc), [E, GN, GN], dim=-1)
        xs = xs.reshape(Bt, T, self.nheads, self.headdim)
        B = B.reshape(Bt, T, self.ngroups, self.d_state)
        C = C.reshape(Bt, T, self.ngroups, self.d_state)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # [Bt, T, heads]
        A = -torch.exp(self.A_log.float())
        state = None if cache is None else cache.state
        if state is not None and T == 1:
            y, state = _ssd_step_op(xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], state)
            y = y[:, None]
        else:
            y, state = _ssd_op(
                xs,
                dt,
                A,
                B,
                C,
                chunk_size=self.chunk_size,
                initial_state=state,
                cu_seqlens=info.cu_seqlens,
                output_final_state=cache is not None,
            )
        if cache is not None:
            cache.state = state
            cache.conv["xbc"] = conv_state
        y = y + xs * self.D.to(y.dtype)[:, None]
        y = y.reshape(Bt, T, E) * F.silu(z)
        yf = y.float().reshape(Bt, T, self.ngroups, E // self.ngroups)
        yf = yf * torch.rsqrt(yf.pow(2).mean(-1, keepdim=True) + self.eps)
        y = (yf.reshape(Bt, T, E) * self.norm_weight.float()).to(x.dtype)
        return self.out_proj(y)
