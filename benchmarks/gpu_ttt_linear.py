"""Time TTT-Linear's Triton kernels against peer sequence mixers on one GPU; print a table.

Forward and forward+backward ms for 32,768 tokens per call (B = 32768 / T) at T = 2k, 8k, 32k, heads H16xD128
and H32xD64, bf16: ours (tttlm.ops.ttt_linear, Triton), flash-linear-attention's chunk_ttt_linear (mini-batch
16) and chunk_gated_delta_rule, and torch SDPA flash attention (causal). Then decode: one token through one
TTT-Linear op, H16xD128, us per token at batch 1 and 64, eager and replayed from a CUDA graph.
Peers are skipped (with a note) when flash-linear-attention is not installed.

    python benchmarks/gpu_ttt_linear.py [--json OUT.json] [--tokens 32768] [--heads 16x128,32x64] [--no-peers]
    python benchmarks/gpu_ttt_linear.py --sweep     # ours only, each warps-per-program setting
    python benchmarks/gpu_ttt_linear.py --profile   # ours only, GPU time per kernel of a forward+backward
    python benchmarks/gpu_ttt_linear.py --split 1   # ours with one program per (sequence, head) throughout
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from tttlm.ops.ttt_linear import triton_split, triton_split_chain
from tttlm.ops.ttt_linear.triton_parts import block_d

TOKENS = 32768
SEQ_LENS = (2048, 8192, 32768)
SPLITS = (triton_split.SPLITS, triton_split_chain.SPLITS)  # the forward's, the backward chain's
OPS = ("ttt_linear (ours)", "fla chunk_ttt_linear", "fla gated_deltanet", "sdpa flash")


def _fla():
    try:
        import fla.ops.common.chunk_o as chunk_o
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.ttt import chunk_ttt_linear
    except ImportError:
        return None
    # flash-linear-attention refuses its gated backward on Hopper with triton < 3.7.1 (their issue #640);
    # lifted here for timing only, as the peer numbers in DESIGN.md were taken.
    chunk_o.TRITON_ABOVE_3_7_1 = True
    return chunk_ttt_linear, chunk_gated_delta_rule


def make_call(op: str, B: int, T: int, H: int, D: int, fla):
    """A closure running the op's forward, and the tensors to zero the gradients of."""
    from tttlm.ops import TTTLinearState, ttt_linear

    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(B, T, H, D, device=dev, dtype=dt)
    k = F.normalize(torch.randn(B, T, H, D, device=dev), dim=-1).to(dt)
    v = torch.randn(B, T, H, D, device=dev, dtype=dt)
    if op == "ttt_linear (ours)":
        eta = (torch.rand(B, T, H, device=dev) / D).to(dt)
        ln_w = torch.ones(H, D, device=dev, dtype=dt)
        ln_b = torch.zeros(H, D, device=dev, dtype=dt)
        W0 = torch.randn(H, D, D, device=dev) / D**0.5
        b0 = torch.zeros(H, D, device=dev)
        leaves = [t.requires_grad_() for t in (q, k, v, eta, ln_w, ln_b, W0, b0)]

        def fn():
            state = TTTLinearState.start(W0.expand(B, H, D, D), b0.expand(B, H, D))
            return ttt_linear(q, k, v, eta, ln_w, ln_b, state, mini_batch_size=16)[0]

        return fn, leaves
    if op == "fla chunk_ttt_linear":
        chunk_ttt_linear = fla[0]
        w = torch.ones(H, D, device=dev, dtype=dt)
        bb = torch.zeros(H, D, device=dev, dtype=dt)
        eta = torch.full((B, T, H, 1), 0.01, device=dev, dtype=dt)
        leaves = [t.requires_grad_() for t in (q, k, v, w, bb, eta)]
        return (lambda: chunk_ttt_linear(q, k, v, w, bb, eta, chunk_size=16)[0]), leaves
    if op == "fla gated_deltanet":
        chunk_gated_delta_rule = fla[1]
        g = F.logsigmoid(torch.randn(B, T, H, device=dev))
        beta = torch.rand(B, T, H, device=dev, dtype=dt).sigmoid()
        leaves = [t.requires_grad_() for t in (q, k, v, g, beta)]
        return (lambda: chunk_gated_delta_rule(q, k, v, g, beta)[0]), leaves
    if op == "sdpa flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qt, kt, vt = (t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))

        def fn():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

        return fn, [qt, kt, vt]
    raise ValueError(op)


