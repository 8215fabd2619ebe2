"""Pieces shared by the TTT ops: the inner model's LayerNorm and its gradient, input checks, the choice of
backend, the layout that lines every sequence up with its mini-batch schedule, and the loop over mini-batches.

An inner model (TTT-Linear's or TTT-MLP's) is a small namespace with three functions over tensors whose
leading dims are [R, H] (rows, heads), parameters included:
    apply(params, X, ln_w, ln_b, eps)                       f(X) = X + LN(g(X; params)),  X [R,H,t,D]
    grad_sums(params, K, V, eta, ln_w, ln_b, eps)           sum_j eta_j grad l_j(params)  (same shapes as params)
    minibatch(params, sums, Q, K, V, eta, s, ln_w, ln_b, eps) -> (O [R,H,b,D], sums + this mini-batch's sums)
        the dual form of one mini-batch: every gradient at `params`, outputs with the per-token weights
        params - s_i * (sums + sum_{j<=i} eta_j grad l_j); `sums` (or None for zeros) covers tokens of the
        mini-batch that an earlier call already read.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from tttlm.fast import compile_enabled

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------- inner model math
def ln_fwd(z: Tensor, w: Tensor, b: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm over the last dim. z [..., D], w and b broadcast to it. Returns y, xhat, rstd [..., 1]."""
    mu = z.mean(-1, keepdim=True)
    zc = z - mu
    rstd = torch.rsqrt((zc * zc).mean(-1, keepdim=True) + eps)
    xhat = zc * rstd
    return w * xhat + b, xhat, rstd


def ln_l2_grad(z: Tensor, target: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    """d/dz of 1/2 ||LN_{w,b}(z) - target||^2, row-wise over the last dim. z, target [..., D]."""
    y, xhat, rstd = ln_fwd(z, w, b, eps)
    g = w * (y - target)
    return rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))


_GELU_C = math.sqrt(2.0 / math.pi)


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_tanh_grad(x: Tensor) -> Tensor:
    t = torch.tanh(_GELU_C * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * x * x)


def default_token_scale(mini_batch_size: int, dtype: torch.dtype, device) -> Tensor:
    """1/(i+1) for i in the mini-batch: the running mean of the inner gradients."""
    return 1.0 / torch.arange(1, mini_batch_size + 1, dtype=dtype, device=device)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Inner states and reductions: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------- input checks
