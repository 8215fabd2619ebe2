"""Fast decoding: the model's step on a static TTTLMCache, captured in a CUDA graph.

A decode step of a small model is hundreds of small kernels; launched one by one from Python they cost far more
host time than GPU time. Here the cache's tensors live in buffers allocated once (`TTTLMCache.make_static`), the
step writes them in place and never waits for the host (Mesa's CG runs its fixed number of steps, attention
reads each row's valid length from memory), so the whole step is captured once in a CUDA graph; each later
token costs a copy of the new ids into the graph's input buffer and one replay. The graph replays every kernel
the step launches, so the blocks run compiled where `tttlm.fast` compiles them (on CUDA by default): the norms,
RoPE, gates and glue of a block fuse into a few kernels around the matrix products and the op's own step kernel.

`TTTLMForCausalLM.forward` routes every call that continues a cache through `plan`: on CUDA the graph by default
(generate() included), the eager per-layer path on CPU, static buffers without a graph when the graph cannot
apply (more than one token per call, inputs_embeds, a failed capture) or when the rows hold different numbers
of tokens (prompts of different lengths; only the static buffers know each row's position). Why a call does not
use the graph goes to logging.getLogger("tttlm") at debug level. `decode_step` is the step itself.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from tttlm.layers import SeqInfo
from tttlm.models.cache import TTTLMCache

log = logging.getLogger("tttlm")

CAPACITY_STEP = 256  # attention's static buffers grow in multiples of this many positions


def _note(cache: TTTLMCache, why: str) -> None:
    """Logs why a cache does not decode through the graph, once per reason and cache."""
    if getattr(cache, "_note", None) != why:
        cache._note = why
        log.debug("decoding without a CUDA graph: %s", why)


def plan(model, cache: TTTLMCache, T: int, with_ids: bool) -> str:
    """How a call of T new tokens continuing `cache` runs: "eager" (each layer's dynamic cache), "static"
    (static buffers, no graph) or "graph"."""
    cuda = model.device.type == "cuda"
    mode = ("graph" if cuda else "eager") if cache.decode == "auto" else cache.decode
    why = None
    if mode == "graph":
        if not cuda:
            why = f"the model is on {model.device.type}"
        elif T != 1:
            why = f"{T} tokens in one call (the graph reads one per row)"
        elif not with_ids:
            why = "inputs_embeds (the graph reads token ids)"
        elif torch.is_grad_enabled():
            why = "gradients are enabled (decode under torch.no_grad())"
        else:
            return "graph"
    elif cache.decode == "auto":
        why = f"the model is on {model.device.type}"
    if why is not None:
        _note(cache, why)
    # only static buffers know each row's own position (and a static cache stays static)
    ragged = cache.positions is not None or cache.is_static
    if not ragged and (mode == "eager" or (mode == "graph" and (T != 1 or torch.is_grad_enabled()))):
        return "eager"
    if torch.is_grad_enabled():
        raise ValueError(
            "decoding from a static cache (rows of different lengths, or decode='static' / 'graph') runs without "
            "gradients: call it under torch.no_grad()"
        )
    return "static"


def _capacity(needed: int) -> int:
    """Positions to allocate for `needed`: an eighth more (at least CAPACITY_STEP), in steps of CAPACITY_STEP."""
    room = needed + max(CAPACITY_STEP, needed // 8)
    return -(-room // CAPACITY_STEP) * CAPACITY_STEP


def decode_step(
    model, cache: TTTLMCache, input_ids: Tensor | None, inputs_embeds: Tensor | None = None, *, graph: bool = True,
    logits_to_keep: int = 0,
) -> Tensor:
    """Reads input_ids [B, T] (or inputs_embeds [B, T, C]) after the tokens `cache` holds, on static buffers (the
    cache is made static first, or grown when its attention buffers are full), through a CUDA graph when
    `graph` (T == 1, CUDA; see `plan`). Returns logits [B, T or logits_to_keep, V]; advances cache.positions
    and cache.seen_tokens."""
    x = input_ids if inputs_embeds is None else inputs_embeds
    B, T = x.shape[:2]
    needed = cache.seen_tokens + T
    if not cache.is_static or (cache.capacity is not None and cache.capacity < needed):
        cache.make_static(_capacity(needed))
    if B != cache.positions.shape[0]:
        raise ValueError(f"input_ids has {B} rows but the cache holds {cache.positions.shape[0]}")
    if graph:
        if cache.decoder is None or not cache.decoder.matches(model):
            cache.decoder = GraphStep(model, cache.positions.shape[0], cache.positions.device)
        logits = cache.decoder(cache, input_ids)
    else:
        logits = _step(model, cache, input_ids, inputs_embeds, logits_to_keep)
    cache.seen_tokens += T
    return logits


def _step(model, cache: TTTLMCache, input_ids: Tensor | None, inputs_embeds: Tensor | None, keep: int) -> Tensor:
    """The step on a static cache: every row continues at its own position."""
    x = model.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    T = x.shape[1]
    pos = cache.positions[:, None] + torch.arange(T, device=x.device)
    h = model.model(x, SeqInfo(pos), cache)
    cache.positions += T
    return model.lm_head(h[:, -keep:] if keep else h)


def _weights_key(model) -> tuple:
    """Where the first and the output weights live: model.to() (a new dtype or device) moves them all."""
    first, out = next(model.parameters()), model.lm_head.weight
    return first.data_ptr(), first.dtype, out.data_ptr()


def _autocast_state() -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")


class GraphStep:
    """One token per row of `model` on a static cache of `batch` rows, captured in a CUDA graph.

    The first call runs the step eagerly (on a side stream, which also warms up the kernels) and captures it
    for the next calls; each later call copies the ids into the graph's input buffer and replays it (on the
    same cache: the graph holds its buffers' addresses; the cache holds this object, not the reverse). Under
    autocast the step is captured with autocast's weight cache off (a cached cast would not be recorded).
    If the capture fails, the step keeps running eagerly on the same buffers (logged at debug level).
    """

    def __init__(self, model, batch: int, device: torch.device):
        self.model = model
        self.weights = _weights_key(model)
        self.autocast = _autocast_state()
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None  # the graph's output buffer
        self.failed = False

    def matches(self, model) -> bool:
        """Whether the graph still applies: same model, weights where they were, same autocast."""
        return self.model is model and self.weights == _weights_key(model) and self.autocast == _autocast_state()

    def _run(self, cache: TTTLMCache) -> Tensor:
        enabled, dtype = self.autocast
        with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
            return _step(self.model, cache, self.ids, None, 1)

    def __call__(self, cache: TTTLMCache, input_ids: Tensor) -> Tensor:
        """input_ids [B, 1] -> logits [B, 1, V] (a copy: the graph's buffer is overwritten by the next call)."""
        self.ids.copy_(input_ids)
        if self.graph is not None:
            self.graph.replay()
            return self.logits.clone()
        if self.failed:
            return self._run(cache)
        with torch.cuda.device(self.ids.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self._run(cache)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: CUDA calls of other threads (a streamer's, say) do not break the capture
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self.logits = self._run(cache)
                self.graph = graph
            except Exception as e:  # noqa: BLE001 (whatever stops the capture, the eager step stays right)
                self.failed = True
                _note(cache, f"the CUDA graph capture failed ({type(e).__name__}: {e})")
        return logits
