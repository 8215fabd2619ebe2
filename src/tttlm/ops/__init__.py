"""The sequence-mixing ops of tttlm: pure functions on tensors (layouts and math in DESIGN.md).

Sequences are [B, T, H, D]; per-token per-head scalars [B, T, H]; packed batches use cu_seqlens (B == 1).
Every op takes an initial state and can return its final state; `*_step` reads one token.
"""

from tttlm.ops.mesa import mesa, mesa_step
from tttlm.ops.state import MesaState, TTTLinearState, TTTMLPState
from tttlm.ops.ttt_linear import ttt_linear, ttt_linear_step
from tttlm.ops.ttt_mlp import ttt_mlp, ttt_mlp_step

__all__ = [
    "MesaState",
    "TTTLinearState",
    "TTTMLPState",
    "mesa",
    "mesa_step",
    "ttt_linear",
    "ttt_linear_step",
    "ttt_mlp",
    "ttt_mlp_step",
]
