"""Time TTT-MLP's Triton kernels against TTT-Linear's and attention on one GPU; print a table, write JSON.

Forward and forward+backward ms and the peak memory of a forward+backward, for 32,768 tokens per call
(B = 32768 / T) at T = 2k, 8k, 32k and heads H12xD64 (the 125m presets'), H32xD64 and H16xD128, bf16:
tttlm.ttt_mlp (Triton, also at widths where CUDA runs the PyTorch path by default:
`triton_parts.CHUNK_WIDTHS_ON_CUDA`), tttlm.ttt_linear (Triton), and torch SDPA (causal, torch's default
backend). Then decode: one ttt_mlp_step at batch 1, H12xD64, us per token, as called and replayed from a CUDA graph.

    python benchmarks/gpu_ttt_mlp.py [--json OUT.json] [--tokens 32768] [--heads 12x64,32x64,16x128]
                                     [--seq-lens 2048,8192,32768] [--ops ttt_mlp,ttt_linear,sdpa] [--no-decode]
    python benchmarks/gpu_ttt_mlp.py --no-split # ours with one program per (sequence, head) throughout
    python benchmarks/gpu_ttt_mlp.py --tilings [64,4,4:32,4,4] --heads 12x64 --shapes 16x2048,4x8192 [--budget S]
                                     [--compile-only]
    tttlm bench ttt_mlp [same arguments]

--tilings (ours only): for each `triton_parts.Tiling` (FT,FWD_WARPS,BWD_WARPS: hidden units per tile at most,
warps of the forward and of the backward; by default `triton_parts.CANDIDATE_TILINGS`) at every --heads, first
a check against the PyTorch path (float64, on the same bf16 inputs: the output and the gradients of every input
and initial weight, relative RMSE, with the hidden tiles split over programs and not), then the timings at
--shapes (B x T) with a NaN check of their output and gradients; a tiling started after --budget seconds is
skipped. --compile-only compiles all the tilings' kernels into Triton's cache, in parallel processes, and stops:
run before, it spares the timings the compilation (10-40 s per tiling).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch
import torch.nn.functional as F

TOKENS = 32768
SEQ_LENS = (2048, 8192, 32768)
HEADS = ((12, 64), (32, 64), (16, 128))
OPS = ("ttt_mlp", "ttt_linear", "sdpa")
NAMES = {"ttt_mlp": "tttlm.ttt_mlp", "ttt_linear": "tttlm.ttt_linear", "sdpa": "sdpa"}


def make_call(op: str, B: int, T: int, H: int, D: int):
    """A closure running the op's forward, and the leaves whose gradients a backward computes."""
    from tttlm.ops import TTTLinearState, TTTMLPState, ttt_linear, ttt_mlp

    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(B, T, H, D, device=dev, dtype=dt)
    k = F.normalize(torch.randn(B, T, H, D, device=dev), dim=-1).to(dt)
    v = torch.randn(B, T, H, D, device=dev, dtype=dt)
    if op == "sdpa":
        qt, kt, vt = (t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        return (lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)), [qt, kt, vt]
    eta = (torch.rand(B, T, H, device=dev) / D).to(dt)
    ln_w = torch.ones(H, D, device=dev, dtype=dt)
    ln_b = torch.zeros(H, D, device=dev, dtype=dt)
    if op == "ttt_linear":
        params = [torch.randn(H, D, D, device=dev) / D**0.5, torch.zeros(H, D, device=dev)]
        leaves = [t.requires_grad_() for t in (q, k, v, eta, ln_w, ln_b, *params)]

        def fn():
            state = TTTLinearState.start(*(p.expand(B, *p.shape) for p in params))
            return ttt_linear(q, k, v, eta, ln_w, ln_b, state, mini_batch_size=16, backend="triton")[0]

        return fn, leaves
    F4 = 4 * D
    params = [torch.randn(H, D, F4, device=dev) / D**0.5, torch.zeros(H, F4, device=dev),
              torch.randn(H, F4, D, device=dev) / F4**0.5, torch.zeros(H, D, device=dev)]
    leaves = [t.requires_grad_() for t in (q, k, v, eta, ln_w, ln_b, *params)]

    def fn():
        state = TTTMLPState.start(*(p.expand(B, *p.shape) for p in params))
        return ttt_mlp(q, k, v, eta, ln_w, ln_b, state, mini_batch_size=16, backend="triton")[0]

    return fn, leaves