def time_op(op, B, T, H, D, fla):
    from triton.testing import do_bench

    fn, leaves = make_call(op, B, T, H, D, fla)
    with torch.no_grad():
        f_ms = do_bench(fn, warmup=10, rep=60, return_mode="median")
    do = torch.randn_like(fn())

    def fwd_bwd():
        fn().backward(do)

    fb_ms = do_bench(fwd_bwd, warmup=5, rep=40, return_mode="median", grad_to_none=leaves)
    return f_ms, fb_ms


def time_decode(B: int, H: int = 16, D: int = 128) -> dict:
    """us per token of one decode step: the public op (input checks included), the kernel's function alone,
    and the kernel's function replayed from a CUDA graph."""
    from triton.testing import do_bench

    from tttlm.ops import TTTLinearState, ttt_linear_step
    from tttlm.ops.ttt_linear.triton_step import ttt_linear_step_triton

    dev, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(B, H, D, device=dev, dtype=dt) for _ in range(3))
    eta = (torch.rand(B, H, device=dev) / D).to(dt)
    ln_w = torch.ones(H, D, device=dev, dtype=dt)
    ln_b = torch.zeros(H, D, device=dev, dtype=dt)
    W = torch.randn(B, H, D, D, device=dev) / D**0.5
    state = TTTLinearState(
        W,
        torch.zeros(B, H, D, device=dev),
        0.01 * torch.randn_like(W),
        torch.zeros(B, H, D, device=dev),
        torch.full((B,), 5, device=dev),
    )
    args = (q, k, v, eta, ln_w, ln_b, state)
    res = {}
    with torch.no_grad():
        res["public op"] = 1e3 * do_bench(lambda: ttt_linear_step(*args), warmup=50, rep=300, return_mode="median")
        res["kernel fn"] = 1e3 * do_bench(
            lambda: ttt_linear_step_triton(*args), warmup=50, rep=300, return_mode="median"
        )
        ttt_linear_step_triton(*args)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(10):
                ttt_linear_step_triton(*args)
        res["graph"] = 1e3 * do_bench(graph.replay, warmup=20, rep=200, return_mode="median") / 10
    return res


def kernel_report() -> list[str]:
    """Registers and spilled bytes of every compiled variant of our kernels (from Triton's cache)."""
    from tttlm.ops.ttt_linear import triton_chunk, triton_step
    from tttlm.ops.ttt_linear import triton_chunk_bwd as bwd

    lines = []
    kernels = (bwd._local_kernel, bwd._chain_kernel, bwd._finish_kernel)
    for fn in (triton_chunk._fwd_kernel, triton_chunk._output_kernel, *kernels, triton_step._step_kernel):
        for cache in fn.device_caches.values():
            for kernel in cache[0].values():
                consts = getattr(getattr(kernel, "src", None), "constexprs", {})
                consts = {fn.arg_names[k[0]]: v for k, v in consts.items() if isinstance(k, tuple)}
                lines.append(f"{fn.__name__} {consts}: {kernel.n_regs} registers, {kernel.n_spills} spilled")
    return lines


