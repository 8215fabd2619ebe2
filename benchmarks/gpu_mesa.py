"""Time Mesa's Triton kernels against flash-linear-attention's chunk_mesa_net and Gated DeltaNet on one GPU;
measure the solve's accuracy against exact solves and the CG steps a tolerance takes on a trained model.

1. Forward and forward+backward ms for 32,768 tokens per call (B = 32768 / T) at T = 2k, 8k, 32k, H16xD128,
   bf16, 30 CG steps: ours (tttlm.ops.mesa, Triton), flash-linear-attention's chunk_mesa_net and
   chunk_gated_delta_rule, on the inputs of the peer numbers in DESIGN.md (L2-normed q, k; g = logsigmoid(x + 4),
   beta uniform in [0, 1], lamb uniform in [0.5, 1.5]). Then ours with the other CG operands at T = 8k.
2. Accuracy: the relative RMSE of o against exact solves (torch.linalg.solve in float64, token by token) on the
   same kind of inputs (B=1, T=1024, H16xD128), for ours (both operand kinds, and at cg_tol=1e-4) and the peer.
   Then GPU ms per kernel of ours (torch.profiler) at T = 2k and 32k.
3. Decode: one mesa_step at batch 1 and 64, H16xD128, us per token, eager and replayed from a CUDA graph.
4. Tolerance: a small Mesa model (mesa-small with 2 heads of 128) trained briefly here on the top-level modules
   of the Python standard library (or a checkpoint, --checkpoint), its layers' op inputs on 16 x 2048 tokens of
   that text: the CG steps to reach cg_tol=1e-4 (mean and most per query) and the forward ms at that tolerance
   against 30 steps.
Peers are skipped (with a note) when flash-linear-attention is not installed. The JSON is rewritten after each
part, so a time limit keeps what was measured; --update adds the parts run to an existing JSON (one process
per part under its own time limit).

    python benchmarks/gpu_mesa.py [--json OUT.json] [--update] [--parts rows,accuracy,decode,tolerance]
        [--tokens 32768] [--no-peers] [--train-steps 300 | --checkpoint RUN_OR_CKPT]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from tttlm.ops.compare import rel_rmse

TOKENS = 32768
SEQ_LENS = (2048, 8192, 32768)
OPS = ("tttlm.mesa", "fla.chunk_mesa_net", "fla.chunk_gated_delta_rule")
CG_STEPS = 30
TOL = 1e-4
PARTS = ("rows", "profile", "accuracy", "decode", "tolerance")
STDLIB = os.path.join(os.path.dirname(os.__file__), "*.py")  # the top of the standard library: a quick corpus


def _fla():
    try:
        import fla.ops.common.chunk_o as chunk_o
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.mesa_net import chunk_mesa_net
    except ImportError:
        return None
    # flash-linear-attention refuses its gated backward on Hopper with triton < 3.7.1 (their issue #640);
    # lifted here for timing only, as the peer numbers in DESIGN.md were taken.
    chunk_o.TRITON_ABOVE_3_7_1 = True
    return chunk_mesa_net, chunk_gated_delta_rule


def make_inputs(B: int, T: int, H: int, D: int, seed: int = 0) -> dict:
    """The peer benchmark's inputs (DESIGN.md): bf16 q, k (L2-normed), v; float32 g, beta [B,T,H], lamb [H,D]."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev, dt = "cuda", torch.bfloat16

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=dev)

    return dict(
        q=F.normalize(randn(B, T, H, D), dim=-1).to(dt),
        k=F.normalize(randn(B, T, H, D), dim=-1).to(dt),
        v=randn(B, T, H, D).to(dt),
        g=F.logsigmoid(randn(B, T, H) + 4),
        beta=torch.rand(B, T, H, generator=gen, device=dev),
        lamb=torch.rand(H, D, generator=gen, device=dev) + 0.5,
    )