def median_ms(fn, leaves=()) -> float:
    """triton.testing.do_bench's median, or for a call over 20 ms the median of 3 timed after one: do_bench
    would run it some 8 times, which the slow rows (T = 32k) cannot afford in one device call."""
    from triton.testing import do_bench

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(4):
        for t in leaves:
            t.grad = None
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        if times[0] < 20:
            return do_bench(fn, warmup=10, rep=50, return_mode="median", grad_to_none=list(leaves))
    return sorted(times[1:])[1]


def time_op(op: str, B: int, T: int, H: int, D: int) -> dict:
    """Median ms of the forward (no autograd) and of forward+backward, and the forward+backward's peak MiB."""
    fn, leaves = make_call(op, B, T, H, D)
    with torch.no_grad():
        fn()  # compiled before anything is timed
        fwd_ms = median_ms(fn)
    do = torch.randn_like(fn())

    def fwd_bwd():
        fn().backward(do)

    fwd_bwd()  # compiled and warm before the memory is measured
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    fb_ms = median_ms(fwd_bwd, leaves)
    return dict(fwd_ms=round(fwd_ms, 3), fwdbwd_ms=round(fb_ms, 3), peak_mib=round(peak, 1))


def time_decode(B: int = 1, H: int = 12, D: int = 64) -> dict:
    """us per token of one ttt_mlp_step: the public op (input checks included), and the kernel's function
    replayed from a CUDA graph (10 steps per graph)."""
    from triton.testing import do_bench

    from tttlm.ops import TTTMLPState, ttt_mlp_step
    from tttlm.ops.ttt_mlp.triton_step import ttt_mlp_step_triton

    dev, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(B, H, D, device=dev, dtype=dt) for _ in range(3))
    eta = (torch.rand(B, H, device=dev) / D).to(dt)
    ln_w = torch.ones(H, D, device=dev, dtype=dt)
    ln_b = torch.zeros(H, D, device=dev, dtype=dt)
    params = [torch.randn(B, H, D, 4 * D, device=dev) / D**0.5, torch.zeros(B, H, 4 * D, device=dev),
              torch.randn(B, H, 4 * D, D, device=dev) / (2 * D**0.5), torch.zeros(B, H, D, device=dev)]
    sums = [0.01 * torch.randn_like(p) for p in params]
    state = TTTMLPState(*params, *sums, torch.full((B,), 5, device=dev))
    args = (q, k, v, eta, ln_w, ln_b, state)
    res = {}
    with torch.no_grad():
        res["public op"] = 1e3 * do_bench(lambda: ttt_mlp_step(*args), warmup=50, rep=300, return_mode="median")
        ttt_mlp_step_triton(*args)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(10):
                ttt_mlp_step_triton(*args)
        res["graph"] = 1e3 * do_bench(graph.replay, warmup=20, rep=200, return_mode="median") / 10
    return {key: round(val, 2) for key, val in res.items()}


CHECK_SHAPES = ((2, 160), (16, 48))  # B x T of the check: 2 x H programs split the hidden tiles, 16 x H do not
CHECK_TOL = 5e-3  # relative RMSE, as tests/ops/test_ttt_mlp_triton.py allows bf16 on CUDA


