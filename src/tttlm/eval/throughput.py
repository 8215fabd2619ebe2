"""Throughput and latency of whole models: training tokens per second (forward, backward, AdamW step), prefill
time of a context of L tokens, and the time per generated token after a context of L tokens (decoding with the
model's cache, one token per call). On CUDA every timing is bracketed by torch.cuda.synchronize(); a size that
does not fit in memory is recorded as None."""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from tttlm.models.cache import TTTLMCache


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` calls of fn after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _guard(fn):
    """fn() or None when it runs out of memory (the cache is emptied for the next measurement)."""
    try:
        return fn()
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
        if not _out_of_memory(e):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def training_tokens_per_second(model, batch_size: int, seq_len: int, dtype: torch.dtype, repeats: int = 3) -> float:
    """Tokens per second of training steps (forward + backward + AdamW), random ids [batch_size, seq_len]."""
    device = next(model.parameters()).device
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), device=device)

    def step():
        with _autocast(device, dtype):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = _timed(step, device, repeats)
    model.eval()
    return batch_size * seq_len / seconds


@torch.no_grad()
def prefill_seconds(model, context: int, dtype: torch.dtype, repeats: int = 3) -> float:
    """Seconds to read a context of `context` random tokens (batch 1) and build the decoding cache."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)

    def prefill():
        with _autocast(device, dtype):
            model(input_ids=ids, use_cache=True, logits_to_keep=1)

    return _timed(prefill, device, repeats)


@torch.no_grad()
def decode_seconds_per_token(model, context: int, new_tokens: int, dtype: torch.dtype) -> float:
    """Mean seconds per generated token (batch 1, one forward call per token with the cache, greedy) after
    prefilling `context` random tokens; the first decoded token is a warm-up and not counted."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    cache = TTTLMCache(model.config.num_hidden_layers)  # updated in place by every call
    with _autocast(device, dtype):
        tok = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        tok = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            tok = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        _sync(device)
    return (time.perf_counter() - start) / new_tokens


def measure_model(
    model,
    *,
    contexts: list[int],
    train_batch: int,
    train_seq_len: int,
    new_tokens: int,
    dtype: torch.dtype,
    repeats: int = 3,
) -> dict:
    """All three measurements of one model: {"params", "train_tokens_per_s", "prefill_s": {L: s},
    "decode_ms_per_token": {L: ms}} (None where memory ran out)."""
    res = {"params": sum(p.numel() for p in model.parameters())}
    res["train_tokens_per_s"] = _guard(
        lambda: training_tokens_per_second(model, train_batch, train_seq_len, dtype, repeats)
    )
    res["prefill_s"] = {L: _guard(lambda L=L: prefill_seconds(model, L, dtype, repeats)) for L in contexts}
    res["decode_ms_per_token"] = {}
    for L in contexts:
        s = _guard(lambda L=L: decode_seconds_per_token(model, L, new_tokens, dtype))
        res["decode_ms_per_token"][L] = None if s is None else 1e3 * s
    return res
