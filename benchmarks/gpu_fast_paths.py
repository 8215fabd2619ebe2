"""The models' fast paths on the GPU against the plain PyTorch model: loss and gradients in bf16, and no host
synchronisation inside a training step.

For each mixer, one model (random weights) is run on the same batch three ways: plain PyTorch in float32 (no
autocast), plain PyTorch in bf16 autocast (`tttlm.fast` off: no compile, no FlexAttention, the PyTorch Mamba2
scan and the chunked float32 loss), and with the fast paths on in bf16 autocast (compiled blocks, tttlm's
kernels). bf16's own error is plain-bf16 against float32; the fast paths pass when their difference from plain
bf16 stays within twice that, plus 1e-3 (relative, for the loss and for the gradients of all parameters
together). Plain rows (B = 2) and, for the mixers with their own packed paths, documents packed by position ids
(restarting; the model reads them on the host). Then one more step runs under
torch.cuda.set_sync_debug_mode("error"): any operation that makes the host wait for the GPU fails it, and is
named. Ops outside this work (Mesa's, TTT-MLP's) still wait in places; they are reported, not failed. Last, on
plain rows, decoding after the compiled steps: one row's last 16 tokens read one at a time through
tttlm.models.decode (a captured CUDA graph on static buffers) after a prefill of the rest, whose bf16 logits must
stay within twice bf16's own error of the plain forward's (plain bf16 against float32), plus 1e-3.

    python benchmarks/gpu_fast_paths.py [--size 125m] [--mixers ...] [--budget 150]

Prints one line per check and a table; exits 1 if a check fails. --budget: seconds after which the remaining
mixers are skipped (compilation makes the first step of each model slow).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import torch

MIXERS = ("transformer", "ttt_linear", "mamba2", "mamba", "mesa", "ttt_mlp")
PACKED = ("transformer", "ttt_linear", "mamba2")  # mixers with packed paths of their own in tttlm's fast paths
OWN_SYNCS = ("mesa", "ttt_mlp")  # their ops wait for the GPU in places (not in this work's reach)
DEVICE = "cuda"  # a CPU run (tests) checks this script's logic, without kernels or sync checks


def _grads(model) -> dict:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, ids, pos, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids, position_ids=pos).loss
    loss.backward()
    return loss.detach().double().item(), _grads(model)


def _rel(a: dict, b: dict) -> float:
    num = sum(((a[n] - b[n]).double() ** 2).sum() for n in b)
    den = sum((b[n].double() ** 2).sum() for n in b)
    return float((num / den).sqrt())


def _worst(a: dict, b: dict) -> tuple[str, float]:
    errs = {n: float((a[n] - b[n]).double().norm() / b[n].double().norm().clamp_min(1e-30)) for n in b}
    name = max(errs, key=errs.get)
    return name, errs[name]


def check_mixer(mixer: str, size: str, packed: bool, batch: int, seq_len: int) -> dict:
    from torch._dynamo.utils import counters

    from tttlm.fast import fast_paths
    from tttlm.models import build_model

    torch.manual_seed(0)
    model = build_model(f"{mixer}-{size}").to(DEVICE).train()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=DEVICE)
    pos = None
    if packed:  # documents of 1 to seq_len / 2 tokens, positions on the CPU as the trainer passes them
        g = torch.Generator().manual_seed(1)
        rows = []
        for _ in range(batch):
            cuts = sorted(torch.randperm(seq_len - 1, generator=g)[:5].add(1).tolist())
            lengths = [b - a for a, b in zip([0, *cuts], [*cuts, seq_len])]
            rows.append(torch.cat([torch.arange(n) for n in lengths]))
        pos = torch.stack(rows)
    with fast_paths(compile=False, kernels=False):
        loss32, g32 = _run(model, ids, pos, autocast=False)
        loss16, g16 = _run(model, ids, pos, autocast=True)
    with fast_paths(compile=True, kernels=True):
        graphs = counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        _run(model, ids, pos, autocast=True)  # compiles
        first = time.perf_counter() - start
        graphs = counters["stats"]["unique_graphs"] - graphs
        loss_f, g_f = _run(model, ids, pos, autocast=True)
        sync = _host_syncs(model, ids, pos) if DEVICE == "cuda" else None
        decode = None if packed else _decode(model, ids[:1])
    noise_loss = abs(loss16 - loss32) / abs(loss32)
    noise_grad = _rel(g16, g32)
    d_loss = abs(loss_f - loss16) / abs(loss32)
    d_grad = _rel(g_f, g16)
    worst = _worst(g_f, g16)
    ok = d_loss <= 2 * noise_loss + 1e-3 and d_grad <= 2 * noise_grad + 1e-3 and set(g_f) == set(g16)
    if decode is not None:
        ok &= decode["d"] <= 2 * decode["noise"] + 1e-3 and (decode["captured"] or DEVICE != "cuda")
    return dict(mixer=mixer, packed=packed, loss=loss_f, d_loss=d_loss, noise_loss=noise_loss, d_grad=d_grad,
                noise_grad=noise_grad, worst=worst, first_step_s=first, graphs=graphs, sync=sync, decode=decode,
                ok=ok)


def _decode(model, row, steps: int = 16) -> dict:
    """Decoding after compiled steps: row [1, T] read as a prefill of T - steps tokens and `steps` single tokens
    through tttlm.models.decode (the CUDA graph on CUDA), in bf16, against the plain forward. Returns {"d": its
    logits' relative difference from the plain bf16 forward's, "noise": plain bf16 against float32,
    "captured": whether the step ran from a CUDA graph}."""
    from tttlm.fast import fast_paths
    from tttlm.models import TTTLMCache

    P = row.shape[1] - steps
    model.eval()
    try:
        with torch.no_grad():
            with fast_paths(compile=False, kernels=False):
                full32 = model(row).logits[:, P - 1 :].double()
                with torch.autocast(DEVICE, dtype=torch.bfloat16):
                    full16 = model(row).logits[:, P - 1 :].double()
            cache = TTTLMCache(model.config.num_hidden_layers)
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                out = [model(row[:, :P], use_cache=True, past_key_values=cache, logits_to_keep=1).logits]
                out += [model(row[:, t : t + 1], past_key_values=cache).logits for t in range(P, row.shape[1])]
    finally:
        model.train()
    got = torch.cat(out, 1).double()
    return {"d": float((got - full16).norm() / full32.norm()), "noise": float((full16 - full32).norm() / full32.norm()),
            "captured": cache.decoder is not None and cache.decoder.graph is not None}


def _host_syncs(model, ids, pos) -> str | None:
    """Where a fast-path training step (its loss not read: that is the one wait a step needs) first makes the
    host wait for the GPU, or None."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, position_ids=pos).loss
        loss.backward()
    except RuntimeError as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "/tttlm/" in f.filename]
        where = frames[-1] if frames else traceback.extract_tb(e.__traceback__)[-1]
        return f"{str(e).splitlines()[0][:80]} at {where.filename.split('/src/')[-1]}:{where.lineno}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return None


