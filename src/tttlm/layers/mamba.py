"""The Mamba mixer (Gu & Dao 2023, arXiv 2312.00752, §3.4 and Fig. 3): an input projection to (x, z), a causal
depthwise convolution + SiLU on x, the input-dependent step size delta (a rank-R projection, R = ceil(C / 16))
and projections B, C of x, the selective scan (`tttlm.ops.selective_scan`) with a skip D, the gate silu(z), and
the output projection. A Mamba language model stacks these alone (no MLP), about twice as many as a
Transformer's blocks at the same width.

Initialisation follows the authors' reference layer (mamba_simple.py): A = -[1, ..., N] in every channel
(S4D-real), D = 1, delta's bias the inverse softplus of step sizes log-uniform in [1e-3, 1e-1] (floor 1e-4),
delta's projection uniform in +-R^-1/2, the other projections PyTorch's default (uniform in +-fan_in^-1/2),
the output projection's divided by sqrt(layers).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers import initialization as init

from tttlm.fast import opaque
from tttlm.layers.common import Linear, SeqInfo, ShortConv
from tttlm.ops.selective_scan import selective_scan, selective_scan_step

# their kernels run outside the compiled code around them
_selective_scan_op, _selective_scan_step_op = opaque(selective_scan), opaque(selective_scan_step)

DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4


def dt_rank(hidden_size: int) -> int:
    """The rank of delta's projection in the paper's models: ceil(C / 16)."""
    return math.ceil(hidden_size / 16)


def _default_linear_init(weight: Tensor, scale: float = 1.0) -> None:
    # nn.Linear's own init (kaiming_uniform with a = sqrt(5)): uniform in +-1/sqrt(fan_in), times scale
    bound = scale / math.sqrt(weight.shape[1])
    init.uniform_(weight, -bound, bound)


class MambaMixer(nn.Module):
    """x [B, T, C] -> [B, T, C], with inner width E = mamba_expand * C and N = mamba_d_state states per channel.

    Decoding cache: `cache.conv["x"]` [B, K-1, E] (the convolution's last inputs) and `cache.state` [B, E, N]
    (the scan's state, float32).
    """

    def __init__(self, config):
        super().__init__()
        C = config.hidden_size
        self.d_inner = E = config.mamba_expand * C
        self.d_state = N = config.mamba_d_state
        self.dt_rank = R = config.mamba_dt_rank or dt_rank(C)
        self.num_layers = config.num_hidden_layers
        self.in_proj = Linear(C, 2 * E, bias=False)
        self.conv = ShortConv(E, config.conv_kernel, bias=True)
        self.x_proj = Linear(E, R + 2 * N, bias=False)
        self.dt_proj = Linear(R, E, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(E))
        self.A_log = nn.Parameter(torch.empty(E, N))
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = Linear(E, C, bias=False)

    def init_parameters(self, std: float) -> None:
        # the reference layer's init (module docstring); `std` (the config's initializer_range) is not used
        _default_linear_init(self.in_proj.weight)
        _default_linear_init(self.x_proj.weight)
        bound = self.dt_rank**-0.5
        init.uniform_(self.dt_proj.weight, -bound, bound)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
        dt = dt.clamp(min=DT_FLOOR)
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        init.copy_(self.A_log, torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand(
            self.d_inner, self.d_state))
        init.ones_(self.D)
        _default_linear_init(self.out_proj.weight, 1 / math.sqrt(self.num_layers))

    def forward(self, x: Tensor, info: SeqInfo, cache=None) -> Tensor:
        T = x.shape[1]
        N, R = self.d_state, self.dt_rank
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs, conv_state = self.conv(xs, info.pos, None if cache is None else cache.conv.get("x"), info.cu_seqlens)
        xs = F.silu(xs)
        dt, B, C = torch.split(self.x_proj(xs), [R, N, N], dim=-1)
        delta = self.dt_proj(dt)  # [Bt, T, E]; the op adds dt_bias and applies softplus in float32
        A = -torch.exp(self.A_log.float())
        state = None if cache is None else cache.state
        if state is not None and T == 1:
            y, state = _selective_scan_step_op(xs[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], self.D,
                                               delta_bias=self.dt_bias, delta_softplus=True, state=state)
            y = y[:, None]
        else:
            y, state = _selective_scan_op(
                xs, delta, A, B, C, self.D, delta_bias=self.dt_bias, delta_softplus=True, initial_state=state,
                cu_seqlens=info.cu_seqlens, output_final_state=cache is not None,
            )
        if cache is not None:
            cache.state = state
            cache.conv["x"] = conv_state
        return self.out_proj(y * F.silu(z))
