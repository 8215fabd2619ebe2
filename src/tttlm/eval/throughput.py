"""Throughput and latency of whole models: training tokens per second (forward, backward, fused AdamW step) at one or
more batch shapes, with model FLOPs utilisation and peak memory; prefill time of a context of L tokens; and the
time per generated token after a context of L tokens (decoding with the model's cache, one token per call: on CUDA
the step replayed from its CUDA graph, tttlm.models.decode). On CUDA every timing is bracketed by
torch.cuda.synchronize(); a shape that does not fit in memory is recorded as None.

Model FLOPs per token (PaLM's appendix B, as nanoGPT counts them): 6 N for the parameters' matrix products in
the forward and backward passes, N the parameter count with tied embeddings counted once (as the output
projection; the embedding lookup does no products), plus 12 L C T for softmax attention's scores and
weighted sums (L layers, width C, T tokens of context; not halved for causality), counted for attention
models only. Utilisation is model FLOPs per second over the device's bf16 matmul peak measured in the same run
(`peak_matmul_flops`).
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from tttlm.models.cache import TTTLMCache

PROFILE_TOP = 15  # kernels listed per profiled step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `repeats` calls of fn after `warmup` calls."""
    for _ in range(warmup):
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


def peak_matmul_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192,
                      repeats: int = 20) -> float | None:
    """The device's measured peak of dense matrix products, FLOP/s: the best of `repeats` n x n x n products
    in `dtype` (CUDA only; None elsewhere)."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b, out=out)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * n**3 / best


def flops_per_token(params: int, layers: int, width: int, seq_len: int, attention: bool) -> float:
    """Model FLOPs of one training token (see the module docstring)."""
    return 6 * params + (12 * layers * width * seq_len if attention else 0)


def _profile_step(step, device: torch.device) -> list[dict]:
    """The kernels of one call of step, by time on the device (CPU ops on the CPU): [{name, calls, ms}]."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    rows = []
    for e in prof.key_averages():
        if cuda:
            if e.device_type != DeviceType.CUDA:
                continue
            us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        else:
            us = e.self_cpu_time_total
        if us > 0:
            rows.append({"name": e.key, "calls": e.count, "ms": us / 1e3})
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    return [{**r, "share": r["ms"] / total} for r in rows[:PROFILE_TOP]] + [{"name": "(all)", "calls": sum(
        r["calls"] for r in rows), "ms": total, "share": 1.0}]


def measure_training(model, loss_of, batch_size: int, seq_len: int, dtype: torch.dtype, *, repeats: int = 3,
                     warmup: int = 2, profile: bool = False) -> dict:
    """Training steps (forward + backward + fused AdamW on CUDA) of `model` on random ids [batch_size, seq_len];
    loss_of(model, ids) gives the loss. Returns {"tokens_per_s", "step_ms", "peak_mem_gb" (CUDA, during the
    timed steps), "warmup_s" (the warm-up steps, compilation included), "profile" (with profile=True)}."""
    device = next(model.parameters()).device
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, seq_len), device=device)

    def step():
        with _autocast(device, dtype):
            loss = loss_of(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    res = {"warmup_s": time.perf_counter() - start}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = _timed(step, device, repeats, warmup=0)
    res.update(tokens_per_s=batch_size * seq_len / seconds, step_ms=1e3 * seconds)
    res["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if profile:
        res["profile"] = _profile_step(step, device)
    model.eval()
    return res


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
    prefilling `context` random tokens; the first decoded token is a warm-up (on CUDA it captures the step's
    CUDA graph) and not counted."""
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


def lm_loss(model, ids):
    """The training loss of a TTTLMForCausalLM on ids (labels = ids)."""
    return model(input_ids=ids, labels=ids).loss


def measure_model(
    model,
    *,
    shapes: list[tuple[int, int]],
    contexts: list[int],
    new_tokens: int,
    dtype: torch.dtype,
    repeats: int = 3,
    warmup: int = 2,
    profile: bool = False,
    peak_flops: float | None = None,
    loss_of=lm_loss,
    attention: bool | None = None,
) -> dict:
    """The measurements of one model: {"params", "train": {"BxT": measure_training's dict + "flops_per_token",
    "mfu" (None without peak_flops), or None where memory ran out}, "prefill_s": {L: s}, "decode_ms_per_token":
    {L: ms}}. loss_of(model, ids) is the training loss (default: a TTTLMForCausalLM's); attention: count
    attention's FLOPs (default: the model config's mixer is "transformer"). Prefill and decode need a tttlm
    model (its cache)."""
    config = model.config
    if attention is None:
        attention = config.mixer == "transformer"
    params = sum(p.numel() for p in model.parameters())
    res = {"params": params, "train": {}}
    for B, T in shapes:
        r = _guard(lambda B=B, T=T: measure_training(model, loss_of, B, T, dtype, repeats=repeats, warmup=warmup,
                                                     profile=profile))
        if r is not None:
            f = flops_per_token(params, config.num_hidden_layers, config.hidden_size, T, attention)
            r["flops_per_token"] = f
            r["mfu"] = None if peak_flops is None else r["tokens_per_s"] * f / peak_flops
        res["train"][f"{B}x{T}"] = r
    res["prefill_s"] = {L: _guard(lambda L=L: prefill_seconds(model, L, dtype, repeats)) for L in contexts}
    res["decode_ms_per_token"] = {}
    for L in contexts:
        s = _guard(lambda L=L: decode_seconds_per_token(model, L, new_tokens, dtype))
        res["decode_ms_per_token"][L] = None if s is None else 1e3 * s
    return res
