"""The decoding cache of TTTLMForCausalLM, a transformers `Cache` holding one `LayerCache` per block.

A recurrent mixer's cache has a fixed size whatever the context length: TTT keeps its op state (inner
weights, partial mini-batch gradient sums, the offset inside the mini-batch) and its convolution states, Mesa
its (h_kk, h_kv) and convolution states, Mamba2 its SSM and convolution states; attention keeps its keys and
values.

A cache is dynamic at first (each call replaces the states, keys and values grow by concatenation) and becomes
static for fast decoding (`TTTLMCache.make_static`, see tttlm.models.decode): every tensor then lives in a
buffer allocated once, written in place, so that a CUDA graph can replay the decode step; attention's buffers
hold a fixed capacity of positions and every row its own number of tokens (`TTTLMCache.positions`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformers.cache_utils import Cache

DECODE_MODES = ("auto", "eager", "static", "graph")


def _state_tensors(s) -> list[Tensor]:
    """The tensors of a mixer state: a Tensor, a tuple (attention's keys and values) or an op state dataclass."""
    if s is None:
        return []
    if isinstance(s, Tensor):
        return [s]
    if isinstance(s, tuple):
        return list(s)
    return [getattr(s, f) for f in s.__dataclass_fields__]


class LayerCache:
    """One block's decoding state, written by its mixer (and the TTT pre-conv) in place.

    conv: name -> [B, K-1, C], the last inputs of each short convolution.
    state: the mixer's recurrent state (an op state dataclass, a Tensor, or (k, v) [B, S, H, D] for attention);
        None first.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False
    static = False  # see StaticLayerCache

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
        return list(self.conv.values()) + _state_tensors(self.state)


class _CopyingDict(dict):
    """Convolution states of a static layer: assigning an entry copies into its buffer."""

    def __setitem__(self, key: str, value: Tensor) -> None:
        self[key].copy_(value)

    def update(self, other: dict[str, Tensor]) -> None:
        for key, value in other.items():
            self[key] = value


class StaticLayerCache(LayerCache):
    """A LayerCache whose tensors are buffers allocated once: assigning `state` or a `conv` entry copies into
    them, so their addresses never change (a captured CUDA graph keeps reading and writing the same memory).
    Assigning the state object it holds copies nothing: Mesa's step writes it in place (`inplace=True`).

    Attention's keys and values are [B, capacity, H, D] buffers (zeros past what was copied in), written at each
    row's position by the mixer itself. Mesa's mixer solves with its fixed number of CG steps on a static cache
    (`mesa_cg_tol` would need the host to decide when to stop).
    """

    static = True

    def __init__(self, layer: LayerCache, capacity: int):
        """A static copy of `layer` (dynamic or static); attention's buffers get room for `capacity` positions."""
        self._conv = _CopyingDict({k: v.clone() for k, v in layer.conv.items()})
        s = layer.state
        if isinstance(s, tuple):
            s = tuple(_with_capacity(t, capacity) for t in s)
        elif isinstance(s, Tensor):
            s = s.clone()
        elif s is not None:  # contiguous: Mesa's step writes its state in place (`inplace=True`)
            s = s.map(lambda t: t.clone(memory_format=torch.contiguous_format))
        self._state = s

    @property
    def conv(self) -> dict[str, Tensor]:
        return self._conv

    @property
    def state(self):
        return self._state

    @state.setter
    def state(self, new) -> None:
        if new is not self._state:
            for dst, src in zip(_state_tensors(self._state), _state_tensors(new), strict=True):
                dst.copy_(src)

    @property
    def capacity(self) -> int | None:
        """Positions per row of attention's buffers (None for a recurrent layer)."""
        return self._state[0].shape[1] if isinstance(self._state, tuple) else None

    def map(self, fn: Callable[[Tensor], Tensor]) -> None:
        """fn applied to every buffer: in place where the shapes stay (a reorder of rows), else into new buffers
        (rows selected or repeated; the TTTLMCache then drops its captured graph)."""
        old = self.tensors()
        new = [fn(t) for t in old]
        if all(n.shape == o.shape for n, o in zip(new, old, strict=True)):
            for o, n in zip(old, new, strict=True):
                o.copy_(n)
            return
        n = len(self._conv)
        self._conv = _CopyingDict(zip(self._conv, new[:n]))
        s = self._state
        self._state = new[n] if isinstance(s, Tensor) else tuple(new[n:]) if isinstance(s, tuple) else type(s)(*new[n:])

    def reset(self) -> None:
        raise ValueError("a static layer cache cannot be reset: reset its TTTLMCache")


def _with_capacity(t: Tensor, capacity: int) -> Tensor:
    """t [B, S, ...] copied into zeros [B, capacity, ...] (capacity >= S)."""
    if capacity < t.shape[1]:
        raise ValueError(f"capacity {capacity} is below the {t.shape[1]} positions held")
    out = t.new_zeros(t.shape[0], capacity, *t.shape[2:])
    out[:, : t.shape[1]] = t
    return out


class TTTLMCache(Cache):
    """The cache that `TTTLMForCausalLM.forward` creates when use_cache=True (generate() does so for you).

    seen_tokens: columns of input read so far (with left padding, padding included).
    positions: None while every row has read seen_tokens tokens; else int64 [B], the tokens each row has read
        (after a prefill of prompts of different lengths, and always once static).
    decode: how single-token calls run, see `tttlm.models.decode`: "auto" (a CUDA graph on CUDA, the eager
        path elsewhere), "eager", "static" (static buffers without a graph: the graph path's logic, any device)
        or "graph".
    """

    def __init__(self, num_layers: int, decode: str = "auto"):
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
        super().__init__(layers=[LayerCache() for _ in range(num_layers)])
        self.decode = decode
        self.seen_tokens = 0
        self.positions: Tensor | None = None
        self.decoder = None  # the captured decode step (tttlm.models.decode.GraphStep), made on first use

    @property
    def is_static(self) -> bool:
        return bool(self.layers) and self.layers[0].static

    @property
    def capacity(self) -> int | None:
        """Positions per row of the static attention buffers (None: dynamic, or no attention layer)."""
        caps = [layer.capacity for layer in self.layers if layer.static and layer.capacity is not None]
        return caps[0] if caps else None

    def make_static(self, capacity: int) -> None:
        """Moves every layer's tensors into static buffers, attention's with room for `capacity` positions per
        row, and the per-row positions into one [B] buffer (a static cache is copied again: to grow)."""
        if self.positions is None:
            t = next(t for layer in self.layers for t in layer.tensors())
            self.positions = torch.full((t.shape[0],), self.seen_tokens, dtype=torch.long, device=t.device)
        self.positions = self.positions.clone()
        self.layers = [StaticLayerCache(layer, capacity) for layer in self.layers]
        self.decoder = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.seen_tokens

    def reset(self) -> None:
        self.layers = [LayerCache() for _ in self.layers]
        self.seen_tokens = 0
        self.positions = None
        self.decoder = None

    def _map_positions(self, fn: Callable[[Tensor], Tensor]) -> None:
        if self.positions is None:
            return
        new = fn(self.positions)
        if self.is_static and new.shape == self.positions.shape:
            self.positions.copy_(new)  # keeps the captured graph's buffer
        else:
            self.positions = new

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_positions(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_positions(lambda t: t[indices])
        self.decoder = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_positions(lambda t: t.repeat_interleave(repeats, dim=0))
        self.decoder = None

    def nbytes(self) -> int:
        """Bytes held by all layers' states (for checking that recurrent caches do not grow with context)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())
