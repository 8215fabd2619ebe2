"""Decode and prefill speed of whole models on one GPU, every mixer in one run; print a table, write JSON.

Each mixer's preset (default 125m) with bf16 weights, under torch.no_grad():
- decode: ms per generated token at batch 1 and tokens/s at batch 64 after a context of 2k, 8k and 32k tokens,
  through the CUDA graph of tttlm.models.decode (one copy of the new ids and one replay per token; greedy, each
  step's argmax is the next input), the step's blocks compiled (tttlm.fast's compile switch: on by default on
  CUDA, off with --no-compile or TTTLM_COMPILE=0); at batch 1 also the graph of the uncompiled step (--plain-steps
  tokens), with the relative difference of the two steps' first logits from the same states (`plain_rel_err`);
- the first step's seconds (`first_step_s`: compilation where the row is the first of its mixer and batch shape,
  and the graph's capture), and the prefill's first call (`prefill_first_s`): compilation counts against --budget;
- prefill: the time of one forward call over a context of each length at batch 1 that builds the cache (compiled
  blocks, as decoding);
- the GPU kernels (and copies) one step launches, compiled and not, counted by the profiler at batch 1 after all
  timings: the graph replays them one after another, so their number sets the floor of a step's time.

The decode timing starts from a static cache filled with random values of the right shapes (TTT's inner
weights, gradient sums and mini-batch offsets; Mesa's statistics, h_kk made positive definite; Mamba2's SSM and
convolution states; the Transformer's keys and values at `context` positions), not from a real prefill: a step's
work does not depend on the values (Mesa's CG runs its fixed number of steps), and prefilling 64 rows of 32k
tokens per mixer would cost minutes. The rows the issue's targets name run first (batch 1 at the first context,
the largest batch and the prefill at the longest); rows not reached before --budget seconds are recorded as
skipped; the JSON is written again after every row, so a run stopped from outside keeps what it measured.

    python benchmarks/gpu_decode.py [--json OUT.json] [--mixers ...] [--contexts 2048 8192 32768]
        [--batches 1 64] [--steps 50] [--plain-steps 10] [--budget 240] [--no-compile]
    tttlm bench decode [the same arguments]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import statistics
import sys
import time

import torch

from tttlm.fast import compile_enabled, fast_paths
from tttlm.models import MIXERS, TTTLMCache, build_model, decode
from tttlm.models.modeling import CACHE_FIELD
from tttlm.ops import MesaState

CONTEXTS = (2048, 8192, 32768)
BATCHES = (1, 64)
PREFILL_ORDER = ("transformer", "ttt_linear", "mamba", "mamba2", "mesa", "ttt_mlp")  # slow PyTorch prefills last


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_cache(model, batch: int, context: int, room: int, seed: int = 0) -> TTTLMCache:
    """A static cache of `batch` rows that have each read `context` tokens, with random states (the same for the
    same seed), and room for `room` more positions."""
    cache = TTTLMCache(model.config.num_hidden_layers, decode="graph")
    ids = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
    with fast_paths(compile=False):  # only for the states' shapes: nothing to compile for
        model(ids, use_cache=True, **{CACHE_FIELD: cache})
    cache.seen_tokens = context
    cache.make_static(context + room)  # every row at position `context`
    gen = torch.Generator(model.device).manual_seed(seed)
    for layer in cache.layers:
        for t in layer.tensors():
            if t.is_floating_point():
                t.normal_(0.0, 0.02, generator=gen)
            else:  # TTT's offsets inside the mini-batch
                t.random_(0, model.config.mini_batch_size, generator=gen)
        if isinstance(layer.state, MesaState):
            h = layer.state.h_kk
            h.copy_(h @ h.mT)
    return cache


def time_decode(model, batch: int, context: int, steps: int, graph: bool) -> dict:
    """Decode speed from a random cache: ms_per_token, tokens_per_s, whether the graph was used, the first step's
    seconds (compilation and capture included) and its logits [batch, V] (float32, not a JSON field)."""
    cache = random_cache(model, batch, context, steps + 8)
    tok = torch.arange(batch, device=model.device)[:, None] % model.config.vocab_size
    _sync(model.device)
    start = time.perf_counter()
    first = decode.decode_step(model, cache, tok, graph=graph)[:, -1]  # compiles (once) and captures the graph
    _sync(model.device)
    first_s = time.perf_counter() - start
    tok = first.argmax(-1, keepdim=True)
    for _ in range(2):
        tok = decode.decode_step(model, cache, tok, graph=graph)[:, -1].argmax(-1, keepdim=True)
    _sync(model.device)
    start = time.perf_counter()
    for _ in range(steps):
        tok = decode.decode_step(model, cache, tok, graph=graph)[:, -1].argmax(-1, keepdim=True)
    _sync(model.device)
    seconds = (time.perf_counter() - start) / steps
    captured = graph and cache.decoder is not None and cache.decoder.graph is not None
    return dict(ms_per_token=1e3 * seconds, tokens_per_s=batch / seconds, graph=captured, first_step_s=first_s,
                logits=first.float())


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


def time_prefill(model, context: int, repeats: int) -> dict:
    """prefill_ms: the median ms of one forward over `context` random tokens (batch 1) that builds the decoding
    cache; prefill_first_s: the first call's seconds (compilation included)."""
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=model.device)

    def run() -> float:
        _sync(model.device)
        start = time.perf_counter()
        cache = TTTLMCache(model.config.num_hidden_layers)
        model(ids, use_cache=True, logits_to_keep=1, **{CACHE_FIELD: cache})
        _sync(model.device)
        return time.perf_counter() - start

    first = run()
    times = [run() for _ in range(repeats)]
    return dict(prefill_ms=1e3 * statistics.median(times), prefill_first_s=first)


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
    for k in ("ms_per_token", "plain_ms_per_token", "prefill_ms", "first_step_s", "prefill_first_s"):
        if out.get(k) is not None:
            out[k] = round(out[k], 4)
    if out.get("plain_rel_err") is not None:
        out["plain_rel_err"] = float(f"{out['plain_rel_err']:.3g}")
    if out.get("tokens_per_s") is not None:
        out["tokens_per_s"] = round(out["tokens_per_s"])
    return out


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def print_table(rows: list[dict], mixers, contexts, batches) -> None:
    big = max(batches)
    print(f"\n| mixer | context | ms/token, batch 1 | uncompiled | kernels per step (uncompiled) "
          f"| tokens/s, batch {big} | prefill ms | first step s, batch 1 / {big} | first prefill s |")
    print("|---|---|---|---|---|---|---|---|---|")
    by = {(r["mixer"], r["context"], r["batch"]): r for r in rows}
    for m in mixers:
        for L in contexts:
            one, many = by.get((m, L, 1), {}), by.get((m, L, big), {})
            kernels = _fmt(one.get("kernels_per_step"), "d")
            if one.get("plain_kernels_per_step") is not None:
                kernels += f" ({one['plain_kernels_per_step']})"
            print(f"| {m} | {L} | {_fmt(one.get('ms_per_token'), '.3f')} | "
                  f"{_fmt(one.get('plain_ms_per_token'), '.3f')} | {kernels} | "
                  f"{_fmt(many.get('tokens_per_s'), ',.0f')} | {_fmt(one.get('prefill_ms'), '.1f')} | "
                  f"{_fmt(one.get('first_step_s'), '.1f')} / {_fmt(many.get('first_step_s'), '.1f')} | "
                  f"{_fmt(one.get('prefill_first_s'), '.1f')} |")


