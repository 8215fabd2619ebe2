"""TTT-MLP in the dual form (Sun et al. 2024, §2.5 and appendix): each of the two inner layers is handled like
TTT-Linear's, the second one's inputs being the hidden activations. Pure PyTorch, autograd, any device."""

from __future__ import annotations

import torch
from torch import Tensor

from tttlm.ops.state import TTTMLPState
from tttlm.ops.ttt_common import (
    InnerModel,
    gelu_tanh,
    gelu_tanh_grad,
    ln_fwd,
    ln_l2_grad,
    run_chunked,
    run_step,
)
from tttlm.ops.ttt_mlp.reference import mlp_inner


def _eta_errs(params, K: Tensor, V: Tensor, eta: Tensor, ln_w, ln_b, eps):
    """Hidden activations X2 [R,H,t,4D] and eta_j * dl_j/dz for both layers: E1 [R,H,t,4D], E2 [R,H,t,D]."""
    W1, b1, W2, b2 = params
    Z1 = K @ W1 + b1[..., None, :]
    X2 = gelu_tanh(Z1)
    E2 = eta[..., None] * ln_l2_grad(X2 @ W2 + b2[..., None, :], V - K, ln_w, ln_b, eps)
    E1 = (E2 @ W2.mT) * gelu_tanh_grad(Z1)
    return X2, E1, E2


def mlp_grad_sums(params, K, V, eta, ln_w, ln_b, eps):
    """sum_j eta_j grad l_j for (W1, b1, W2, b2) over the t tokens of K, V [R,H,t,D], eta [R,H,t]."""
    X2, E1, E2 = _eta_errs(params, K, V, eta, ln_w, ln_b, eps)
    return K.mT @ E1, E1.sum(-2), X2.mT @ E2, E2.sum(-2)


def mlp_minibatch(params, sums, Q, K, V, eta, s, ln_w, ln_b, eps):
    """One mini-batch, Q/K/V [R,H,b,D], eta [R,H,b], s [b]: outputs [R,H,b,D] and the mini-batch's sums."""
    W1, b1, W2, b2 = params
    X2, E1, E2 = _eta_errs(params, K, V, eta, ln_w, ln_b, eps)
    corr1 = torch.tril(Q @ K.mT + 1) @ E1
    if sums is not None:
        corr1 = corr1 + Q @ sums[0] + sums[1][..., None, :]
    Xq2 = gelu_tanh(Q @ W1 + b1[..., None, :] - s[:, None] * corr1)
    corr2 = torch.tril(Xq2 @ X2.mT + 1) @ E2
    if sums is not None:
        corr2 = corr2 + Xq2 @ sums[2] + sums[3][..., None, :]
    Z2 = Xq2 @ W2 + b2[..., None, :] - s[:, None] * corr2
    new = (K.mT @ E1, E1.sum(-2), X2.mT @ E2, E2.sum(-2))
    if sums is not None:
        new = tuple(a + c for a, c in zip(new, sums))
    return Q + ln_fwd(Z2, ln_w, ln_b, eps)[0], new


MLP = InnerModel(
    state_cls=TTTMLPState,
    param_shapes=lambda H, D: ((D, 4 * D), (4 * D,), (4 * D, D), (D,)),
    apply=mlp_inner,
    grad_sums=mlp_grad_sums,
    minibatch=mlp_minibatch,
)


def ttt_mlp_chunked(q, k, v, eta, ln_weight, ln_bias, state, *, mini_batch_size=16, token_scale=None, eps=1e-6,
                    cu_seqlens=None, output_final_state=False):
    """See `tttlm.ops.ttt_mlp`; inputs are assumed checked."""
    return run_chunked(MLP, q, k, v, eta, ln_weight, ln_bias, state, mini_batch_size=mini_batch_size,
                       token_scale=token_scale, eps=eps, cu_seqlens=cu_seqlens, output_final_state=output_final_state)


def ttt_mlp_step_recurrent(q_t, k_t, v_t, eta_t, ln_weight, ln_bias, state, *, mini_batch_size=16, token_scale=None,
                           eps=1e-6, inplace=False):
    """See `tttlm.ops.ttt_mlp_step`; inputs are assumed checked."""
    return run_step(MLP, q_t, k_t, v_t, eta_t, ln_weight, ln_bias, state, mini_batch_size=mini_batch_size,
                    token_scale=token_scale, eps=eps, inplace=inplace)
