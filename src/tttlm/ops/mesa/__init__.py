"""The Mesa layer's op (von Oswald et al. 2025, arXiv 2506.05233): regularised least squares at every token.

Per batch element and head:
    H_t = e^{g_t} H_{t-1} + beta_t k_t k_t^T        (D x D)
    G_t = e^{g_t} G_{t-1} + beta_t k_t v_t^T        (D x Dv)
    o_t = G_t^T (H_t + diag(lamb))^{-1} q_t
The solve is conjugate gradient from the Jacobi guess q / (diag(H_t) + lamb); gradients come from implicit
differentiation (one more CG solve with the same matrix), never from backpropagating through the CG steps.
`reference.mesa_ref` is the token-by-token spec. Backends: Triton kernels on CUDA (`triton_chunk`,
`triton_step`) where they support the shapes, else the chunkwise PyTorch path (`chunked`, `step`); both are
tested against the spec.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tttlm.ops.backend import use_triton
from tttlm.ops.mesa.checks import check_cu_seqlens, check_inputs, check_solver, check_state, io_dtypes
from tttlm.ops.mesa.chunked import mesa_chunked
from tttlm.ops.mesa.step import mesa_step_dense
from tttlm.ops.state import MesaState

__all__ = ["mesa", "mesa_step"]

KERNELS = "tttlm.ops.mesa.triton_chunk"


def mesa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    lamb: Tensor,
    state: MesaState | None = None,
    *,
    cg_max_iter: int = 30,
    cg_tol: float | None = None,
    cu_seqlens: Tensor | None = None,
    output_final_state: bool = False,
    cg_stats: dict | None = None,
    chunk_size: int = 64,
    backend: str | None = None,
) -> tuple[Tensor, MesaState | None]:
    """Mesa over full sequences, chunkwise.

    Args:
        q, k: [B,T,H,D] queries and keys (the layer L2-normalises them).
        v: [B,T,H,Dv] values.
        g: [B,T,H] log forget gate, <= 0 (e.g. logsigmoid of a projection).
        beta: [B,T,H] write strength of each token (e.g. sigmoid of a projection), >= 0 keeps H_t + diag(lamb)
            positive definite, which CG needs.
        lamb: [H,D] regulariser, > 0.
        state: initial MesaState (h_kk [N,H,D,D], h_kv [N,H,D,Dv]) or None for zeros. N = B, or the number of
            sequences of a packed batch. h_kk enters through its symmetric part (h_kk + h_kk^T) / 2.
        cg_max_iter: CG steps at most (>= 1), for the forward solve and again for the backward one.
        cg_tol: each query's CG stops at the first step where ||r|| <= cg_tol * ||r_0|| (r as CG's recurrence
            updates it), in the forward and again in the backward solve; None: every query takes cg_max_iter
            steps. The loop ends once every query has stopped (on the GPU, each chunk of queries decides on
            chip, with no host synchronisation).
        cu_seqlens: int64 [N+1] boundaries of the sequences packed along T (then B == 1), starting at 0 and
            ending at T; every sequence runs as if alone, with its own initial and final state.
        output_final_state: return the state after the last token (of each sequence).
        cg_stats: a dict that receives the forward solve's "iterations" (int, the most CG steps a query took),
            "mean_iterations" (float, the steps a query took on average) and "residual" ([B,H], or [1,H] when
            packed: the max over tokens of ||q_t - A_t x_t|| / ||q_t - A_t x0_t|| at the stop, A_t = H_t +
            diag(lamb), x0_t the Jacobi guess; 0 where the guess was exact). Filling it synchronises with the
            device.
        chunk_size: tokens per chunk. Only the states at chunk starts are kept (for the backward too): about
            T / chunk_size * H * D * (D + Dv) floats per batch row, besides O(T * H * (chunk_size + D)).
            The Triton kernels take 16, 32 or 64.
        backend: None picks the Triton kernels on CUDA (while `tttlm.fast` allows them) where they support the
            inputs (head dims up to 128, 16-bit or float32 inputs), else the PyTorch path; "triton" or "torch"
            forces one.

    Returns:
        o [B,T,H,Dv] in the promoted dtype of q, k, v, and the final MesaState (h_kk [N,H,D,D], h_kv
        [N,H,D,Dv]) or None.
    Inputs may be float16, bfloat16, float32 or float64 (autocast is turned off inside); the states and all
    reductions are float32, or float64 when q, k, v promote to float64.
    """
    check_inputs(q, k, v, g, beta, lamb, token_dim=True)
    check_solver(cg_max_iter, cg_tol)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    B, T, H, D = q.shape
    N = B
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
        N = cu_seqlens.numel() - 1
    check_state(state, N, H, D, v.shape[-1], q.device)
    # Autocast would run the inner products in bf16 and spoil the float32 states and solves.
    with torch.autocast(q.device.type, enabled=False):
        if use_triton(backend, KERNELS, q=q, k=k, v=v, chunk_size=chunk_size):
            from tttlm.ops.mesa.triton_chunk import mesa_triton

            return mesa_triton(
                q,
                k,
                v,
                g,
                beta,
                lamb,
                state,
                chunk_size=chunk_size,
                cg_max_iter=cg_max_iter,
                cg_tol=cg_tol,
                cu_seqlens=cu_seqlens,
                output_final_state=output_final_state,
                cg_stats=cg_stats,
            )
        return mesa_chunked(
            q,
            k,
            v,
            g,
            beta,
            lamb,
            state,
            chunk_size=chunk_size,
            cg_max_iter=cg_max_iter,
            cg_tol=cg_tol,
            cu_seqlens=cu_seqlens,
            output_final_state=output_final_state,
            cg_stats=cg_stats,
        )


def mesa_step(
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    g_t: Tensor,
    beta_t: Tensor,
    lamb: Tensor,
    state: MesaState | None,
    *,
    cg_max_iter: int = 30,
    cg_tol: float | None = None,
    cg_stats: dict | None = None,
    backend: str | None = None,
    inplace: bool = False,
) -> tuple[Tensor, MesaState]:
    """Mesa for one token (decoding): equal to `mesa` on the whole sequence, token after token.

    Args:
        q_t, k_t: [B,H,D]; v_t: [B,H,Dv]; g_t, beta_t: [B,H]; lamb: [H,D] > 0; g_t <= 0.
        state: MesaState (h_kk [B,H,D,D], h_kv [B,H,D,Dv]) before this token, or None for zeros.
        cg_max_iter, cg_tol, cg_stats, backend: as in `mesa` ("residual" is [B,H]). The Triton step runs
            without autograd only (decoding); with gradients wanted the PyTorch step runs.
        inplace: write the new state into `state`'s own tensors (contiguous, float32 or float64 as the new state,
            not requiring grad; written without autograd history) and return `state` itself.

    Returns:
        o_t [B,H,Dv] in the promoted dtype of q_t, k_t, v_t, and the state after this token (float32, or
        float64 when they promote to float64).
    """
    check_inputs(q_t, k_t, v_t, g_t, beta_t, lamb, token_dim=False)
    check_solver(cg_max_iter, cg_tol)
    B, H, D = q_t.shape
    check_state(state, B, H, D, v_t.shape[-1], q_t.device)
    if inplace:
        if state is None:
            raise ValueError("inplace=True writes the new state into `state`, which is None")
        state.check_in_place(io_dtypes(q_t, k_t, v_t)[1])
    with torch.autocast(q_t.device.type, enabled=False):
        if use_triton(backend, KERNELS, q=q_t, k=k_t, v=v_t, chunk_size=None):
            from tttlm.ops.mesa.triton_step import mesa_step_triton

            return mesa_step_triton(
                q_t, k_t, v_t, g_t, beta_t, lamb, state, cg_max_iter=cg_max_iter, cg_tol=cg_tol, cg_stats=cg_stats,
                inplace=inplace,
            )
        return mesa_step_dense(
            q_t, k_t, v_t, g_t, beta_t, lamb, state, cg_max_iter=cg_max_iter, cg_tol=cg_tol, cg_stats=cg_stats,
            inplace=inplace,
        )