def check_tiling(B: int, T: int, H: int, D: int, seed: int = 0) -> dict:
    """The Triton kernels (bf16) against the PyTorch path (float64, the same values) at B x T: the largest
    relative RMSE over the output and the gradients of q, k, v, eta, the LayerNorm and the initial weights, the
    name of that quantity, and whether anything was not finite."""
    from tttlm.ops import TTTMLPState, ttt_mlp

    g = torch.Generator().manual_seed(seed)
    F4 = 4 * D
    inputs = [torch.randn(B, T, H, D, generator=g) for _ in range(3)] + [torch.rand(B, T, H, generator=g) * 2 / D]
    inputs += [1 + 0.3 * torch.randn(H, D, generator=g), 0.3 * torch.randn(H, D, generator=g)]
    inputs = [t.to(torch.bfloat16) for t in inputs]
    shapes, scales = ((D, F4), (F4,), (F4, D), (D,)), (D**-0.5, 0.1, F4**-0.5, 0.1)
    params = [scale * torch.randn(B, H, *shape, generator=g) for shape, scale in zip(shapes, scales)]
    do = torch.randn(B, T, H, D, generator=g).to(torch.bfloat16)

    def run(dtype, pdtype, backend):
        leaves = [t.to("cuda", dtype).requires_grad_() for t in inputs]
        leaves += [t.to("cuda", pdtype).requires_grad_() for t in params]
        o = ttt_mlp(*leaves[:6], TTTMLPState.start(*leaves[6:]), backend=backend)[0]
        grads = torch.autograd.grad(o, leaves, do.to("cuda", o.dtype))
        return [o.double(), *(t.double() for t in grads)]

    got = run(torch.bfloat16, torch.float32, "triton")
    ref = run(torch.float64, torch.float64, "torch")
    names = ("o", "dq", "dk", "dv", "deta", "dln_w", "dln_b", "dW1", "db1", "dW2", "db2")
    errs = {n: ((a - b).norm() / b.norm().clamp_min(1e-30)).item() for n, a, b in zip(names, got, ref)}
    worst = max(errs, key=lambda n: errs[n] if errs[n] == errs[n] else float("inf"))
    return dict(max_rel_err=errs[worst], worst=worst, finite=all(bool(t.isfinite().all()) for t in got))


def finite_fwd_bwd(B: int, T: int, H: int, D: int) -> bool:
    """Whether a forward+backward of the benchmark's call gives finite outputs and gradients."""
    fn, leaves = make_call("ttt_mlp", B, T, H, D)
    o = fn()
    o.backward(torch.randn_like(o))
    return bool(o.isfinite().all()) and all(bool(t.grad.isfinite().all()) for t in leaves)


def _compile_tiling(t, heads) -> str:
    """In a process of its own: one tiny forward (without and with autograd) and backward per head shape under
    tiling t, which leaves its kernels in Triton's cache on disk. Returns t's name, or the error."""
    from tttlm.ops.ttt_mlp import triton_parts

    triton_parts.CHUNK_WIDTHS_ON_CUDA = (16, 32, 64, 128)
    try:
        for H, D in heads:
            triton_parts.TILINGS = triton_parts.TILINGS | {max(16, 1 << (D - 1).bit_length()): t}
            fn, _ = make_call("ttt_mlp", 1, 32, H, D)
            with torch.no_grad():
                fn()
            fn().sum().backward()
        torch.cuda.synchronize()
        return str(t)
    except Exception as e:
        return f"{t}: {e!r}"[:300]


def compile_tilings(tilings, heads) -> None:
    """Compile every tiling's kernels at once, a process each (Triton compiles one kernel at a time per process,
    10-40 s each), so that the timings find them in the cache."""
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(len(tilings), mp_context=ctx) as pool:
        for name in pool.map(_compile_tiling, tilings, [heads] * len(tilings)):
            print(f"compiled {name}", flush=True)


