"""The TTT layer (Sun et al. 2024, arXiv 2407.04620): a sequence mixer whose hidden state is a model (linear
or a two-layer MLP) trained on a self-supervised reconstruction loss while the sequence is read (`tttlm.ops`).

Backbones (paper §3 and appendix): "mamba" (the paper's default) shares one q/k projection and gives q and k
separate causal depthwise convolutions of width 4, gates the output with gelu(x W_g), and the block adds a
convolution before the layer (`PreConv`); "transformer" uses plain q/k/v projections and no gate (as the
authors' code does). Both apply RoPE with positions taken modulo the mini-batch size, learn the inner initial
weights (W0, b0), the per-token inner learning rate eta = base_lr / D * sigmoid(x theta_lr + b_lr), an offset
on the token scale 1/(i+1), and the inner LayerNorm; the output is LayerNorm over the full width, the gate
(Mamba backbone) and an output projection.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers import initialization as init

from tttlm.fast import opaque
from tttlm.layers.common import Linear, RMSNorm, SeqInfo, ShortConv, check_heads, rope, rope_tables
from tttlm.ops import TTTLinearState, TTTMLPState, ttt_linear, ttt_linear_step, ttt_mlp, ttt_mlp_step

# the one-token steps run their kernels outside the compiled decode step around them
_INNER = {
    "linear": (ttt_linear, opaque(ttt_linear_step), TTTLinearState),
    "mlp": (ttt_mlp, opaque(ttt_mlp_step), TTTMLPState),
}


class PreConv(nn.Module):
    """The Mamba backbone's convolution before the TTT layer, with its own residual: h + conv(RMSNorm(h)).

    Decoding cache: `cache.conv["pre"]` [B, K-1, C].
    """

    def __init__(self, config):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.conv = ShortConv(config.hidden_size, config.conv_kernel, bias=True)

    def forward(self, h: Tensor, info: SeqInfo, cache=None) -> Tensor:
        y, state = self.conv(self.norm(h), info.pos, None if cache is None else cache.conv.get("pre"), info.cu_seqlens)
        if cache is not None:
            cache.conv["pre"] = state
        return h + y


class TTTMixer(nn.Module):
    """TTT-Linear (inner="linear") or TTT-MLP (inner="mlp"). x [B, T, C] -> [B, T, C], H heads of D = C / H.

    Decoding cache: `cache.state` (the op's TTTLinearState / TTTMLPState, mini-batch offset inside) and, on
    the Mamba backbone, `cache.conv["q"]`, `cache.conv["k"]` [B, K-1, C].
    """

    def __init__(self, config, inner: str):
        super().__init__()
        if inner not in _INNER:
            raise ValueError(f"inner must be one of {sorted(_INNER)}, got {inner!r}")
        C, H = config.hidden_size, config.num_attention_heads
        D = check_heads(C, H)
        self.inner, self.num_heads, self.head_dim = inner, H, D
        self.op, self.step_op, self.state_cls = _INNER[inner]
        self.mini_batch_size = config.mini_batch_size
        self.rope_theta = config.rope_theta
        self.base_lr = config.ttt_base_lr
        self.lr_scale = 1.0  # set by the trainer through TTTLMForCausalLM.set_inner_lr_warmup
        self.mamba_backbone = config.ttt_backbone == "mamba"
        if self.mamba_backbone:
            self.qk_proj = Linear(C, C, bias=False)
            self.conv_q = ShortConv(C, config.conv_kernel, bias=True)
            self.conv_k = ShortConv(C, config.conv_kernel, bias=True)
        else:
            self.q_proj = Linear(C, C, bias=False)
            self.k_proj = Linear(C, C, bias=False)
        self.v_proj = Linear(C, C, bias=False)
        self.lr_proj = Linear(C, H, bias=True)
        self.token_scale_offset = nn.Parameter(torch.zeros(config.mini_batch_size))
        self.ln_weight = nn.Parameter(torch.ones(H, D))
        self.ln_bias = nn.Parameter(torch.zeros(H, D))
        if inner == "linear":
            self.W0 = nn.Parameter(torch.empty(H, D, D))
            self.b0 = nn.Parameter(torch.zeros(H, D))
        else:
            self.W1 = nn.Parameter(torch.empty(H, D, 4 * D))
            self.b1 = nn.Parameter(torch.zeros(H, 4 * D))
            self.W2 = nn.Parameter(torch.empty(H, 4 * D, D))
            self.b2 = nn.Parameter(torch.zeros(H, D))
        self.post_norm = nn.LayerNorm(C, eps=1e-6)
        self.g_proj = Linear(C, C, bias=False) if self.mamba_backbone else None
        self.o_proj = Linear(C, C, bias=False)

    def init_parameters(self, std: float) -> None:
        for p in self.inner_params():
            if p.dim() == 3:  # W0 (or W1, W2) [H, in, out]; the biases start at zero
                init.normal_(p, std=std)
            else:
                init.zeros_(p)
        init.zeros_(self.token_scale_offset)
        init.ones_(self.ln_weight)
        init.zeros_(self.ln_bias)

    def inner_params(self) -> tuple[nn.Parameter, ...]:
        """The inner model's learnable initial weights, in the op state's order."""
        return (self.W0, self.b0) if self.inner == "linear" else (self.W1, self.b1, self.W2, self.b2)

    def initial_state(self, n: int, dtype: torch.dtype):
        """The op state at a sequence start for n rows: the learned W0, b0 (or W1, b1, W2, b2) broadcast."""
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        return self.state_cls.start(*(p.to(cdt).expand(n, *p.shape) for p in self.inner_params()))

    def rope_tables(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE's cos and sin tables of positions pos [B, T], taken modulo the mini-batch size."""
        return rope_tables(pos % self.mini_batch_size, self.head_dim, self.rope_theta)

    def _project(self, x: Tensor, info: SeqInfo, cache) -> tuple[dict, dict]:
        """The op's keyword arguments for x [B, T, C] but its state, and the new convolution states."""
        B, T, C = x.shape
        convs = {}
        if self.mamba_backbone:
            qk = self.qk_proj(x)
            q, convs["q"] = self.conv_q(qk, info.pos, None if cache is None else cache.conv.get("q"), info.cu_seqlens)
            k, convs["k"] = self.conv_k(qk, info.pos, None if cache is None else cache.conv.get("k"), info.cu_seqlens)
        else:
            q, k = self.q_proj(x), self.k_proj(x)
        shape = (B, T, self.num_heads, self.head_dim)
        tables = info.rope if info.rope is not None else self.rope_tables(info.pos)
        q = rope(q.view(shape), tables)
        k = rope(k.view(shape), tables)
        v = self.v_proj(x).view(shape)
        lr = self.base_lr * self.lr_scale / self.head_dim
        eta = lr * torch.sigmoid(self.lr_proj(x).float())  # [B, T, H]
        i = torch.arange(1, self.mini_batch_size + 1, device=x.device, dtype=torch.float32)
        token_scale = torch.clamp_min(1.0 / i + self.token_scale_offset.float(), 0.0)
        kwargs = dict(
            q=q,
            k=k,
            v=v,
            eta=eta,
            ln_weight=self.ln_weight,
            ln_bias=self.ln_bias,
            mini_batch_size=self.mini_batch_size,
            token_scale=token_scale,
        )
        return kwargs, convs

    @opaque
    def _run(self, kw: dict, info: SeqInfo, state, output_final_state: bool, dtype: torch.dtype):
        """The op over whole sequences, from `state` (None: the learned start of every sequence); the op's own
        kernels run here, outside the compiled code around it."""
        if state is None:
            state = self.initial_state(info.num_sequences, dtype)
        return self.op(**kw, state=state, cu_seqlens=info.cu_seqlens, output_final_state=output_final_state)

    def op_inputs(self, hidden_states: Tensor, cu_seqlens: Tensor | None = None) -> dict:
        """The keyword arguments this layer passes to its op (`tttlm.ops.ttt_linear` / `ttt_mlp`) for the
        mixer input hidden_states [B, T, C] read from the sequence start (cu_seqlens: packed, B == 1):
        q, k, v [B, T, H, D], eta [B, T, H], ln_weight, ln_bias [H, D], state (the learned inner start),
        mini_batch_size, token_scale [mini_batch_size], and cu_seqlens. `self.op(**inputs)` gives the op's
        output."""
        B, T, _ = hidden_states.shape
        info = SeqInfo.contiguous(B, T, 0, hidden_states.device) if cu_seqlens is None else SeqInfo.packed(cu_seqlens)
        kwargs, _ = self._project(hidden_states, info, None)
        state = self.initial_state(info.num_sequences, hidden_states.dtype)
        return {**kwargs, "state": state, "cu_seqlens": info.cu_seqlens}

    def forward(self, x: Tensor, info: SeqInfo, cache=None) -> Tensor:
        B, T, C = x.shape
        kw, convs = self._project(x, info, cache)
        state = None if cache is None else cache.state
        if state is not None and T == 1:
            # out of place even on a static cache (whose setter then copies the state back): with the step in place
            # (inplace=True, no copies) an H200 decoded faster at batch 64 but 2x slower at batch 1, where a compiled
            # kernel of the block's glue ran 17x longer, for a reason not found yet (docs/benchmarks.md)
            o, state = self.step_op(
                kw["q"][:, 0],
                kw["k"][:, 0],
                kw["v"][:, 0],
                kw["eta"][:, 0],
                kw["ln_weight"],
                kw["ln_bias"],
                state,
                mini_batch_size=self.mini_batch_size,
                token_scale=kw["token_scale"],
            )
            o = o[:, None]
        else:
            o, state = self._run(kw, info, state, cache is not None, x.dtype)
        if cache is not None:
            cache.state = state
            cache.conv.update(convs)
        o = self.post_norm(o.reshape(B, T, C))
        if self.g_proj is not None:
            o = o * F.gelu(self.g_proj(x), approximate="tanh")
        return self.o_proj(o)
