"""TTT-Linear in the dual form (Sun et al. 2024, §2.5): per mini-batch a few matrix products, no per-token
copy of W. Pure PyTorch, autograd, any device; the fallback behind the GPU kernels."""

from __future__ import annotations

import torch
from torch import Tensor

from tttlm.ops.state import TTTLinearState
from tttlm.ops.ttt_common import InnerModel, ln_fwd, ln_l2_grad, run_chunked, run_step
from tttlm.ops.ttt_linear.reference import linear_inner


def _eta_err(params, K: Tensor, V: Tensor, eta: Tensor, ln_w, ln_b, eps) -> Tensor:
    """eta_j * dl_j/dz_j at z_j = k_j W + b: [R,H,t,D]."""
    W, b = params
    return eta[..., None] * ln_l2_grad(K @ W + b[..., None, :], V - K, ln_w, ln_b, eps)


def linear_grad_sums(params, K, V, eta, ln_w, ln_b, eps):
    """sum_j eta_j (grad_W l_j, grad_b l_j) over the t tokens of K, V [R,H,t,D], eta [R,H,t]."""
    E = _eta_err(params, K, V, eta, ln_w, ln_b, eps)
    return K.mT @ E, E.sum(-2)


def linear_minibatch(params, sums, Q, K, V, eta, s, ln_w, ln_b, eps):
    """One mini-batch, Q/K/V [R,H,b,D], eta [R,H,b], s [b]: outputs [R,H,b,D] and the mini-batch's sums."""
    W, b = params
    E = _eta_err(params, K, V, eta, ln_w, ln_b, eps)
    # q_i W_i = q_i W - s_i sum_{j<=i} (q_i . k_j) eta_j dz_j, and the bias adds eta_j dz_j: hence the "+ 1"
    corr = torch.tril(Q @ K.mT + 1) @ E
    new_W, new_b = K.mT @ E, E.sum(-2)
    if sums is not None:
        corr = corr + Q @ sums[0] + sums[1][..., None, :]
        new_W, new_b = new_W + sums[0], new_b + sums[1]
    Z = Q @ W + b[..., None, :] - s[:, None] * corr
    return Q + ln_fwd(Z, ln_w, ln_b, eps)[0], (new_W, new_b)


LINEAR = InnerModel(
    state_cls=TTTLinearState,
    param_shapes=lambda H, D: ((D, D), (D,)),
    apply=linear_inner,
    grad_sums=linear_grad_sums,
    minibatch=linear_minibatch,
)


def ttt_linear_chunked(q, k, v, eta, ln_weight, ln_bias, state, *, mini_batch_size=16, token_scale=None, eps=1e-6,
                       cu_seqlens=None, output_final_state=False):
    """See `tttlm.ops.ttt_linear`; inputs are assumed checked."""
    return run_chunked(LINEAR, q, k, v, eta, ln_weight, ln_bias, state, mini_batch_size=mini_batch_size,
                       token_scale=token_scale, eps=eps, cu_seqlens=cu_seqlens, output_final_state=output_final_state)


def ttt_linear_step_recurrent(q_t, k_t, v_t, eta_t, ln_weight, ln_bias, state, *, mini_batch_size=16,
                              token_scale=None, eps=1e-6, inplace=False):
    """See `tttlm.ops.ttt_linear_step`; inputs are assumed checked."""
    return run_step(LINEAR, q_t, k_t, v_t, eta_t, ln_weight, ln_bias, state, mini_batch_size=mini_batch_size,
                    token_scale=token_scale, eps=eps, inplace=inplace)
