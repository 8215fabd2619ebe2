"""Decode and prefill speed of whole models on one GPU, every mixer in one run; print a table, write JSON.

Each mixer's preset (default 125m) with bf16 weights, under torch.no_grad():
- decode: ms per generated token at batch 1 and tokens/s at batch 64 after a context of 2k, 8k and 32k tokens,
  through the CUDA graph of tttlm.models.decode (one copy of the new ids and one replay per token; greedy, each
  step's argmax is the next input), and at batch 1 the same static step without the graph;
- prefill: the time of one forward call over a context of each length at batch 1 that builds the cache;
- the GPU kernels (and copies) one step launches, counted by the profiler at batch 1 after all timings: the
  graph replays them one after another, so their number sets the floor of a step's time.

The decode timing starts from a static cache filled with random values of the right shapes (TTT's inner
weights, gradient sums and mini-batch offsets; Mesa's statistics, h_kk made positive definite; Mamba2's SSM and
convolution states; the Transformer's keys and values at `context` positions), not from a real prefill: a step's
work does not depend on the values (Mesa's CG runs its fixed number of steps), and prefilling 64 rows of 32k
tokens per mixer would cost minutes. Rows not reached before --budget seconds are recorded as skipped; the JSON
is written again after every row, so a run stopped from outside keeps what it measured. A call with a cache
runs its blocks uncompiled; the TTT ops' PyTorch paths (where their Triton kernels do not apply) are compiled on
CUDA unless TTTLM_COMPILE=0 (`compile` in the JSON).

    python benchmarks/gpu_decode.py [--json OUT.json] [--mixers ...] [--contexts 2048 8192 32768]
        [--batches 1 64] [--steps 50] [--budget 240]
    tttlm bench decode [the same arguments]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time

import torch

from tttlm.fast import compile_enabled
from tttlm.models import MIXERS, TTTLMCache, build_model, decode
from tttlm.models.modeling import CACHE_FIELD
from tttlm.ops import MesaState

CONTEXTS = (2048, 8192, 32768)
BATCHES = (1, 64)
PREFILL_ORDER = ("transformer", "ttt_linear", "mamba", "mamba2", "mesa", "ttt_mlp")  # slow PyTorch prefills last


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_cache(model, batch: int, context: int, room: int) -> TTTLMCache:
    """A static cache of `batch` rows that have each read `context` tokens, with random states, and room for
    `room` more positions."""
    cache = TTTLMCache(model.config.num_hidden_layers, decode="graph")
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=model.device)
    model(ids, use_cache=True, **{CACHE_FIELD: cache})  # only for the states' shapes
    cache.seen_tokens = context
    cache.make_static(context + room)  # every row at position `context`
    for layer in cache.layers:
        for t in layer.tensors():
            if t.is_floating_point():
                t.normal_(0.0, 0.02)
            else:  # TTT's offsets inside the mini-batch
                t.random_(0, model.config.mini_batch_size)
        if isinstance(layer.state, MesaState):
            h = layer.state.h_kk
            h.copy_(h @ h.mT)
    return cache


def time_decode(model, batch: int, context: int, steps: int, graph: bool) -> dict:
    """Decode speed from a random cache: ms_per_token, tokens_per_s, and whether the graph was used."""
    cache = random_cache(model, batch, context, steps + 8)
    tok = torch.randint(0, model.config.vocab_size, (batch, 1), device=model.device)
    for _ in range(3):  # the first call captures the graph
        tok = decode.decode_step(model, cache, tok, graph=graph)[:, -1].argmax(-1, keepdim=True)
    _sync(model.device)
    start = time.perf_counter()
    for _ in range(steps):
        tok = decode.decode_step(model, cache, tok, graph=graph)[:, -1].argmax(-1, keepdim=True)
    _sync(model.device)
    seconds = (time.perf_counter() - start) / steps
    captured = graph and cache.decoder is not None and cache.decoder.graph is not None
    return dict(ms_per_token=1e3 * seconds, tokens_per_s=batch / seconds, graph=captured)


def kernels_per_step(model, context: int) -> int:
    """GPU kernels and copies of one decode step at batch 1 without the graph, as the profiler records them."""
    from torch.profiler import ProfilerActivity, profile

    cache = random_cache(model, 1, context, 4)
    tok = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    decode.decode_step(model, cache, tok, graph=False)
    _sync(model.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decode.decode_step(model, cache, tok, graph=False)
        _sync(model.device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def time_prefill(model, context: int, repeats: int) -> float:
    """Median ms of one forward over `context` random tokens (batch 1) that builds the decoding cache."""
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=model.device)

    def run():
        cache = TTTLMCache(model.config.num_hidden_layers)
        model(ids, use_cache=True, logits_to_keep=1, **{CACHE_FIELD: cache})

    run()
    times = []
    for _ in range(repeats):
        _sync(model.device)
        start = time.perf_counter()
        run()
        _sync(model.device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _measure(fn):
    """fn()'s result, or {"error": ...} (out of memory included) so that one failure never loses the run."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 (reported in the row)
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    finally:
        gc.collect()  # a 64-row cache of 32k positions holds tens of GB: free it before the next row
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _rounded(row: dict) -> dict:
    out = dict(row)
    for k in ("ms_per_token", "nograph_ms_per_token", "prefill_ms"):
        if out.get(k) is not None:
            out[k] = round(out[k], 4)
    if out.get("tokens_per_s") is not None:
        out["tokens_per_s"] = round(out["tokens_per_s"])
    return out


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def print_table(rows: list[dict], mixers, contexts, batches) -> None:
    big = max(batches)
    print(f"\n| mixer | context | ms/token, batch 1 (graph) | without graph | kernels per step | tokens/s, batch {big} "
          "| prefill ms |")
    print("|---|---|---|---|---|---|---|")
    by = {(r["mixer"], r["context"], r["batch"]): r for r in rows}
    for m in mixers:
        for L in contexts:
            one, many = by.get((m, L, 1), {}), by.get((m, L, big), {})
            print(f"| {m} | {L} | {_fmt(one.get('ms_per_token'), '.3f')} | "
                  f"{_fmt(one.get('nograph_ms_per_token'), '.2f')} | {_fmt(one.get('kernels_per_step'), 'd')} | "
                  f"{_fmt(many.get('tokens_per_s'), ',.0f')} | "
                  f"{_fmt(one.get('prefill_ms'), '.1f')} |")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--size", default="125m", help="preset size")
    p.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=MIXERS)
    p.add_argument("--contexts", nargs="+", type=int, default=list(CONTEXTS))
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    p.add_argument("--steps", type=int, default=50, help="timed decode steps per row")
    p.add_argument("--nograph-steps", type=int, default=5, help="timed steps without the graph at batch 1 (0: skip)")
    p.add_argument("--prefill-repeats", type=int, default=2)
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--budget", type=float, default=240.0, help="seconds; rows not started by then are skipped")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a quick check of the script (no graph)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_decode: needs a CUDA GPU", file=sys.stderr)
        return 2
    graph = device.type == "cuda"
    deadline = time.monotonic() + args.budget
    torch.manual_seed(0)
    out = dict(
        device=torch.cuda.get_device_name(device) if graph else "cpu",
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        command=" ".join(["python benchmarks/gpu_decode.py", *argv]),
        torch=torch.__version__,
        size=args.size,
        dtype="bfloat16",
        decode_start="random static states of the right shapes, not a real prefill",
        compile=compile_enabled(device),
        rows=[],
    )
    rows = {}

    def save(row: dict) -> None:
        print(json.dumps(row), flush=True)
        out["rows"] = [_rounded(rows[k]) for k in sorted(rows, key=lambda k: (args.mixers.index(k[0]), k[1], k[2]))]
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    print(f"{out['device']}, torch {out['torch']}, {args.size} presets, bf16; decode from random states", flush=True)
    models = {}
    for m in args.mixers:
        with device:
            models[m] = build_model(f"{m}-{args.size}").to(torch.bfloat16).eval()
    with torch.no_grad():
        for B in sorted(args.batches):
            for L in args.contexts:
                for m in args.mixers:
                    row = rows.setdefault((m, L, B), dict(mixer=m, context=L, batch=B))
                    if time.monotonic() > deadline:
                        row["note"] = "skipped: time budget"
                        save(row)
                        continue
                    row.update(_measure(lambda m=m, L=L, B=B: time_decode(models[m], B, L, args.steps, graph)))
                    if B == 1 and graph and args.nograph_steps and "error" not in row:
                        res = _measure(lambda m=m, L=L: time_decode(models[m], 1, L, args.nograph_steps, False))
                        row["nograph_ms_per_token"] = res.get("ms_per_token")
                    save(row)
        for L in () if args.no_prefill else args.contexts:
            for m in sorted(args.mixers, key=PREFILL_ORDER.index):
                row = rows.setdefault((m, L, 1), dict(mixer=m, context=L, batch=1))
                if time.monotonic() > deadline:
                    row["prefill_note"] = "skipped: time budget"
                    save(row)
                    continue
                res = _measure(lambda m=m, L=L: dict(prefill_ms=time_prefill(models[m], L, args.prefill_repeats)))
                row.update(res if "error" not in res else {"prefill_error": res["error"]})
                save(row)
        # last: the profiler must not run before (or during) any timing or capture
        for m in args.mixers if graph else ():
            res = _measure(lambda m=m: dict(kernels_per_step=kernels_per_step(models[m], args.contexts[0])))
            for L in args.contexts:
                rows.setdefault((m, L, 1), dict(mixer=m, context=L, batch=1))["kernels_per_step"] = res.get(
                    "kernels_per_step")
            save(dict(mixer=m, **res))
    print_table(out["rows"], args.mixers, args.contexts, args.batches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
