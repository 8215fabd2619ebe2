"""TTT-Linear (Sun et al. 2024, arXiv 2407.04620): the public op and its one-token step.

Backends: Triton kernels on CUDA (`triton_chunk`, `triton_step`) where they support the shapes, else the
dual-form PyTorch path (`chunked`). Both are tested against `reference.ttt_linear_ref`.
"""

from __future__ import annotations

from torch import Tensor

from tttlm.ops.backend import use_triton
from tttlm.ops.state import TTTLinearState
from tttlm.ops.ttt_common import check_ttt_inputs, compute_dtype
from tttlm.ops.ttt_linear.chunked import LINEAR, ttt_linear_chunked, ttt_linear_step_recurrent

KERNELS = "tttlm.ops.ttt_linear.triton_chunk"


def ttt_linear(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, ln_weight: Tensor, ln_bias: Tensor, state: TTTLinearState, *,
    mini_batch_size: int = 16, token_scale: Tensor | None = None, eps: float = 1e-6,
    cu_seqlens: Tensor | None = None, output_final_state: bool = False, backend: str | None = None,
) -> tuple[Tensor, TTTLinearState | None]:
    """TTT-Linear over whole sequences.

    The inner model f(x; W, b) = x + LN(x W + b) (LN per head with ln_weight[h], ln_bias[h]) takes one step of
    mini-batch gradient descent on l_j = 1/2 ||f(k_j) - v_j||^2 per mini-batch of `mini_batch_size` tokens,
    every gradient at the mini-batch's starting weights; token i reads out f(q_i) with the weights
    W - s_i sum_{j<=i} eta_j grad l_j of its position in the mini-batch.

    Args:
        q, k, v: [B, T, H, D], float16/bfloat16/float32/float64.
        eta: [B, T, H], inner learning rate of each token, >= 0.
        ln_weight, ln_bias: [H, D], the inner LayerNorm.
        state: TTTLinearState with N rows (N = B, or the number of sequences with cu_seqlens):
            `TTTLinearState.start(W0, b0)` at the start of sequences, or a final state of an earlier call.
        mini_batch_size: tokens per inner gradient step (the paper: 16).
        token_scale: [mini_batch_size], s_i by position in the mini-batch; default 1/(i+1).
        eps: the inner LayerNorm's epsilon.
        cu_seqlens: int64 [N+1] to pack N sequences into one row (B == 1); each starts from its own state row.
        output_final_state: also return the state after the last token.
        backend: None picks Triton on CUDA (while `tttlm.fast` allows it) where supported, else PyTorch;
            "triton" or "torch" forces one.

    Returns:
        o: [B, T, H, D] in q's dtype; the final TTTLinearState (float32, or float64 for float64 inputs) or None.
    """
    check_ttt_inputs(q, k, v, eta, ln_weight, ln_bias, state, TTTLinearState, LINEAR.param_shapes,
                     mini_batch_size, token_scale, cu_seqlens)
    kwargs = dict(mini_batch_size=mini_batch_size, token_scale=token_scale, eps=eps, cu_seqlens=cu_seqlens,
                  output_final_state=output_final_state)
    if use_triton(backend, KERNELS, q=q, mini_batch_size=mini_batch_size):
        from tttlm.ops.ttt_linear.triton_chunk import ttt_linear_triton

        return ttt_linear_triton(q, k, v, eta, ln_weight, ln_bias, state, **kwargs)
    return ttt_linear_chunked(q, k, v, eta, ln_weight, ln_bias, state, **kwargs)


def ttt_linear_step(
    q_t: Tensor, k_t: Tensor, v_t: Tensor, eta_t: Tensor, ln_weight: Tensor, ln_bias: Tensor,
    state: TTTLinearState, *, mini_batch_size: int = 16, token_scale: Tensor | None = None, eps: float = 1e-6,
    backend: str | None = None, inplace: bool = False,
) -> tuple[Tensor, TTTLinearState]:
    """One token of TTT-Linear: equal to `ttt_linear` read token by token.

    q_t, k_t, v_t [B, H, D], eta_t [B, H], the rest as in `ttt_linear`. Returns o_t [B, H, D] and the new state.
    inplace: write the new state into `state`'s own tensors (without autograd history) and return `state` itself,
    e.g. for a decoding cache whose buffers must keep their addresses; its tensors must be contiguous, float32 (float64
    for float64 inputs) and not require grad, and the old state is gone.
    """
    check_ttt_inputs(q_t, k_t, v_t, eta_t, ln_weight, ln_bias, state, TTTLinearState, LINEAR.param_shapes,
                     mini_batch_size, token_scale, None, step=True)
    if inplace:
        state.check_in_place(compute_dtype(q_t.dtype))
    kwargs = dict(mini_batch_size=mini_batch_size, token_scale=token_scale, eps=eps, inplace=inplace)
    if use_triton(backend, KERNELS, q=q_t, mini_batch_size=mini_batch_size):
        from tttlm.ops.ttt_linear.triton_step import ttt_linear_step_triton

        return ttt_linear_step_triton(q_t, k_t, v_t, eta_t, ln_weight, ln_bias, state, **kwargs)
    return ttt_linear_step_recurrent(q_t, k_t, v_t, eta_t, ln_weight, ln_bias, state, **kwargs)
