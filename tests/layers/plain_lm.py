"""Plain references of every tttlm mixer, block and the whole language model, written from the papers' equations
for ONE sequence read from its start, token after token, in the parameters' dtype (float64 in the tests).

They read a module's parameters by name and share no code with tttlm (no projection, convolution, RoPE, norm or
op of the package), so the tests that compare the layers' forward, packed and decoding paths and their gradients
with them find a bug in either. Sources: TTT (Sun et al. 2024, arXiv 2407.04620, §2.1-2.7 and appendix A: the
inner model, its mini-batch gradient descent, the learnable eta, token scale and inner LayerNorm, the Mamba
backbone); MesaNet (von Oswald et al. 2025, arXiv 2506.05233, §3: the regularised least-squares readout, its
gates, lambda = 0.25 + softplus); Mamba (Gu & Dao 2023, arXiv 2312.00752, Alg. 2 and §3.4); Mamba-2 (Dao & Gu
2024, arXiv 2405.21060, §7, the gated RMSNorm); RoPE (Su et al. 2021) in the rotate-halves layout of GPT-NeoX and
Llama; the Transformer++ block (pre-norm RMSNorm, SwiGLU, tied embeddings).

Every function takes x [T, C] (one sequence, T tokens) and returns [T, C], or logits [T, V] for `lm_logits`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tttlm.models import build_model


def linear(x: Tensor, lin) -> Tensor:
    return x @ lin.weight.T + (0 if lin.bias is None else lin.bias)


def silu(x: Tensor) -> Tensor:
    return x / (1 + torch.exp(-x))


def sigmoid(x: Tensor) -> Tensor:
    return 1 / (1 + torch.exp(-x))


def softplus(x: Tensor) -> Tensor:
    return torch.log1p(torch.exp(x))


def gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    centred = x - x.mean(-1, keepdim=True)
    return centred / torch.sqrt((centred * centred).mean(-1, keepdim=True) + eps) * weight + bias


def causal_conv(x: Tensor, conv) -> Tensor:
    """Depthwise causal convolution (conv.weight [C, K], conv.bias [C] or None), as torch's Conv1d with K - 1
    zeros on the left: y_t = sum_k weight[:, K-1-k] x_{t-k}. x [T, C] starts a sequence: nothing before it."""
    K = conv.weight.shape[1]
    rows = []
    for t in range(x.shape[0]):
        y = sum(conv.weight[:, K - 1 - k] * x[t - k] for k in range(min(K, t + 1)))
        rows.append(y if conv.bias is None else y + conv.bias)
    return torch.stack(rows)


def rotary(u: Tensor, pos: Tensor, theta: float) -> Tensor:
    """RoPE on u [T, H, D] at integer positions pos [T]: the pair (u_i, u_{i+D/2}) is the complex number
    u_i + j u_{i+D/2}, turned by the angle pos * theta^(-2i/D)."""
    half = u.shape[-1] // 2
    freq = theta ** (-2 * torch.arange(half, dtype=torch.float64) / u.shape[-1])
    turn = torch.polar(torch.ones(len(pos), 1, half, dtype=torch.float64), pos.double()[:, None, None] * freq)
    z = torch.complex(u[..., :half], u[..., half:]) * turn
    return torch.cat([z.real, z.imag], dim=-1).to(u.dtype)


def heads(x: Tensor, n: int) -> Tensor:
    return x.reshape(x.shape[0], n, -1)


def attention(m, x: Tensor, cfg) -> Tensor:
    """Transformer++ attention: RoPE on q and k, causal softmax with scale 1/sqrt(D)."""
    T, H = x.shape[0], cfg.num_attention_heads
    pos = torch.arange(T)
    q = rotary(heads(linear(x, m.q_proj), H), pos, cfg.rope_theta)
    k = rotary(heads(linear(x, m.k_proj), H), pos, cfg.rope_theta)
    v = heads(linear(x, m.v_proj), H)
    out = []
    for t in range(T):
        scores = torch.einsum("hd,shd->hs", q[t], k[: t + 1]) / math.sqrt(q.shape[-1])
        out.append(torch.einsum("hs,shd->hd", torch.softmax(scores, dim=-1), v[: t + 1]))
    return linear(torch.stack(out).reshape(T, -1), m.o_proj)


def _inner_model(x: Tensor, params: list[Tensor], ln_w: Tensor, ln_b: Tensor, kind: str) -> Tensor:
    """f(x) = x + LN(g(x)) per head: g(x) = x W + b (linear) or gelu_tanh(x W1 + b1) W2 + b2 (mlp). x [H, D]."""
    if kind == "linear":
        W, b = params
        z = torch.einsum("hd,hde->he", x, W) + b
    else:
        W1, b1, W2, b2 = params
        z = torch.einsum("hf,hfd->hd", gelu_tanh(torch.einsum("hd,hdf->hf", x, W1) + b1), W2) + b2
    return x + layer_norm(z, ln_w, ln_b, 1e-6)


def ttt(m, x: Tensor, cfg, kind: str) -> Tensor:
    """The TTT layer: q, k (shared projection and two convolutions on the Mamba backbone), RoPE at the position
    inside the mini-batch, eta_t = base_lr / D * sigmoid(x_t theta + b); token i of a mini-batch reads out with
    W_m - s_i sum_{j<=i} eta_j grad l_j(W_m), s_i = max(1/(i+1) + offset_i, 0); LayerNorm, gate, projection."""
    T, H, b = x.shape[0], cfg.num_attention_heads, cfg.mini_batch_size
    if cfg.ttt_backbone == "mamba":
        qk = linear(x, m.qk_proj)
        q, k = causal_conv(qk, m.conv_q), causal_conv(qk, m.conv_k)
    else:
        q, k = linear(x, m.q_proj), linear(x, m.k_proj)
    pos = torch.arange(T) % b
    q, k = rotary(heads(q, H), pos, cfg.rope_theta), rotary(heads(k, H), pos, cfg.rope_theta)
    v = heads(linear(x, m.v_proj), H)
    D = q.shape[-1]
    eta = cfg.ttt_base_lr / D * sigmoid(linear(x, m.lr_proj))  # [T, H]
    scale = torch.clamp(1 / torch.arange(1, b + 1, dtype=x.dtype) + m.token_scale_offset, min=0)
    names = ("W0", "b0") if kind == "linear" else ("W1", "b1", "W2", "b2")
    weights = [getattr(m, n) for n in names]
    out = []
    with torch.enable_grad():
        for start in range(0, T, b):
            sums = [0] * len(weights)
            for i in range(start, min(start + b, T)):
                loss = 0.5 * (_inner_model(k[i], weights, m.ln_weight, m.ln_bias, kind) - v[i]).pow(2).sum()
                grads = torch.autograd.grad(loss, weights, create_graph=True)
                e = eta[i]
                sums = [s + e.view(-1, *[1] * (g.dim() - 1)) * g for s, g in zip(sums, grads)]
                now = [w - scale[i - start] * s for w, s in zip(weights, sums)]
                out.append(_inner_model(q[i], now, m.ln_weight, m.ln_bias, kind))
            weights = now
    o = layer_norm(torch.stack(out).reshape(T, -1), m.post_norm.weight, m.post_norm.bias, 1e-6)
    if cfg.ttt_backbone == "mamba":
        o = o * gelu_tanh(linear(x, m.g_proj))
    return linear(o, m.o_proj)


def cg(A: Tensor, b: Tensor, max_iter: int, tol: float | None) -> Tensor:
    """Conjugate gradient for A x = b (A [D, D] symmetric positive definite) from the Jacobi guess b / diag(A):
    at most max_iter steps, none once ||r|| <= tol ||r_0|| (tol None: all of them), none from an exact start."""
    x = b / torch.diagonal(A)
    r = b - A @ x
    p, rr0 = r, r @ r
    for _ in range(max_iter):
        rr = r @ r
        if rr == 0 or (tol is not None and rr <= tol * tol * rr0):
            break
        Ap = A @ p
        alpha = rr / (p @ Ap)
        x, r = x + alpha * p, r - alpha * Ap
        p = r + (r @ r) / rr * p
    return x


class CGSolve(torch.autograd.Function):
    """x = A^-1 b by `cg`, differentiated implicitly (Mesa's backward): y = A^-1 dx by `cg` with the same
    limits, then db = y and dA = -y x^T."""

    @staticmethod
    def forward(ctx, A, b, max_iter, tol):
        x = cg(A, b, max_iter, tol)
        ctx.save_for_backward(A, x)
        ctx.limits = max_iter, tol
        return x

    @staticmethod
    def backward(ctx, dx):
        A, x = ctx.saved_tensors
        y = cg(A, dx, *ctx.limits)
        return -torch.outer(y, x), y, None, None


def exact_solve(A: Tensor, b: Tensor) -> Tensor:
    """A [H, D, D], b [H, D] -> A^-1 b per head."""
    return torch.linalg.solve(A, b)


def cg_solve(max_iter: int, tol: float | None):
    """A solve for `mesa_scan` that runs `cg` on each head's system, as Mesa's op does."""
    return lambda A, b: torch.stack([CGSolve.apply(A[h], b[h], max_iter, tol) for h in range(len(b))])


def mesa_scan(q, k, v, gamma, beta, lamb, h_kk, h_kv, solve=exact_solve):
    """Mesa's recurrence on one sequence: q, k [T, H, D], v [T, H, Dv], forget gates gamma and strengths beta
    [T, H], lamb [H, D], the state before the first token h_kk [H, D, D] (its symmetric part acts) and h_kv
    [H, D, Dv]. H_t = gamma_t H_{t-1} + beta_t k k^T, G_t likewise with v, o_t = G_t^T solve(H_t + diag(lamb),
    q_t). Returns o [T, H, Dv] and the last (H_t, G_t)."""
    h_kk = (h_kk + h_kk.mT) / 2
    out = []
    for t in range(len(q)):
        h_kk = gamma[t, :, None, None] * h_kk + beta[t, :, None, None] * k[t, :, :, None] * k[t, :, None, :]
        h_kv = gamma[t, :, None, None] * h_kv + beta[t, :, None, None] * k[t, :, :, None] * v[t, :, None, :]
        out.append(torch.einsum("hde,hd->he", h_kv, solve(h_kk + torch.diag_embed(lamb), q[t])))
    return torch.stack(out), (h_kk, h_kv)


def mesa(m, x: Tensor, cfg, solve=exact_solve) -> Tensor:
    """The Mesa layer: q, k through a convolution, SiLU and L2 norm; beta = sigmoid, forget gate gamma = sigmoid
    (optionally capped by 1 - 0.0025 beta^2); `mesa_scan` from zeros with lambda = 0.25 + softplus (the exact
    solve unless told otherwise); per-head RMSNorm, gate, projection."""
    T, H = x.shape[0], cfg.num_attention_heads

    def unit(u: Tensor) -> Tensor:
        return u / torch.clamp(u.norm(dim=-1, keepdim=True), min=1e-6)

    q = unit(heads(silu(causal_conv(linear(x, m.q_proj), m.conv_q)), H))
    k = unit(heads(silu(causal_conv(linear(x, m.k_proj), m.conv_k)), H))
    v = heads(linear(x, m.v_proj), H)
    beta = sigmoid(linear(x, m.beta_proj))
    gamma = sigmoid(linear(x, m.forget_proj))
    if cfg.mesa_gate_cap:
        gamma = gamma * (1 - (1 - 0.9975) * beta**2)
    D = q.shape[-1]
    o, _ = mesa_scan(q, k, v, gamma, beta, 0.25 + softplus(m.lamb_param), x.new_zeros(H, D, D),
                     x.new_zeros(H, D, v.shape[-1]), solve)
    o = rms_norm(o, m.o_norm_weight, cfg.rms_norm_eps).reshape(T, -1)
    if cfg.mesa_output_gate:
        o = o * silu(linear(x, m.gate_proj))
    return linear(o, m.o_proj)


def mamba2(m, x: Tensor, cfg) -> Tensor:
    """Mamba-2: one projection to (z, x, B, C, dt); convolution + SiLU on (x, B, C); per head h_t = exp(dt A) h
    + dt x B^T and y = h C + D x (groups of heads share B and C); y * silu(z), RMSNorm per group, projection."""
    T = x.shape[0]
    E, P, G, N = cfg.mamba_expand * x.shape[1], cfg.mamba_headdim, cfg.mamba_ngroups, cfg.mamba_d_state
    nh = E // P
    z, xbc, dt = torch.split(linear(x, m.in_proj), [E, E + 2 * G * N, nh], dim=-1)
    xs, Bm, Cm = torch.split(silu(causal_conv(xbc, m.conv)), [E, G * N, G * N], dim=-1)
    xs = xs.reshape(T, nh, P)
    group = torch.arange(nh) // (nh // G)
    Bm, Cm = Bm.reshape(T, G, N)[:, group], Cm.reshape(T, G, N)[:, group]  # [T, nh, N]
    dt = softplus(dt + m.dt_bias)
    A = -torch.exp(m.A_log)
    h = x.new_zeros(nh, P, N)
    ys = []
    for t in range(T):
        h = torch.exp(dt[t] * A)[:, None, None] * h + (dt[t, :, None] * xs[t])[:, :, None] * Bm[t, :, None, :]
        ys.append(torch.einsum("hpn,hn->hp", h, Cm[t]) + m.D[:, None] * xs[t])
    y = torch.stack(ys).reshape(T, E) * silu(z)
    y = rms_norm(y.reshape(T, G, E // G), 1.0, cfg.rms_norm_eps).reshape(T, E) * m.norm_weight
    return linear(y, m.out_proj)


def mamba(m, x: Tensor, cfg) -> Tensor:
    """Mamba (S6): (x, z) projection; convolution + SiLU on x; delta = softplus(dt_proj(x W_dt) + bias), B, C from
    x; per channel and state h_t = exp(delta A) h + delta B x, y = h . C + D x; y * silu(z), projection."""
    T, E, N = x.shape[0], cfg.mamba_expand * x.shape[1], cfg.mamba_d_state
    R = cfg.mamba_dt_rank or math.ceil(x.shape[1] / 16)
    xs, z = torch.split(linear(x, m.in_proj), [E, E], dim=-1)
    xs = silu(causal_conv(xs, m.conv))
    dt, Bm, Cm = torch.split(linear(xs, m.x_proj), [R, N, N], dim=-1)
    delta = softplus(linear(dt, m.dt_proj) + m.dt_bias)  # [T, E]
    A = -torch.exp(m.A_log)  # [E, N]
    h = x.new_zeros(E, N)
    ys = []
    for t in range(T):
        h = torch.exp(delta[t, :, None] * A) * h + (delta[t] * xs[t])[:, None] * Bm[t]
        ys.append(h @ Cm[t] + m.D * xs[t])
    return linear(torch.stack(ys) * silu(z), m.out_proj)


def mixer(m, x: Tensor, cfg) -> Tensor:
    """The mixer of cfg.mixer on one sequence x [T, C]."""
    if cfg.mixer in ("ttt_linear", "ttt_mlp"):
        return ttt(m, x, cfg, cfg.mixer.removeprefix("ttt_"))
    return {"mesa": mesa, "transformer": attention, "mamba2": mamba2, "mamba": mamba}[cfg.mixer](m, x, cfg)


def block(b, h: Tensor, cfg) -> Tensor:
    """Pre-norm block: (TTT on the Mamba backbone: h + conv(RMSNorm(h)) first), h + mixer(RMSNorm(h)), then
    h + SwiGLU(RMSNorm(h)) (none in Mamba's blocks)."""
    eps = cfg.rms_norm_eps
    if cfg.mixer.startswith("ttt_") and cfg.ttt_backbone == "mamba":
        h = h + causal_conv(rms_norm(h, b.pre_conv.norm.weight, eps), b.pre_conv.conv)
    h = h + mixer(b.mixer, rms_norm(h, b.mixer_norm.weight, eps), cfg)
    if cfg.mixer == "mamba":
        return h
    u = rms_norm(h, b.mlp_norm.weight, eps)
    return h + linear(silu(linear(u, b.mlp.gate_proj)) * linear(u, b.mlp.up_proj), b.mlp.down_proj)


def lm_logits(model, ids: Tensor) -> Tensor:
    """Logits [T, V] of a TTTLMForCausalLM for one document ids [T] read from its start: embedding, blocks, final
    RMSNorm, and the output projection tied to the embedding."""
    cfg = model.config
    emb = model.model.embed_tokens.weight
    h = emb[ids]
    for b in model.model.layers:
        h = block(b, h, cfg)
    return rms_norm(h, model.model.norm.weight, cfg.rms_norm_eps) @ emb.T


def lm_loss(model, ids: Tensor) -> Tensor:
    """Summed next-token cross-entropy of one document ids [T] (T - 1 targets)."""
    logp = torch.log_softmax(lm_logits(model, ids)[:-1], dim=-1)
    return -logp.gather(1, ids[1:, None]).sum()


# ------------------------------------------------------------------------------- the models the tests compare
# (preset mixer, overrides): every mixer, the TTT Transformer backbone, Mesa's gate cap without its output gate,
# Mamba2 with two groups of heads sharing B and C and chunks shorter than the rows; RoPE's base and the RMSNorms'
# epsilon off their defaults in some
VARIANTS = {
    "ttt_linear": ("ttt_linear", {"rms_norm_eps": 1e-3}),
    "ttt_linear-transformer": ("ttt_linear", {"ttt_backbone": "transformer", "rope_theta": 500.0}),
    "ttt_mlp": ("ttt_mlp", {"mini_batch_size": 8}),
    "mesa": ("mesa", {"rms_norm_eps": 1e-3}),
    "mesa-cap-no-gate": ("mesa", {"mesa_gate_cap": True, "mesa_output_gate": False}),
    "transformer": ("transformer", {"rope_theta": 500.0}),
    "mamba2": ("mamba2", {"mamba_ngroups": 2, "mamba_chunk_size": 8, "rms_norm_eps": 1e-3}),
    "mamba": ("mamba", {}),
}


def jitter(model, seed: int = 0, scale: float = 0.2):
    """Moves every parameter off its initial value (norm weights off 1, biases and token-scale offsets off 0,
    inner weights larger) so that a term dropped or changed anywhere shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def make_model(variant: str, layers: int = 1, seed: int = 0, **overrides):
    """A float64 tiny model of the variant (config overrides on top of its own), its parameters jittered, in eval
    mode."""
    mixer, own = VARIANTS[variant]
    torch.manual_seed(seed)
    model = build_model(f"{mixer}-tiny", vocab_size=61, num_hidden_layers=layers, **{**own, **overrides})
    model = model.double().eval()
    return jitter(model, seed)
