"""nn.Modules around the ops: each mixer builds its op's inputs from x [B, T, C] and calls the op.

Every mixer has forward(x, info: SeqInfo, cache=None) -> [B, T, C]; `cache` is one layer's decoding state
(`tttlm.models.cache.LayerCache`), updated in place.
"""

from tttlm.layers.attention import AttentionMixer
from tttlm.layers.common import Linear, RMSNorm, SeqInfo, ShortConv, SwiGLU, rope, rope_tables
from tttlm.layers.mamba import MambaMixer
from tttlm.layers.mamba2 import Mamba2Mixer
from tttlm.layers.mesa import MesaMixer
from tttlm.layers.ttt import PreConv, TTTMixer

__all__ = [
    "AttentionMixer",
    "Linear",
    "Mamba2Mixer",
    "MambaMixer",
    "MesaMixer",
    "PreConv",
    "RMSNorm",
    "SeqInfo",
    "ShortConv",
    "SwiGLU",
    "TTTMixer",
    "rope",
    "rope_tables",
]
