"""TTT-Linear as the paper writes it (Sun et al. 2024, arXiv 2407.04620, §2): the spec the fast paths are tested
against. The inner model is f(x; W, b) = x + LN(x W + b); the inner loop (mini-batch gradient descent on
l_j = 1/2 ||f(k_j) - v_j||^2, gradients by autograd) is `tttlm.ops.ttt_common.reference_loop`."""

from __future__ import annotations

from torch import Tensor

from tttlm.ops.state import TTTLinearState
from tttlm.ops.ttt_common import ln_fwd, reference_loop


def linear_inner(params: tuple[Tensor, Tensor], X: Tensor, ln_w: Tensor, ln_b: Tensor, eps: float) -> Tensor:
    """f(X) = X + LN(X W + b). W [R,H,D,D], b [R,H,D], X [R,H,t,D], ln_w/ln_b [H,1,D] -> [R,H,t,D]."""
    W, b = params
    return X + ln_fwd(X @ W + b[..., None, :], ln_w, ln_b, eps)[0]


def ttt_linear_ref(q, k, v, eta, ln_weight, ln_bias, state: TTTLinearState, *, mini_batch_size=16, token_scale=None,
                   eps=1e-6):
    """q, k, v [B,T,H,D], eta [B,T,H], ln_weight/ln_bias [H,D] -> o [B,T,H,D], final TTTLinearState.

    Runs in the inputs' dtype, one token at a time (slow: for tests)."""
    o, params, sums, offset = reference_loop(
        linear_inner, q, k, v, eta, ln_weight, ln_bias, state.params, state.grads, state.offset, mini_batch_size,
        token_scale, eps,
    )
    return o, TTTLinearState(*params, *sums, offset)