def _decoded(d: dict | None) -> str:
    if d is None:
        return "-"
    return f"{d['d']:.1e} / {d['noise']:.1e}{'' if d['captured'] else ' (no graph)'}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="125m", help="preset size (125m)")
    p.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=MIXERS)
    p.add_argument("--batch", type=int, default=2, help="rows of the plain batch (2)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row (512)")
    p.add_argument("--budget", type=float, default=150.0, help="seconds after which the rest is skipped (150)")
    args = p.parse_args(argv)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("gpu_fast_paths.py needs a CUDA GPU", file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    print(f"{name}, torch {torch.__version__}; {args.size} models, bf16 autocast; "
          f"fast paths on vs plain PyTorch (relative differences; bf16 noise = plain bf16 vs plain float32)",
          flush=True)
    start, results, failed = time.perf_counter(), [], False
    # plain rows of every mixer first (their compiled code is what `tttlm throughput` reuses), then packed ones
    runs = [(m, False) for m in args.mixers] + [(m, True) for m in args.mixers if m in PACKED]
    for mixer, packed in runs:
        label = f"{mixer}-{args.size} {'packed' if packed else 'plain'}"
        if time.perf_counter() - start > args.budget:
            print(f"{label}: skipped (over the {args.budget:.0f} s budget)", flush=True)
            continue
        try:
            r = check_mixer(mixer, args.size, packed, args.batch, args.seq_len)
        except Exception as e:  # noqa: BLE001 - reported, and the other mixers still run
            failed = True
            print(f"{label}: FAILED with {type(e).__name__}: {str(e)[:400]}", flush=True)
            traceback.print_exc(limit=-4)
            continue
        sync_ok = r["sync"] is None or mixer in OWN_SYNCS
        failed |= not (r["ok"] and sync_ok)
        results.append((label, r))
        syncs = "none" if r["sync"] is None else r["sync"] + ("" if sync_ok else " FAIL")
        print(f"{label}: {'PASS' if r['ok'] else 'FAIL'} loss {r['loss']:.4f}, d_loss {r['d_loss']:.1e} (noise "
              f"{r['noise_loss']:.1e}), d_grad {r['d_grad']:.1e} (noise {r['noise_grad']:.1e}), worst "
              f"{r['worst'][0]} {r['worst'][1]:.1e}; first step {r['first_step_s']:.0f} s ({r['graphs']} graphs "
              f"compiled); host syncs: {syncs}; decode after compile: {_decoded(r['decode'])}", flush=True)
    print("\n| model | batch | d_loss / noise | d_grad / noise | host syncs in a step | decode after compile / noise |"
          "\n|---|---|---|---|---|---|")
    for label, r in results:
        print(f"| {label.split()[0]} | {label.split()[1]} | {r['d_loss']:.1e} / {r['noise_loss']:.1e} | "
              f"{r['d_grad']:.1e} / {r['noise_grad']:.1e} | {'none' if r['sync'] is None else r['sync']} | "
              f"{_decoded(r['decode'])} |")
    print("\nfast paths:", "FAIL" if failed else "PASS", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