def time_tilings(tilings, heads, shapes, budget: float, out: dict, json_path) -> None:
    """Each tiling at each head shape: the check at CHECK_SHAPES, then forward and forward+backward ms at
    `shapes` (B, T), with bwd = fwd+bwd - fwd; rows into out["tilings"] (and the JSON as it goes)."""
    import time

    from tttlm.ops.ttt_mlp import triton_parts

    start = time.time()
    shipped = dict(triton_parts.TILINGS)
    out["tilings"] = []
    for H, D in heads:
        bd = max(16, 1 << (D - 1).bit_length())
        for t in tilings:
            row = dict(tiling=str(t), H=H, D=D)
            if time.time() - start > budget:
                row["error"] = f"skipped: over the {budget:.0f} s budget"
            else:
                triton_parts.TILINGS = shipped | {bd: t}
                try:
                    checks = [check_tiling(B, T, H, D) for B, T in CHECK_SHAPES]
                    worst = max(checks, key=lambda c: c["max_rel_err"] if c["finite"] else float("inf"))
                    ok = all(c["finite"] for c in checks) and worst["max_rel_err"] <= CHECK_TOL
                    row |= dict(correct=ok, max_rel_err=float(f"{worst['max_rel_err']:.2e}"), worst=worst["worst"],
                                finite=all(c["finite"] for c in checks))
                    for B, T in shapes:
                        r = time_op("ttt_mlp", B, T, H, D)
                        key = f"{B}x{T}"
                        row[key] = r | dict(bwd_ms=round(r["fwdbwd_ms"] - r["fwd_ms"], 3),
                                            finite=finite_fwd_bwd(B, T, H, D))
                        torch.cuda.empty_cache()
                except Exception as e:  # one tiling that fails must not hide the others
                    row["error"] = repr(e)[:300]
            row["elapsed_s"] = round(time.time() - start, 1)
            out["tilings"].append(row)
            print(json.dumps(row), flush=True)
            if json_path:
                with open(json_path, "w") as f:
                    json.dump(out, f, indent=1)
    triton_parts.TILINGS = shipped


def print_tilings(out: dict, shapes) -> None:
    shipped = out["shipped"]
    print(f"\n{out['device']}, bf16, TTT-MLP tilings (shipped: {shipped}); check: max relative RMSE against "
          f"the PyTorch path (float64) over o and every gradient, tolerance {CHECK_TOL}; ms")
    cols = [f"{B}x{T} {k}" for B, T in shapes for k in ("fwd", "fwd+bwd", "bwd", "finite")]
    print("| H×D | tiling | correct | max rel err (of) | " + " | ".join(cols) + " |")
    print("|---|---|---|---|" + "---|" * len(cols))
    for r in out["tilings"]:
        if "error" in r:
            print(f"| H{r['H']}xD{r['D']} | {r['tiling']} | {r['error']} |")
            continue
        cells = []
        for B, T in shapes:
            t = r.get(f"{B}x{T}", {})
            cells += [str(t.get(k, "-")) for k in ("fwd_ms", "fwdbwd_ms", "bwd_ms", "finite")]
        print(f"| H{r['H']}xD{r['D']} | {r['tiling']} | {r['correct']} | {r['max_rel_err']} ({r['worst']}) | "
              + " | ".join(cells) + " |")