def _check_tensor(name: str, t, shape: tuple, device, float_dtype: bool = True) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(e is not None and s != e for s, e in zip(t.shape, shape)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if float_dtype and t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")


def check_ttt_inputs(
    q, k, v, eta, ln_weight, ln_bias, state, state_cls, param_shapes, mini_batch_size, token_scale, cu_seqlens,
    step: bool = False,
) -> int:
    """Validates the arguments of a TTT op (or its one-token step); returns N, the number of state rows.

    param_shapes(H, D) gives the per-head shapes of the inner parameters, in the state's `params` order.
    On CUDA only shapes, dtypes and devices are checked: the value checks (eta >= 0, state.offset in range,
    cu_seqlens from 0 to T) would make the host wait for the GPU in every layer of every step (the model checks
    a packed batch's boundaries once, on the host).
    """
    if not isinstance(q, Tensor) or q.dim() != (3 if step else 4):
        got = list(q.shape) if isinstance(q, Tensor) else type(q).__name__
        raise ValueError(f"q must have shape {'[B, H, D]' if step else '[B, T, H, D]'}, got {got}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    dev = q.device
    check_values = dev.type != "cuda"
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    T = 1 if step else q.shape[1]
    if T < 1 or B < 1:
        raise ValueError(f"q must hold at least one token, got shape {list(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        _check_tensor(name, t, tuple(q.shape), dev)
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    _check_tensor("eta", eta, (B, H) if step else (B, T, H), dev)
    if check_values and bool((eta < 0).any()):
        raise ValueError("eta must be >= 0 (inner learning rates)")
    _check_tensor("ln_weight", ln_weight, (H, D), dev)
    _check_tensor("ln_bias", ln_bias, (H, D), dev)
    if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
        raise ValueError(f"mini_batch_size must be an int >= 1, got {mini_batch_size!r}")
    if token_scale is not None:
        _check_tensor("token_scale", token_scale, (mini_batch_size,), dev)
    N = B
    if cu_seqlens is not None:
        if step:
            raise ValueError("cu_seqlens is not accepted by a step function")
        if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must be a 1-D integer tensor [N+1]")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be int64 (or int32), got {cu_seqlens.dtype}")
        if B != 1:
            raise ValueError(f"with cu_seqlens, q must be one packed row (B == 1), got B = {B}")
        if check_values:
            cu = cu_seqlens.tolist()
            if cu[0] != 0 or cu[-1] != T or any(a >= b for a, b in zip(cu, cu[1:])):
                raise ValueError(f"cu_seqlens must start at 0, increase strictly and end at T = {T}, got {cu}")
        N = cu_seqlens.numel() - 1
    if not isinstance(state, state_cls):
        raise ValueError(f"state must be a {state_cls.__name__} (use {state_cls.__name__}.start(...)), "
                         f"got {type(state).__name__}")
    names = [f.name for f in state.__dataclass_fields__.values()][:-1]
    tensors = list(state.params) + list(state.grads)
    shapes = list(param_shapes(H, D)) * 2
    for name, t, shape in zip(names, tensors, shapes):
        _check_tensor(f"state.{name}", t, (N, H, *shape), dev)
        if t.dtype != tensors[0].dtype:
            raise ValueError(f"state.{name} must have state.{names[0]}'s dtype {tensors[0].dtype}, got {t.dtype}")
    if tensors[0].dtype not in (torch.float32, torch.float64):
        raise ValueError(f"state tensors must be float32 or float64 (inner states never drop to 16 bits), "
                         f"got {tensors[0].dtype}")
    _check_tensor("state.offset", state.offset, (N,), dev, float_dtype=False)
    if state.offset.dtype != torch.long:
        raise ValueError(f"state.offset must be int64, got {state.offset.dtype}")
    if check_values and bool(((state.offset < 0) | (state.offset >= mini_batch_size)).any()):
        raise ValueError(f"state.offset must lie in [0, mini_batch_size = {mini_batch_size})")
    return N


# ------------------------------------------------------------------------------------------ mini-batch layout
class Layout(NamedTuple):
    """N sequences placed in rows of a grid of mini-batches, [num_minibatches, N, b], so that every row starts
    at a mini-batch boundary.

    Row r holds `offset[r]` empty slots (tokens an earlier call already read), then its tokens, then empty
    slots up to a whole number of mini-batches. Empty slots get zero inputs and eta = 0, so they change no
    inner weights, and their outputs are dropped. Mini-batch-major, so that every mini-batch is one contiguous
    block whose strides do not depend on the sequence length (the compiled mini-batch step is not recompiled
    for each length).
    """

    dest: Tensor  # [total] flat grid position of every input token, in input order
    src: Tensor  # [num_minibatches*N*b] input token of every grid slot; `total` (one past the end) if empty
    num_minibatches: int
    end_minibatch: list[int]  # per row: the mini-batch holding its last token's successor
    end_offset: Tensor  # [N] int64: tokens of that mini-batch already read, the final state's offset


def make_layout(lengths: Tensor, offsets: Tensor, mini_batch_size: int) -> Layout:
    """lengths [N] and offsets [N] int64 on the inputs' device."""
    N, b = lengths.numel(), mini_batch_size
    ends = offsets + lengths
    num_mb = max(1, math.ceil(int(ends.max()) / b))
    total = int(lengths.sum())
    row = torch.repeat_interleave(torch.arange(N, device=lengths.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(total, device=lengths.device) - starts[row] + offsets[row]  # slot within the row
    dest = ((pos // b) * N + row) * b + pos % b
    src = torch.full((num_mb * N * b,), total, dtype=torch.long, device=lengths.device)
    src[dest] = torch.arange(total, device=lengths.device)
    return Layout(dest, src, num_mb, (ends // b).tolist(), ends % b)


def to_grid(x: Tensor, layout: Layout, N: int) -> Tensor:
    """x [total, H, ...] -> [num_minibatches, N, H, b, ...]: tokens placed by `layout`, zeros in empty slots."""
    x = torch.cat([x, x.new_zeros((1, *x.shape[1:]))])
    return x[layout.src].reshape(layout.num_minibatches, N, -1, *x.shape[1:]).transpose(2, 3).contiguous()


def from_grid(g: Tensor, layout: Layout) -> Tensor:
    """Inverse of to_grid for outputs: [num_minibatches, N, H, b, D] -> [total, H, D]."""
    g = g.transpose(2, 3)
    return g.reshape(-1, *g.shape[3:])[layout.dest]


# ------------------------------------------------------------------------------------------ the mini-batch scan
def checkpoint_interval(state_numel_per_head: int, D: int, mini_batch_size: int) -> int:
    """Mini-batches between stored inner weights in training: at least state/D tokens apart, so the stored
    weights take no more memory than one D-vector per token (memory O(T*D + state) per head)."""
    return max(1, math.ceil(state_numel_per_head / (D * mini_batch_size)))


def scan_minibatches(
    model, params: tuple[Tensor, ...], sums: tuple[Tensor, ...], Q: Tensor, K: Tensor, V: Tensor, eta: Tensor,
    s: Tensor, ln_w: Tensor, ln_b: Tensor, eps: float, layout: Layout, output_final_state: bool,
) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """Runs `model.minibatch` over the grid. Q, K, V [num_mb,N,H,b,D], eta [num_mb,N,H,b], s [b].

    Returns O [num_mb,N,H,b,D] and, if asked, the final state tensors (params then sums) per row. In training, the
    mini-batches are run in checkpointed segments, so only every few mini-batches' inner weights are stored.
    """
    b = s.numel()
    num_mb = layout.num_minibatches
    ends = layout.end_minibatch
    # rows whose final state is taken at mini-batch m
    capture = {}
    if output_final_state:
        capture = {m: torch.tensor([e == m for e in ends], device=Q.device) for m in set(ends)}
    n_state = len(params) + len(sums)
    state_numel = sum(p[0, 0].numel() for p in params)
    seg = checkpoint_interval(state_numel, Q.shape[-1], b) if torch.is_grad_enabled() else num_mb

    def segment(m0: int, m1: int, *tensors: Tensor):
        p, sm, final = tensors[: len(params)], tensors[len(params) : n_state], tensors[n_state:]
        outs = []
        for m in range(m0, m1):
            O, new_sums = model.minibatch(
                p, sm if m == 0 else None, Q[m], K[m], V[m], eta[m], s, ln_w, ln_b, eps,
            )
            outs.append(O)
            if m in capture:
                final = tuple(_where_rows(capture[m], new, old) for new, old in zip(p + new_sums, final))
            p = tuple(w - s[-1] * g for w, g in zip(p, new_sums))
        return (torch.stack(outs), *p, *final)

    final = tuple(torch.zeros_like(t) for t in params + sums) if output_final_state else ()
    p = params
    outs = []
    for m0 in range(0, num_mb, seg):
        fn = lambda *t, m0=m0: segment(m0, min(num_mb, m0 + seg), *t)  # noqa: E731
        args = (*p, *sums, *final)
        res = checkpoint(fn, *args, use_reentrant=False) if seg < num_mb else fn(*args)
        outs.append(res[0])
        p, final = res[1 : 1 + len(params)], res[1 + len(params) :]
    if output_final_state and num_mb in capture:
        mask = capture[num_mb]
        final = tuple(_where_rows(mask, new, old) for new, old in zip(p + tuple(map(torch.zeros_like, sums)), final))
    return torch.cat(outs), (final if output_final_state else None)


def _where_rows(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    return torch.where(mask.view(-1, *([1] * (new.dim() - 1))), new, old)


# -------------------------------------------------------------------------------------------- reference loop
def reference_loop(
    apply: Callable, q: Tensor, k: Tensor, v: Tensor, eta: Tensor, ln_weight: Tensor, ln_bias: Tensor,
    params: tuple[Tensor, ...], sums: tuple[Tensor, ...], offset: Tensor, mini_batch_size: int,
    token_scale: Tensor | None, eps: float,
):
    """The TTT inner loop as written in the paper, one token at a time, inner gradients by autograd.

    q, k, v [B,T,H,D], eta [B,T,H]; params/sums: [B,H,...] tensors; offset [B]. Everything in the inputs'
    dtype (the tests run it in float64). Returns o [B,T,H,D] and the final (params, sums, offset).
    """
    B, T, H, D = q.shape
    s = default_token_scale(mini_batch_size, q.dtype, q.device) if token_scale is None else token_scale
    lw, lb = ln_weight[:, None, :], ln_bias[:, None, :]
    create_graph = torch.is_grad_enabled()
    outs, finals = [], []
    for n in range(B):  # rows may sit at different points of their mini-batch
        p = [t[n : n + 1] for t in params]
        g = [t[n : n + 1] for t in sums]
        pos = int(offset[n])
        o_row = []
        for t in range(T):
            kt, vt, qt = (x[n : n + 1, t, :, None, :] for x in (k, v, q))  # [1,H,1,D]
            with torch.enable_grad():
                pg = [x if x.requires_grad else x.detach().requires_grad_() for x in p]
                loss = 0.5 * ((apply(pg, kt, lw, lb, eps) - vt) ** 2).sum()
                grads = torch.autograd.grad(loss, pg, create_graph=create_graph)
            et = eta[n, t].view(1, H, *([1] * 2))
            g = [gi + (et if gr.dim() == 4 else et[..., 0]) * gr for gi, gr in zip(g, grads)]
            p_bar = [pi - s[pos] * gi for pi, gi in zip(p, g)]
            o_row.append(apply(p_bar, qt, lw, lb, eps)[:, :, 0])
            pos += 1
            if pos == mini_batch_size:
                p, g, pos = p_bar, [torch.zeros_like(x) for x in g], 0
        outs.append(torch.stack(o_row, dim=1))
        finals.append((p, g, pos))
    final_params = tuple(torch.cat([f[0][i] for f in finals]) for i in range(len(params)))
    final_sums = tuple(torch.cat([f[1][i] for f in finals]) for i in range(len(sums)))
    final_offset = torch.tensor([f[2] for f in finals], dtype=torch.long, device=q.device)
    return torch.cat(outs), final_params, final_sums, final_offset


# ------------------------------------------------------------------------------------------------ op drivers
class InnerModel(NamedTuple):
    """One TTT inner model: its state class, per-head parameter shapes and the three functions above."""

    state_cls: type
    param_shapes: Callable[[int, int], tuple]
    apply: Callable
    grad_sums: Callable
    minibatch: Callable


@functools.cache
def _compiled(model: InnerModel) -> InnerModel:
    """The model with its mini-batch function compiled: on a GPU, fusing its element-wise work (LayerNorm and
    its gradient, GELU) roughly halves the time of the PyTorch path (docs/benchmarks.md). It is compiled once
    per grad mode and for the first mini-batch of a call (which adds the state's sums); a second batch size
    makes that dimension dynamic rather than compiling again for each."""
    return model._replace(minibatch=torch.compile(model.minibatch))


def _prepare(q: Tensor, state, ln_weight: Tensor, ln_bias: Tensor, token_scale, mini_batch_size: int):
    cdt = compute_dtype(q.dtype)
    s = default_token_scale(mini_batch_size, cdt, q.device) if token_scale is None else token_scale.to(cdt)
    params = tuple(t.to(cdt) for t in state.params)
    sums = tuple(t.to(cdt) for t in state.grads)
    return cdt, s, params, sums, ln_weight.to(cdt)[:, None, :], ln_bias.to(cdt)[:, None, :]


def run_chunked(
    model: InnerModel, q, k, v, eta, ln_weight, ln_bias, state, *, mini_batch_size, token_scale, eps, cu_seqlens,
    output_final_state,
):
    """The dual form over mini-batches for any inner model (arguments as the public ops; inputs checked)."""
    B, T, H, D = q.shape
    cdt, s, params, sums, lw, lb = _prepare(q, state, ln_weight, ln_bias, token_scale, mini_batch_size)
    if cu_seqlens is None:
        lengths = torch.full((B,), T, dtype=torch.long, device=q.device)
    else:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    N = lengths.numel()
    if compile_enabled(q.device) and q.is_cuda:
        model = _compiled(model)
    layout = make_layout(lengths, state.offset, mini_batch_size)
    Q, K, V = (to_grid(x.reshape(-1, H, D).to(cdt), layout, N) for x in (q, k, v))
    E = to_grid(eta.reshape(-1, H).to(cdt), layout, N)
    O, final = scan_minibatches(model, params, sums, Q, K, V, E, s, lw, lb, eps, layout, output_final_state)
    o = from_grid(O, layout).reshape(B, T, H, D).to(q.dtype)
    if not output_final_state:
        return o, None
    return o, model.state_cls(*final, layout.end_offset)


def run_step(model: InnerModel, q_t, k_t, v_t, eta_t, ln_weight, ln_bias, state, *, mini_batch_size, token_scale, eps,
             inplace=False):
    """One token of the inner loop in its recurrent form (arguments as the public step ops; inputs checked)."""
    cdt, s, params, sums, lw, lb = _prepare(q_t, state, ln_weight, ln_bias, token_scale, mini_batch_size)
    Qt, Kt, Vt = (x.to(cdt)[:, :, None, :] for x in (q_t, k_t, v_t))  # [B,H,1,D]
    inc = model.grad_sums(params, Kt, Vt, eta_t.to(cdt)[..., None], lw, lb, eps)
    sums = tuple(g + i for g, i in zip(sums, inc))
    scale = s[state.offset]  # [B]
    p_bar = tuple(p - scale.view(-1, *([1] * (p.dim() - 1))) * g for p, g in zip(params, sums))
    o = model.apply(p_bar, Qt, lw, lb, eps)[:, :, 0].to(q_t.dtype)
    offset = state.offset + 1
    done = offset == mini_batch_size
    params = tuple(_where_rows(done, pb, p) for pb, p in zip(p_bar, params))
    sums = tuple(_where_rows(done, torch.zeros_like(g), g) for g in sums)
    new = model.state_cls(*params, *sums, torch.where(done, torch.zeros_like(offset), offset))
    return o, state.copy_(new) if inplace else new