def make_call(op: str, inp: dict, fla, **kwargs):
    """A closure running the op's forward (returning o), and the tensors to zero the gradients of."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inp.items()}
    q, k, v, g, beta, lamb = (leaves[n] for n in ("q", "k", "v", "g", "beta", "lamb"))
    if op == "tttlm.mesa":
        from tttlm.ops import mesa

        kw = dict(cg_max_iter=CG_STEPS, backend="triton") | kwargs
        return (lambda: mesa(q, k, v, g, beta, lamb, None, **kw)[0]), list(leaves.values())
    if op == "fla.chunk_mesa_net":
        return (lambda: fla[0](q, k, v, g, beta, lamb, max_CG_iteration=CG_STEPS)[0]), list(leaves.values())
    if op == "fla.chunk_gated_delta_rule":  # beta in the inputs' dtype, as DESIGN.md's peer numbers took it
        beta = beta.detach().to(q.dtype).requires_grad_()
        return (lambda: fla[1](q, k, v, g, beta)[0]), [q, k, v, g, beta]
    raise ValueError(op)


def time_call(fn, leaves, backward: bool = True) -> tuple[float, float | None]:
    from triton.testing import do_bench

    with torch.no_grad():
        f_ms = do_bench(fn, warmup=10, rep=60, return_mode="median")
    if not backward:
        return f_ms, None
    do = torch.randn_like(fn())

    def fwd_bwd():
        fn().backward(do)

    return f_ms, do_bench(fwd_bwd, warmup=5, rep=40, return_mode="median", grad_to_none=leaves)


def speed_rows(H: int, D: int, tokens: int, fla) -> list[dict]:
    from tttlm.ops.mesa import triton_chunk

    rows = []
    ops = OPS if fla is not None else OPS[:1]
    for T in SEQ_LENS:
        B = max(1, tokens // T)
        inp = make_inputs(B, T, H, D)
        for op in ops:
            row = dict(op=op, T=T, B=B, H=H, D=D)
            try:
                f_ms, fb_ms = time_call(*make_call(op, inp, fla))
                row |= dict(fwd_ms=round(f_ms, 3), fwdbwd_ms=round(fb_ms, 3))
            except Exception as e:  # a peer that fails must not hide the other rows
                row["error"] = repr(e)[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
        del inp
    # ours with the CG operands it does not pick for bf16 inputs, at one length
    T = 8192
    inp = make_inputs(max(1, tokens // T), T, H, D)
    saved = triton_chunk.CG_FP16
    triton_chunk.CG_FP16 = False
    try:
        f_ms, fb_ms = time_call(*make_call("tttlm.mesa", inp, fla))
        row = dict(op="tttlm.mesa", T=T, B=max(1, tokens // T), H=H, D=D, operands="tf32",
                   fwd_ms=round(f_ms, 3), fwdbwd_ms=round(fb_ms, 3))
    except Exception as e:
        row = dict(op="tttlm.mesa", T=T, H=H, D=D, operands="tf32", error=repr(e)[:300])
    finally:
        triton_chunk.CG_FP16 = saved
    rows.append(row)
    print(json.dumps(row), flush=True)
    return rows


def profile(H: int, D: int, tokens: int) -> dict:
    """GPU ms per kernel of one forward+backward of ours at T = 2k and 32k (torch.profiler, the mean of 3 calls
    after 2 warm-up calls), the 8 largest."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    res = {}
    for T in (SEQ_LENS[0], SEQ_LENS[-1]):
        fn, _ = make_call("tttlm.mesa", make_inputs(max(1, tokens // T), T, H, D), None)
        for _ in range(2):
            fn().float().sum().backward()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fn().float().sum().backward()
            torch.cuda.synchronize()
        times = {e.key: e.device_time_total / 3e3 for e in prof.key_averages() if e.device_time_total > 0}
        res[T] = {k[:48]: round(v, 3) for k, v in sorted(times.items(), key=lambda kv: -kv[1])[:8]}
        print(f"profile T={T}: {res[T]}", flush=True)
    return res


def exact_output(inp: dict) -> torch.Tensor:
    """o of exact solves, float64, token by token (`reference.mesa_ref` on the GPU)."""
    from tttlm.ops.mesa.reference import mesa_ref

    with torch.no_grad():
        return mesa_ref(*(inp[n].double() for n in ("q", "k", "v", "g", "beta", "lamb")))[0]


def accuracy(H: int, D: int, fla, T: int = 1024) -> dict:
    """Relative RMSE of o against exact solves, and what the solver reports, on one batch row."""
    from tttlm.ops import mesa
    from tttlm.ops.mesa import triton_chunk

    inp = make_inputs(1, T, H, D, seed=1)
    ref = exact_output(inp)
    args = [inp[n] for n in ("q", "k", "v", "g", "beta", "lamb")]
    out = {"inputs": f"B=1 T={T} H={H} D={D} bf16, g=logsigmoid(x+4)", "rel_rmse_o": {}}
    saved = triton_chunk.CG_FP16
    with torch.no_grad():
        for name, fp16, tol in (("tttlm.mesa", None, None), ("tttlm.mesa tf32", False, None),
                                ("tttlm.mesa cg_tol=1e-4", None, TOL)):
            triton_chunk.CG_FP16 = fp16
            stats = {}
            o, _ = mesa(*args, None, cg_max_iter=CG_STEPS, cg_tol=tol, cg_stats=stats, backend="triton")
            out["rel_rmse_o"][name] = rel_rmse(o, ref)
            out.setdefault("solver", {})[name] = dict(iterations=stats["iterations"],
                                                      mean_iterations=round(stats["mean_iterations"], 2),
                                                      max_true_residual=float(stats["residual"].max()))
        triton_chunk.CG_FP16 = saved
        if fla is not None:
            try:
                out["rel_rmse_o"]["fla.chunk_mesa_net"] = rel_rmse(fla[0](*args, max_CG_iteration=CG_STEPS)[0], ref)
            except Exception as e:
                out["rel_rmse_o"]["fla.chunk_mesa_net"] = repr(e)[:300]
    print(json.dumps({"accuracy": out}), flush=True)
    return out


def decode(B: int, H: int = 16, D: int = 128) -> dict:
    """us per token of one mesa_step: the public op, and replayed from a CUDA graph (10 steps per graph)."""
    from triton.testing import do_bench

    from tttlm.ops import MesaState, mesa_step

    inp = make_inputs(B, 1, H, D)
    args = [inp[n][:, 0] for n in ("q", "k", "v", "g", "beta")] + [inp["lamb"]]
    a = torch.randn(B, H, D, D, device="cuda") / D**0.5
    state = MesaState(a @ a.mT, torch.randn(B, H, D, D, device="cuda"))
    res = {}
    with torch.no_grad():
        step = lambda: mesa_step(*args, state, cg_max_iter=CG_STEPS, backend="triton")  # noqa: E731
        res["public op"] = 1e3 * do_bench(step, warmup=50, rep=300, return_mode="median")
        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(10):
                step()
        res["graph"] = 1e3 * do_bench(graph.replay, warmup=20, rep=200, return_mode="median") / 10
    return {k: round(v, 2) for k, v in res.items()}


def trained_model(args, log):
    """A trained Mesa model and its tokenizer: from --checkpoint, or trained here for --train-steps."""
    from tttlm.train.checkpoint import load_pretrained

    if args.checkpoint:
        model, tok, _ = load_pretrained(args.checkpoint, "cuda")
        return model, tok, dict(checkpoint=args.checkpoint)
    from tttlm.train.config import make_config
    from tttlm.train.trainer import train

    out = tempfile.mkdtemp(prefix="gpu_mesa_")
    steps = args.train_steps
    cfg = make_config(
        model="mesa-small", model_overrides={"num_attention_heads": 2}, corpus=STDLIB, seq_len=512,
        batch_size=16, steps=steps, warmup_steps=min(50, steps // 5), lr=3e-3, out_dir=f"{out}/run",
        cache_dir=f"{out}/cache", eval_every=steps, save_every=steps, log_every=max(1, steps // 4),
        eval_batches=4, tensorboard=False, progress=False,
    )
    t0 = time.perf_counter()
    last = train(cfg, log=log)
    model, tok, _ = load_pretrained(last["checkpoint"], "cuda")
    return model, tok, dict(trained=f"mesa-small, 2 heads x 128, on {STDLIB}", steps=steps, seq_len=512,
                            batch=16, train_s=round(time.perf_counter() - t0, 1), val_loss=last.get("val_loss"))


def held_out_ids(tok, B: int, T: int) -> torch.Tensor:
    """B x T tokens of the training corpus's text, read from the end of its sorted file list (the corpus holds
    out by hash, so some of it was seen in training: the activations are a trained model's either way)."""
    import glob

    files = sorted(glob.glob(STDLIB))[::-1]
    ids: list[int] = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            ids += tok.encode(f.read()).ids
        if len(ids) >= B * T:
            break
    return torch.tensor(ids[: B * T], device="cuda").view(B, T)


def tolerance(args, log) -> dict:
    """Each Mesa layer's op inputs on held-out text: CG steps to cg_tol=1e-4, forward ms at 30 steps and at the
    tolerance, and o's error against exact solves on two of the sequences."""
    from triton.testing import do_bench

    from tttlm.ops import mesa

    model, tok, info = trained_model(args, log)
    ids = held_out_ids(tok, 16, 2048)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # as in training: the kernels it compiled
        layers = [kw for kw in model.mixer_op_inputs(ids) if kw is not None]
    res = dict(info, tokens="16 x 2048", layers=[])
    totals = {"fixed": 0.0, "tol": 0.0}
    for i, kw in enumerate(layers):
        kw = {n: (t.to(torch.bfloat16) if n in ("q", "k", "v") else t) for n, t in kw.items()}
        kw = {n: t for n, t in kw.items() if n not in ("cg_max_iter", "cg_tol")}
        row = dict(layer=i, H=kw["q"].shape[2], D=kw["q"].shape[3])
        with torch.no_grad():
            stats = {}
            mesa(**kw, cg_max_iter=CG_STEPS, cg_tol=TOL, cg_stats=stats, backend="triton")
            row |= dict(mean_iterations=round(stats["mean_iterations"], 2), max_iterations=stats["iterations"])
            for name, tol in (("fixed", None), ("tol", TOL)):
                ms = do_bench(lambda kw=kw, tol=tol: mesa(**kw, cg_max_iter=CG_STEPS, cg_tol=tol, backend="triton"),
                              warmup=5, rep=40, return_mode="median")
                row[f"fwd_ms_{name}"] = round(ms, 3)
                totals[name] += ms
            if i == 0:
                part = {n: (t[:2] if torch.is_tensor(t) and t.dim() >= 3 else t) for n, t in kw.items()}
                ref = exact_output(dict(part))
                for name, tol in (("fixed", None), ("tol", TOL)):
                    o, _ = mesa(**part, cg_max_iter=CG_STEPS, cg_tol=tol, backend="triton")
                    row[f"rel_rmse_o_{name}"] = rel_rmse(o, ref)
        res["layers"].append(row)
        print(json.dumps(row), flush=True)
    res["fwd_ms_fixed"] = round(totals["fixed"], 3)
    res["fwd_ms_tol"] = round(totals["tol"], 3)
    res["speedup"] = round(totals["fixed"] / totals["tol"], 2)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write every number to this file")
    p.add_argument("--tokens", type=int, default=TOKENS)
    p.add_argument("--heads", default="16x128", help="HxD of the speed and accuracy parts")
    p.add_argument("--no-peers", action="store_true", help="time only our kernels")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)} (all)")
    p.add_argument("--update", action="store_true", help="add the parts to the JSON file already at --json")
    p.add_argument("--train-steps", type=int, default=300, help="steps of the model trained for part 4 (300)")
    p.add_argument("--checkpoint", help="a trained Mesa model (run or checkpoint directory) for part 4")
    args = p.parse_args(argv)
    H, D = (int(x) for x in args.heads.split("x"))
    parts = args.parts.split(",")
    if not set(parts) <= set(PARTS):
        p.error(f"--parts takes {', '.join(PARTS)}; got {args.parts}")
    if args.update and not (args.json and os.path.isfile(args.json)):
        p.error("--update needs the JSON file of an earlier run at --json")
    if not torch.cuda.is_available():
        print("gpu_mesa: needs a CUDA GPU", file=sys.stderr)
        return 2
    fla = None if args.no_peers else _fla()
    if fla is None and not args.no_peers:
        print("flash-linear-attention is not installed: its rows are skipped")
    command = "python benchmarks/gpu_mesa.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "command": command,
        "torch": torch.__version__,
        "rows": [],
    }
    if args.update:
        with open(args.json) as f:
            out = json.load(f)
        out["command"] += "; " + command
    print(f"device: {out['device']}, torch {out['torch']}, bf16, {args.tokens} tokens per call", flush=True)

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    def part(name, fn):
        t0 = time.perf_counter()
        try:
            out[name] = fn()
        except Exception as e:  # one part that fails must not lose the others
            out[name] = {"error": repr(e)[:500]}
            print(f"{name} failed: {e!r}", flush=True)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
        save()

    torch.manual_seed(0)
    runs = {
        "rows": lambda: speed_rows(H, D, args.tokens, fla),
        "profile": lambda: profile(H, D, args.tokens),
        "accuracy": lambda: accuracy(H, D, fla),
        "decode": lambda: {B: decode(B) for B in (1, 64)},
        "tolerance": lambda: tolerance(args, lambda *a, **k: print(*a, flush=True)),
    }
    for name in parts:
        part(name, runs[name])
    print_table(out)
    return 0


def print_table(out: dict) -> None:
    rows = out["rows"] if isinstance(out["rows"], list) else []
    print(f"\n{out['device']}, bf16, {CG_STEPS} CG steps; ms (forward / forward+backward)")
    print("| op | " + " | ".join(f"T={T // 1024}k" for T in SEQ_LENS) + " |")
    print("|---|" + "---|" * len(SEQ_LENS))
    for op in OPS:
        cells = []
        for T in SEQ_LENS:
            r = next((r for r in rows if r["op"] == op and r["T"] == T and "operands" not in r), None)
            cells.append("-" if r is None else r.get("error", f"{r.get('fwd_ms')} / {r.get('fwdbwd_ms')}")[:40])
        print(f"| {op} | " + " | ".join(cells) + " |")
    for r in rows:
        if "operands" in r:
            print(f"ours with {r['operands']} CG operands at T={r['T'] // 1024}k: {r.get('fwd_ms')} / "
                  f"{r.get('fwdbwd_ms')} {r.get('error', '')}")
    acc = out.get("accuracy", {})
    if "rel_rmse_o" in acc:
        print("\nrelative RMSE of o against exact solves:",
              ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in acc["rel_rmse_o"].items()))
    if isinstance(out.get("decode"), dict) and "error" not in out["decode"]:
        print("decode us per token:", ", ".join(f"batch {B}: {d}" for B, d in out["decode"].items()))
    tol = out.get("tolerance", {})
    if "speedup" in tol:
        mean = sum(r["mean_iterations"] for r in tol["layers"]) / len(tol["layers"])
        print(f"trained model, cg_tol={TOL}: {mean:.1f} CG steps per query on average (most "
              f"{max(r['max_iterations'] for r in tol['layers'])}); forward {tol['fwd_ms_tol']} ms against "
              f"{tol['fwd_ms_fixed']} ms at {CG_STEPS} steps ({tol['speedup']}x)")
    elif tol:
        print("trained model part:", tol)


if __name__ == "__main__":
    sys.exit(main())