def sweep(heads, fla) -> None:
    """Ours at T = 2k and 32k with each kernel family's warps per program varied in turn (the others at their
    defaults): the forward, the backward's sequential kernels, its parallel kernels."""
    from tttlm.ops.ttt_linear import triton_chunk, triton_chunk_bwd

    tables = {
        "fwd": triton_chunk.NUM_WARPS,
        "bwd chain": triton_chunk_bwd.CHAIN_NUM_WARPS,
        "bwd local": triton_chunk_bwd.LOCAL_NUM_WARPS,
    }
    for H, D in heads:
        bd = triton_chunk.block_d(D)
        for name, table in tables.items():
            default = table[bd]
            for warps in (4, 8, 16) if bd >= 128 else (2, 4, 8):
                table[bd] = (warps, warps) if isinstance(default, tuple) else warps
                for T in (2048, SEQ_LENS[-1]):
                    try:
                        f_ms, fb_ms = time_op(OPS[0], max(1, TOKENS // T), T, H, D, fla)
                        res = f"fwd {f_ms:.3f} ms, fwd+bwd {fb_ms:.3f} ms"
                    except Exception as e:
                        res = repr(e)[:160]
                    print(f"sweep H{H}xD{D} T={T} {name} warps {warps}: {res}", flush=True)
            table[bd] = default


def profile(heads) -> None:
    """GPU ms per kernel of one forward+backward call of ours at T = 2k and 32k (torch.profiler, the mean of 3
    calls after 2 warm-up calls), the 8 largest."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for H, D in heads:
        for T in (2048, SEQ_LENS[-1]):
            fn, _ = make_call(OPS[0], max(1, TOKENS // T), T, H, D, None)
            for _ in range(2):
                fn().float().sum().backward()
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    fn().float().sum().backward()
                torch.cuda.synchronize()
            times = {e.key: e.device_time_total / 3e3 for e in prof.key_averages() if e.device_time_total > 0}
            top = sorted(times.items(), key=lambda kv: -kv[1])[:8]
            print(f"profile H{H}xD{D} T={T}: " + ", ".join(f"{k[:40]} {v:.2f}" for k, v in top), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write every number to this file")
    p.add_argument("--tokens", type=int, default=TOKENS)
    p.add_argument("--no-peers", action="store_true", help="time only our kernels")
    p.add_argument("--heads", default="16x128,32x64", help="comma-separated HxD")
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--sweep", action="store_true", help="time our kernels under each launch setting, then stop")
    p.add_argument("--profile", action="store_true", help="GPU time per kernel of ours, then stop")
    p.add_argument("--split", type=int, help="programs per (sequence, head), forced in each of our sequential "
                   "kernels that offers it at the head dim (its SPLITS), one elsewhere (default: as the op picks, "
                   "`triton_split.split_count`)")
    args = p.parse_args(argv)
    heads = [tuple(int(x) for x in hd.split("x")) for hd in args.heads.split(",")]
    if args.split is not None:
        offered = {split for options in SPLITS for D in {block_d(D) for _, D in heads} for split in options.get(D, ())}
        if args.split not in {1} | offered:
            p.error(f"--split must be 1 or one the kernels offer at these heads, {sorted(offered)}; got {args.split}")
        triton_split.splits = triton_split.forced(args.split)
    if not torch.cuda.is_available():
        print("gpu_ttt_linear: needs a CUDA GPU", file=sys.stderr)
        return 2
    fla = None if args.no_peers else _fla()
    ops = OPS if fla is not None else (OPS[0], OPS[3])
    if fla is None and not args.no_peers:
        print("flash-linear-attention is not installed: its rows are skipped")
    torch.manual_seed(0)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": [], "decode": {}}
    print(f"device: {out['device']}, torch {out['torch']}, bf16, {args.tokens} tokens per call", flush=True)
    if args.sweep:
        sweep(heads, fla)
        print("\n".join(kernel_report()))
        return 0
    if args.profile:
        profile(heads)
        return 0
    for H, D in heads:
        for T in SEQ_LENS:
            B = max(1, args.tokens // T)
            for op in ops:
                try:
                    f_ms, fb_ms = time_op(op, B, T, H, D, fla)
                    row = dict(op=op, H=H, D=D, T=T, B=B, fwd_ms=round(f_ms, 3), fwdbwd_ms=round(fb_ms, 3))
                except Exception as e:  # a peer that fails must not hide the other rows
                    row = dict(op=op, H=H, D=D, T=T, B=B, error=repr(e)[:200])
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
                torch.cuda.empty_cache()
    for B in () if args.no_decode else (1, 64):
        out["decode"][B] = {k: round(v, 2) for k, v in time_decode(B).items()}
        print(f"decode batch {B}: {out['decode'][B]}", flush=True)
    try:
        out["kernels"] = kernel_report()
    except Exception as e:  # Triton internals: a report, never a reason to lose the table
        out["kernels"] = [f"kernel report failed: {e!r}"]
    print("\n".join(out["kernels"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print_table(out, ops, heads, args.tokens)
    return 0


def print_table(out: dict, ops, heads, tokens: int) -> None:
    print(f"\n{out['device']}, bf16, {tokens} tokens per call; ms (forward / forward+backward)")
    for H, D in heads:
        print(
            f"\nH{H}xD{D}\n| op | "
            + " | ".join(f"T={T // 1024}k fwd | T={T // 1024}k fwd+bwd" for T in SEQ_LENS)
            + " |"
        )
        print("|---|" + "---|" * (2 * len(SEQ_LENS)))
        for op in ops:
            cells = []
            for T in SEQ_LENS:
                row = next(r for r in out["rows"] if r["op"] == op and (r["H"], r["D"], r["T"]) == (H, D, T))
                cells += [str(row.get("fwd_ms", "err")), str(row.get("fwdbwd_ms", "err"))]
            print(f"| {op} | " + " | ".join(cells) + " |")
    if not out["decode"]:
        return
    print("\ndecode, one TTT-Linear op, H16xD128, us per token")
    print("| batch | public op | kernel fn | kernel fn in a CUDA graph |\n|---|---|---|---|")
    for B, d in out["decode"].items():
        print(f"| {B} | {d['public op']} | {d['kernel fn']} | {d['graph']} |")


if __name__ == "__main__":
    sys.exit(main())