def print_table(out: dict, heads, seq_lens, ops) -> None:
    print(f"\n{out['device']}, bf16, {out['tokens']} tokens per call; ms (forward / forward+backward) and the "
          "forward+backward's peak MiB")
    for H, D in heads:
        label = [f"T={T // 1024}k" if T % 1024 == 0 else f"T={T}" for T in seq_lens]
        print(f"\nH{H}xD{D}\n| op | " + " | ".join(f"{t} fwd | fwd+bwd | MiB" for t in label) + " |")
        print("|---|" + "---|" * (3 * len(seq_lens)))
        for op in ops:
            cells = []
            for T in seq_lens:
                row = next(r for r in out["rows"] if r["op"] == NAMES[op] and (r["H"], r["D"], r["T"]) == (H, D, T))
                cells += [str(row.get(key, "err")) for key in ("fwd_ms", "fwdbwd_ms", "peak_mib")]
            print(f"| {NAMES[op]} | " + " | ".join(cells) + " |")
    if out.get("decode"):
        print(f"\ndecode, one ttt_mlp_step at batch 1, H12xD64, us per token: {out['decode']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--tokens", type=int, default=TOKENS, help="tokens per call (B = tokens / T)")
    p.add_argument("--heads", default=",".join(f"{H}x{D}" for H, D in HEADS), help="comma-separated HxD")
    p.add_argument("--seq-lens", default=",".join(map(str, SEQ_LENS)), help="comma-separated T")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated, of " + ", ".join(OPS))
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--tilings", nargs="?", const="candidates", help="colon-separated FT,FWD_WARPS,BWD_WARPS "
                   "(alone: triton_parts.CANDIDATE_TILINGS): check and time ours under each, then stop")
    p.add_argument("--shapes", default="16x2048,4x8192", help="with --tilings: comma-separated BxT")
    p.add_argument("--compile-only", action="store_true", help="with --tilings: compile every tiling's kernels "
                   "(into Triton's cache, in parallel processes) and stop")
    p.add_argument("--budget", type=float, default=float("inf"), help="with --tilings: seconds after which no "
                   "further tiling starts")
    p.add_argument("--no-split", action="store_true", help="one program per (sequence, head) in our TTT-MLP "
                   "kernels also where few sequences would split the hidden width over several")
    args = p.parse_args(argv)
    heads = [tuple(int(x) for x in hd.split("x")) for hd in args.heads.split(",")]
    seq_lens = [int(t) for t in args.seq_lens.split(",")]
    ops = args.ops.split(",")
    if not set(ops) <= set(OPS):
        p.error(f"--ops must name some of {', '.join(OPS)}; got {args.ops}")
    if not torch.cuda.is_available():
        print("gpu_ttt_mlp: needs a CUDA GPU", file=sys.stderr)
        return 2
    from tttlm.ops.ttt_mlp import triton_parts

    # our kernels at every head width, also those that do not yet run by default on CUDA (their tests must pass
    # on the GPU first; tests/ops/test_ttt_mlp_triton.py)
    triton_parts.CHUNK_WIDTHS_ON_CUDA = (16, 32, 64, 128)
    if args.no_split:
        triton_parts.splits = lambda programs, D, device: 1
    torch.manual_seed(0)
    out = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", "benchmarks/gpu_ttt_mlp.py", *(sys.argv[1:] if argv is None else argv)]),
        "torch": torch.__version__,
        "tokens": args.tokens,
        "rows": [],
    }
    print(f"device: {out['device']}, torch {out['torch']}, bf16, {args.tokens} tokens per call", flush=True)
    if args.tilings:
        tilings = triton_parts.CANDIDATE_TILINGS if args.tilings == "candidates" else [
            triton_parts.Tiling(*(int(x) for x in t.split(","))) for t in args.tilings.split(":")]
        shapes = [tuple(int(x) for x in bt.split("x")) for bt in args.shapes.split(",")]
        out["shipped"] = {f"D{D}": str(triton_parts.tiling(D)) for _, D in heads}
        if args.compile_only:
            compile_tilings(tilings, heads)
            return 0
        time_tilings(tilings, heads, shapes, args.budget, out, args.json)
        print_tilings(out, shapes)
        return 0
    for H, D in heads:
        for T in seq_lens:
            B = max(1, args.tokens // T)
            for op in ops:
                row = dict(op=NAMES[op], T=T, H=H, D=D, B=B)
                try:
                    row |= time_op(op, B, T, H, D)
                except Exception as e:  # one op that fails must not hide the other rows
                    row["error"] = repr(e)[:300]
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
                torch.cuda.empty_cache()
                if args.json:  # written as it goes: a run cut short keeps its rows
                    with open(args.json, "w") as f:
                        json.dump(out, f, indent=1)
    if not args.no_decode:
        try:
            out["decode"] = time_decode()
        except Exception as e:
            out["decode"] = {"error": repr(e)[:300]}
        print(f"decode: {out['decode']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print_table(out, heads, seq_lens, ops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