def _decode_row(model, batch: int, context: int, steps: int, graph: bool, plain_steps: int) -> dict:
    """time_decode's fields; at batch 1 with compiled blocks also the uncompiled step's speed and the relative
    difference of the first logits of the two from the same random states."""
    res = time_decode(model, batch, context, steps, graph)
    logits = res.pop("logits")
    if batch == 1 and plain_steps and compile_enabled(model.device):
        with fast_paths(compile=False):
            plain = time_decode(model, batch, context, plain_steps, graph)
        res["plain_ms_per_token"] = plain["ms_per_token"]
        res["plain_rel_err"] = ((logits - plain["logits"]).norm() / plain["logits"].norm()).item()
    return res


def _kernels(model, context: int) -> dict:
    out = dict(kernels_per_step=kernels_per_step(model, context))
    if compile_enabled(model.device):
        with fast_paths(compile=False):
            out["plain_kernels_per_step"] = kernels_per_step(model, context)
    return out


def _order(batches, contexts, prefill: bool) -> list[tuple[str, int, int]]:
    """(kind, batch, context) in the order they run: first what issue #23's targets name (batch 1 at the first
    context, which compiles; the largest batch and the prefill at the longest context), then the rest, the
    longest prompts first, so that a budget that runs out skips the least wanted rows."""
    small, big, longest = min(batches), max(batches), max(contexts)
    first = [("decode", small, contexts[0]), ("decode", big, longest)] + ([("prefill", 1, longest)] if prefill else [])
    rest = [("decode", B, L) for B in sorted(batches) for L in contexts]
    rest += [("prefill", 1, L) for L in sorted(contexts, reverse=True)] if prefill else []
    return first + [task for task in rest if task not in first]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--size", default="125m", help="preset size")
    p.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=MIXERS)
    p.add_argument("--contexts", nargs="+", type=int, default=list(CONTEXTS))
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    p.add_argument("--steps", type=int, default=50, help="timed decode steps per row")
    p.add_argument("--plain-steps", type=int, default=10,
                   help="timed steps of the uncompiled step at batch 1, for comparison (0: skip)")
    p.add_argument("--prefill-repeats", type=int, default=2)
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="run every step and prefill uncompiled")
    p.add_argument("--budget", type=float, default=240.0, help="seconds; rows not started by then are skipped")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a quick check of the script (no graph)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_decode: needs a CUDA GPU", file=sys.stderr)
        return 2
    with fast_paths(compile=False) if args.no_compile else contextlib.nullcontext():
        _run(args, argv, device)
    return 0


