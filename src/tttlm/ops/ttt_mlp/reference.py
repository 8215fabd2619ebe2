"""TTT-MLP as the paper writes it (Sun et al. 2024, arXiv 2407.04620, §2): the spec the fast paths are tested
against. The inner model is f(x) = x + LN(gelu_tanh(x W1 + b1) W2 + b2) with a 4x hidden width; the inner loop is
`tttlm.ops.ttt_common.reference_loop` (gradients by autograd)."""

from __future__ import annotations

from torch import Tensor

from tttlm.ops.state import TTTMLPState
from tttlm.ops.ttt_common import gelu_tanh, ln_fwd, reference_loop


def mlp_inner(params: tuple[Tensor, ...], X: Tensor, ln_w: Tensor, ln_b: Tensor, eps: float) -> Tensor:
    """f(X). W1 [R,H,D,4D], b1 [R,H,4D], W2 [R,H,4D,D], b2 [R,H,D], X [R,H,t,D], ln_w/ln_b [H,1,D] -> [R,H,t,D]."""
    W1, b1, W2, b2 = params
    hidden = gelu_tanh(X @ W1 + b1[..., None, :])
    return X + ln_fwd(hidden @ W2 + b2[..., None, :], ln_w, ln_b, eps)[0]


def ttt_mlp_ref(q, k, v, eta, ln_weight, ln_bias, state: TTTMLPState, *, mini_batch_size=16, token_scale=None,
                eps=1e-6):
    """q, k, v [B,T,H,D], eta [B,T,H], ln_weight/ln_bias [H,D] -> o [B,T,H,D], final TTTMLPState.

    Runs in the inputs' dtype, one token at a time (slow: for tests)."""
    o, params, sums, offset = reference_loop(
        mlp_inner, q, k, v, eta, ln_weight, ln_bias, state.params, state.grads, state.offset, mini_batch_size,
        token_scale, eps,
    )
    return o, TTTMLPState(*params, *sums, offset)
