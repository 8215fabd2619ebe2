"""The Mesa layer of MesaNet (von Oswald et al. 2025, arXiv 2506.05233, §3 and Fig. 1): keys, queries and
values with a short causal convolution + SiLU on q and k, L2-normalised q and k, an input strength
beta = sigmoid(.), a log forget gate g = logsigmoid(.) per head, the regulariser lamb = 0.25 + softplus(.) per
head and dim, the op `tttlm.ops.mesa` (the least-squares readout solved by CG), a per-head RMSNorm and an
output gate silu(x W_g) (config.mesa_output_gate; MesaNet's reference layer has it off by default).
docs/fidelity.md lists where this layer and its defaults differ from the paper's reference layer."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers import initialization as init

from tttlm.fast import opaque
from tttlm.layers.common import Linear, SeqInfo, ShortConv, check_heads
from tttlm.ops import mesa, mesa_step

# their kernels run outside the compiled code around them
_mesa_op, _mesa_step_op = opaque(mesa), opaque(mesa_step)

LAMB_MIN = 0.25
GATE_CAP = 0.9975  # the optional cap on the forget gate of repeated inputs: gamma * (1 - (1 - cap) * beta^2)


class MesaMixer(nn.Module):
    """x [B, T, C] -> [B, T, C], H heads of D = C / H.

    Decoding cache: `cache.state` (MesaState: h_kk [B,H,D,D], h_kv [B,H,D,D]) and `cache.conv["q"]`,
    `cache.conv["k"]` [B, K-1, C]. CG runs `mesa_cg_max_iter` steps; outside training, `mesa_cg_tol` (if set)
    stops it early, except on a static decoding cache (tttlm.models.decode), where the number of steps is fixed
    so that the step never waits for the host: there it always runs `mesa_cg_max_iter` steps.
    """

    def __init__(self, config):
        super().__init__()
        C, H = config.hidden_size, config.num_attention_heads
        self.num_heads, self.head_dim = H, check_heads(C, H)
        self.cg_max_iter = config.mesa_cg_max_iter
        self.cg_tol = config.mesa_cg_tol
        self.gate_cap = config.mesa_gate_cap
        self.forget_bias_init = config.mesa_forget_bias_init
        self.q_proj = Linear(C, C, bias=False)
        self.k_proj = Linear(C, C, bias=False)
        self.v_proj = Linear(C, C, bias=False)
        self.conv_q = ShortConv(C, config.conv_kernel, bias=False)
        self.conv_k = ShortConv(C, config.conv_kernel, bias=False)
        self.beta_proj = Linear(C, H, bias=True)
        self.forget_proj = Linear(C, H, bias=True)
        self.lamb_param = nn.Parameter(torch.empty(H, self.head_dim))
        self.o_norm_weight = nn.Parameter(torch.ones(self.head_dim))
        self.gate_proj = Linear(C, C, bias=False) if config.mesa_output_gate else None
        self.o_proj = Linear(C, C, bias=False)
        self.eps = config.rms_norm_eps

    def init_parameters(self, std: float) -> None:
        init.constant_(self.lamb_param, math.log(math.expm1(1.0 - LAMB_MIN)))  # lamb = 1 at the start
        if self.forget_bias_init == "spread":
            # forget gates start slow, spread over heads between 0.9 and 0.999 (half-lives of ~7 to ~700 tokens)
            gamma = 1 - torch.logspace(-1, -3, self.num_heads)
            init.copy_(self.forget_proj.bias, torch.log(gamma / (1 - gamma)))
        else:  # "zero": the reference layer's generic init, gates near 0.5
            init.zeros_(self.forget_proj.bias)
        init.ones_(self.o_norm_weight)

    def lamb(self) -> Tensor:
        """The regulariser [H, D], float32, > 0.25."""
        return LAMB_MIN + F.softplus(self.lamb_param.float())

    def _project(self, x: Tensor, info: SeqInfo, cache) -> tuple[dict, dict]:
        """The op's keyword arguments for x [B, T, C] but its state, and the new convolution states."""
        B, T, C = x.shape
        shape = (B, T, self.num_heads, self.head_dim)
        get = (lambda name: None) if cache is None else cache.conv.get
        q, cq = self.conv_q(self.q_proj(x), info.pos, get("q"), info.cu_seqlens)
        k, ck = self.conv_k(self.k_proj(x), info.pos, get("k"), info.cu_seqlens)
        q = F.normalize(F.silu(q).view(shape), dim=-1, eps=1e-6)
        k = F.normalize(F.silu(k).view(shape), dim=-1, eps=1e-6)
        v = self.v_proj(x).view(shape)
        beta = torch.sigmoid(self.beta_proj(x).float())  # [B, T, H]
        g = F.logsigmoid(self.forget_proj(x).float())
        if self.gate_cap:
            g = g + torch.log1p(-(1 - GATE_CAP) * beta * beta)
        kwargs = dict(
            q=q,
            k=k,
            v=v,
            g=g,
            beta=beta,
            lamb=self.lamb(),
            cg_max_iter=self.cg_max_iter,
            cg_tol=None if self.training or (cache is not None and cache.static) else self.cg_tol,
        )
        return kwargs, {"q": cq, "k": ck}

    def op_inputs(self, hidden_states: Tensor, cu_seqlens: Tensor | None = None) -> dict:
        """The keyword arguments this layer passes to `tttlm.ops.mesa` for the mixer input hidden_states
        [B, T, C] read from the sequence start (cu_seqlens: packed, B == 1): q, k, v [B, T, H, D], g, beta
        [B, T, H], lamb [H, D], state (None), cg_max_iter, cg_tol, cu_seqlens. `mesa(**inputs)` gives the op
        output (pass cg_stats=dict() for the solver's iterations and residuals)."""
        B, T, _ = hidden_states.shape
        info = SeqInfo.contiguous(B, T, 0, hidden_states.device) if cu_seqlens is None else SeqInfo.packed(cu_seqlens)
        kwargs, _ = self._project(hidden_states, info, None)
        return {**kwargs, "state": None, "cu_seqlens": info.cu_seqlens}

    def forward(self, x: Tensor, info: SeqInfo, cache=None) -> Tensor:
        B, T, C = x.shape
        kw, convs = self._project(x, info, cache)
        state = None if cache is None else cache.state
        if state is not None and T == 1:
            o, state = _mesa_step_op(
                *(kw[n][:, 0] for n in ("q", "k", "v", "g", "beta")),
                kw["lamb"],
                state,
                cg_max_iter=kw["cg_max_iter"],
                cg_tol=kw["cg_tol"],
                inplace=cache.static,  # the step writes a static cache's buffers itself: its setter copies nothing
            )
            o = o[:, None]
        else:
            o, state = _mesa_op(**kw, state=state, cu_seqlens=info.cu_seqlens, output_final_state=cache is not None)
        if cache is not None:
            cache.state = state
            cache.conv.update(convs)
        of = o.float()
        of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps) * self.o_norm_weight.float()
        o = of.to(x.dtype).reshape(B, T, C)
        if self.gate_proj is not None:
            o = o * F.silu(self.gate_proj(x))
        return self.o_proj(o)
