"""The decoding cache of TTTLMForCausalLM, a transformers `Cache` holding one `LayerCache` per block.

A recurrent mixer's cache has a fixed size whatever the context length: TTT keeps its op state (inner
weights, partial mini-batch gradient sums, the offset inside the mini-batch) and its convolution states, Mesa
its (h_kk, h_kv) and convolution states, Mamba2 its SSM and convolution states; attention keeps its keys and
values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformers.cache_utils import Cache


class LayerCache:
    """One block's decoding state, written by its mixer (and the TTT pre-conv) in place.

    conv: name -> [B, K-1, C], the last inputs of each short convolution.
    state: the mixer's recurrent state (an op state dataclass, a Tensor, or (k, v) for attention); None first.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self):
        self.conv: dict[str, Tensor] = {}
        self.state = None

    def map(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply fn to every tensor along the batch dim (reorder, select, repeat rows)."""
        self.conv = {k: fn(v) for k, v in self.conv.items()}
        s = self.state
        if isinstance(s, Tensor):
            self.state = fn(s)
        elif isinstance(s, tuple):
            self.state = tuple(fn(t) for t in s)
        elif s is not None:
            self.state = s.map(fn)

    def reset(self) -> None:
        self.conv, self.state = {}, None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: Tensor) -> None:
        self.map(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError("a recurrent state cannot be rolled back: TTTLMCache does not support crop")

    def tensors(self) -> list[Tensor]:
        """Every tensor this layer holds."""
        out = list(self.conv.values())
        s = self.state
        if isinstance(s, Tensor):
            out.append(s)
        elif isinstance(s, tuple):
            out.extend(s)
        elif s is not None:
            out.extend(getattr(s, f) for f in s.__dataclass_fields__)
        return out


class TTTLMCache(Cache):
    """The cache that `TTTLMForCausalLM.forward` creates when use_cache=True (generate() does so for you).

    seen_tokens: tokens read so far per row (all rows advance together; no padding).
    """

    def __init__(self, num_layers: int):
        super().__init__(layers=[LayerCache() for _ in range(num_layers)])
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.seen_tokens

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    def nbytes(self) -> int:
        """Bytes held by all layers' states (for checking that recurrent caches do not grow with context)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())