def _run(args, argv: list[str], device: torch.device) -> None:
    graph = device.type == "cuda"
    start = time.monotonic()
    deadline = start + args.budget
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
        print(json.dumps(_rounded(row)), flush=True)
        out["rows"] = [_rounded(rows[k]) for k in sorted(rows, key=lambda k: (args.mixers.index(k[0]), k[1], k[2]))]
        out["seconds"] = round(time.monotonic() - start, 1)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    print(f"{out['device']}, torch {out['torch']}, {args.size} presets, bf16, compiled blocks: {out['compile']}; "
          "decode from random states", flush=True)
    models = {}
    for m in args.mixers:
        with device:
            models[m] = build_model(f"{m}-{args.size}").to(torch.bfloat16).eval()
    with torch.no_grad():
        for kind, B, L in _order(args.batches, args.contexts, not args.no_prefill):
            for m in args.mixers if kind == "decode" else sorted(args.mixers, key=PREFILL_ORDER.index):
                row = rows.setdefault((m, L, B), dict(mixer=m, context=L, batch=B))
                if time.monotonic() > deadline:
                    row["note" if kind == "decode" else "prefill_note"] = "skipped: time budget"
                    save(row)
                    continue
                if kind == "decode":
                    row.update(_measure(lambda m=m, L=L, B=B: _decode_row(models[m], B, L, args.steps, graph,
                                                                          args.plain_steps)))
                else:
                    res = _measure(lambda m=m, L=L: time_prefill(models[m], L, args.prefill_repeats))
                    row.update(res if "error" not in res else {"prefill_error": res["error"]})
                save(row)
        # last: the profiler must not run before (or during) any timing or capture
        for m in args.mixers if graph else ():
            res = _measure(lambda m=m: _kernels(models[m], args.contexts[0]))
            for L in args.contexts:
                rows.setdefault((m, L, 1), dict(mixer=m, context=L, batch=1)).update(
                    {k: v for k, v in res.items() if k != "error"})
            save(dict(mixer=m, **res))
    print_table(out["rows"], args.mixers, args.contexts, args.batches)
    print(f"{out['seconds']} s in all", flush=True)


if __name__ == "__main__":
    sys.exit(main())
