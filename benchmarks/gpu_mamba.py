"""Time Mamba's selective scan (tttlm.ops.selective_scan, Triton) beside Mamba2's SSD (tttlm.ops.ssd) on one GPU.

Forward and forward+backward ms for 32,768 tokens per call (B = 32768 / T) at T = 2k, 8k, 32k, at the 125m
presets' widths, bf16 inputs: mamba-125m's scan (E = 1536 channels, N = 16 states, delta through softplus with
its bias, D skip) and mamba2-125m's SSD (24 heads of 64, N = 128, one group, chunks of 64). Beside ours, the
memory floor: the bytes the scan's kernels must move, at 4.3 TB/s (the H200's measured bandwidth, DESIGN.md).
Then one decode step of the scan (us per token at batch 1 and 64), and with --sweep our kernels' fwd+bwd under
other tile sizes and channels per program. --registers needs no GPU: it compiles the kernels for sm_90 (through
benchmarks/kernel_registers.py) and prints their registers and spills.

    python benchmarks/gpu_mamba.py [--json OUT.json] [--tokens 32768] [--sweep]
    tttlm bench mamba [same arguments]
    python benchmarks/gpu_mamba.py --registers      # any machine
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

TOKENS = 32768
SEQ_LENS = (2048, 8192, 32768)
E, N = 1536, 16  # mamba-125m: expand 2 x 768, d_state 16
HEADS, HEADDIM, N2 = 24, 64, 128  # mamba2-125m: 1536 / 64 heads, d_state 128
BANDWIDTH = 4.3e12  # bytes/s
OPS = ("mamba selective_scan (ours, Triton)", "mamba2 ssd (PyTorch)")


def make_call(op: str, B: int, T: int):
    """A closure running the op's forward, and the tensors to zero the gradients of."""
    dev, dt = "cuda", torch.bfloat16
    if op == OPS[0]:
        from tttlm.ops.selective_scan import selective_scan

        u = torch.randn(B, T, E, device=dev, dtype=dt)
        delta = (torch.randn(B, T, E, device=dev) * 0.5).to(dt)
        A = -torch.arange(1.0, N + 1, device=dev).expand(E, N).contiguous()
        Bm, Cm = (torch.randn(B, T, N, device=dev, dtype=dt) for _ in range(2))
        D = torch.ones(E, device=dev)
        bias = torch.full((E,), math.log(math.expm1(0.01)), device=dev)
        leaves = [t.requires_grad_() for t in (u, delta, A, Bm, Cm, D, bias)]
        return (lambda: selective_scan(u, delta, A, Bm, Cm, D, delta_bias=bias, delta_softplus=True)[0]), leaves
    from tttlm.ops.ssd import ssd

    x = torch.randn(B, T, HEADS, HEADDIM, device=dev, dtype=dt)
    dtv = (torch.rand(B, T, HEADS, device=dev) * 0.1).to(dt)
    A = -torch.rand(HEADS, device=dev) * 15 - 1
    Bm, Cm = (torch.randn(B, T, 1, N2, device=dev, dtype=dt) for _ in range(2))
    leaves = [t.requires_grad_() for t in (x, dtv, A, Bm, Cm)]
    return (lambda: ssd(x, dtv, A, Bm, Cm, chunk_size=64)[0]), leaves


def time_op(op: str, B: int, T: int) -> tuple[float, float]:
    from triton.testing import do_bench

    fn, leaves = make_call(op, B, T)
    with torch.no_grad():
        f_ms = do_bench(fn, warmup=10, rep=60, return_mode="median")
    dy = torch.randn_like(fn())
    fb_ms = do_bench(lambda: fn().backward(dy), warmup=5, rep=40, return_mode="median", grad_to_none=leaves)
    return f_ms, fb_ms


def floor_ms(B: int, T: int) -> tuple[float, float]:
    """The scan's memory floor in ms: (forward without autograd, forward + backward). Forward: read u, delta
    (bf16), B, C, write y; in training also the float32 state entering every tile. Backward: read u, delta, dy, B,
    C and the kept states, write du, ddelta and the float32 per-channel-block parts of dB and dC, read them back."""
    from tttlm.ops.selective_scan import triton_scan

    M = B * T
    fwd = 2 * M * E * 2 + 2 * M * N * 2 + M * E * 2
    kept = M // triton_scan.BT * E * N * 4
    blocks = math.ceil(E / triton_scan.channel_block(B, E, torch.device("cuda")))
    bwd = 3 * M * E * 2 + 2 * M * N * 2 + kept + 2 * M * E * 2 + 2 * 2 * blocks * M * N * 4
    return 1e3 * fwd / BANDWIDTH, 1e3 * (fwd + kept + bwd) / BANDWIDTH


def time_decode(B: int) -> float:
    """us per token of one scan step (the layer's decode path) at batch B."""
    from triton.testing import do_bench

    from tttlm.ops.selective_scan import selective_scan_step

    dev, dt = "cuda", torch.bfloat16
    u, delta = (torch.randn(B, E, device=dev, dtype=dt) for _ in range(2))
    Bm, Cm = (torch.randn(B, N, device=dev, dtype=dt) for _ in range(2))
    A = -torch.arange(1.0, N + 1, device=dev).expand(E, N).contiguous()
    D, bias, state = torch.ones(E, device=dev), torch.zeros(E, device=dev), torch.zeros(B, E, N, device=dev)
    with torch.no_grad():
        return 1e3 * do_bench(lambda: selective_scan_step(u, delta, A, Bm, Cm, D, delta_bias=bias,
                                                          delta_softplus=True, state=state),
                              warmup=50, rep=200, return_mode="median")


def sweep(tokens: int) -> list[dict]:
    """Ours, fwd+bwd, at T = 2k and 32k under other tokens per tile (BT) and channels per program (BE)."""
    from tttlm.ops.selective_scan import triton_scan

    rows = []
    bt, block = triton_scan.BT, triton_scan.channel_block
    for BT, BE in ((16, 16), (16, 8), (8, 16), (8, 32)):  # (32, 8) and (16, 32) spill in the backward
        triton_scan.BT, triton_scan.channel_block = BT, (lambda sequences, e, device, be=BE: be)
        for T in (2048, SEQ_LENS[-1]):
            try:
                f_ms, fb_ms = time_op(OPS[0], max(1, tokens // T), T)
                row = dict(BT=BT, BE=BE, T=T, fwd_ms=round(f_ms, 3), fwdbwd_ms=round(fb_ms, 3))
            except Exception as e:  # a setting that fails to compile or run must not hide the others
                row = dict(BT=BT, BE=BE, T=T, error=repr(e)[:200])
            rows.append(row)
            print("sweep " + json.dumps(row), flush=True)
    triton_scan.BT, triton_scan.channel_block = bt, block
    return rows


def registers(arch: int = 90) -> list[dict]:
    """Registers, spills and shared memory of the forward and backward kernels compiled for sm_`arch` at the
    125m width, for each channel block the op picks (no GPU needed)."""
    import importlib.util
    import types
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("kernel_registers", Path(__file__).with_name("kernel_registers.py"))
    kr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kr)  # drops TRITON_INTERPRET: the kernels are compiled, not interpreted
    from tttlm.ops.selective_scan import triton_scan

    T, dt = 64, torch.bfloat16
    u, delta = (torch.randn(T, E, dtype=dt) for _ in range(2))
    Bm, Cm = (torch.randn(T, N, dtype=dt) for _ in range(2))
    A, D, bias, cu = -torch.ones(E, N), torch.ones(E), torch.zeros(E), torch.tensor([0, T])
    ctx = types.SimpleNamespace(needs_input_grad=(True,) * 8)
    ctx.save_for_backward = lambda *t: setattr(ctx, "saved_tensors", t)
    block = triton_scan.channel_block
    rows = []
    for be in (16, 8):
        triton_scan.channel_block = lambda sequences, e, device, be=be: be
        with kr.compile_only(arch) as found:
            triton_scan._SelectiveScanFn.forward(ctx, u, delta, A, Bm, Cm, D, bias, None, cu, T, True, True)
            triton_scan._SelectiveScanFn.backward(ctx, torch.randn_like(u), torch.zeros(1, E, N))
        rows += found
    triton_scan.channel_block = block
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write every number to this file")
    p.add_argument("--tokens", type=int, default=TOKENS)
    p.add_argument("--sweep", action="store_true", help="after the table, ours under other tile settings")
    p.add_argument("--registers", action="store_true", help="compile for sm_90 and report registers (no GPU)")
    args = p.parse_args(argv)
    if args.registers:
        print("| kernel | BE | warps | registers | spill stores B | spill loads B | shared B |")
        print("|---|---|---|---|---|---|---|")
        for r in registers():
            print(f"| {r['kernel']} | {r['constexprs']['BE']} | {r['warps']} | {r['registers']} | "
                  f"{r['spill_store_bytes']} | {r['spill_load_bytes']} | {r['shared_bytes']} |")
        return 0
    if not torch.cuda.is_available():
        print("gpu_mamba: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": [], "decode_us": {}}
    print(f"device: {out['device']}, torch {out['torch']}, bf16, {args.tokens} tokens per call", flush=True)

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    for T in SEQ_LENS:
        B = max(1, args.tokens // T)
        for op in OPS:
            try:
                f_ms, fb_ms = time_op(op, B, T)
                row = dict(op=op, T=T, B=B, fwd_ms=round(f_ms, 3), fwdbwd_ms=round(fb_ms, 3))
            except Exception as e:  # one op failing must not hide the other rows
                row = dict(op=op, T=T, B=B, error=repr(e)[:200])
            if op == OPS[0]:
                row["floor_fwd_ms"], row["floor_fwdbwd_ms"] = (round(x, 3) for x in floor_ms(B, T))
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    for B in (1, 64):
        out["decode_us"][B] = round(time_decode(B), 2)
    save()
    print_table(out, args.tokens)
    if args.sweep:
        out["sweep"] = sweep(args.tokens)
        save()
    return 0


def print_table(out: dict, tokens: int) -> None:
    print(f"\n{out['device']}, bf16, {tokens} tokens per call, 125m widths; ms (forward / forward+backward)")
    print("| op | " + " | ".join(f"T={T // 1024}k fwd | T={T // 1024}k fwd+bwd" for T in SEQ_LENS) + " |")
    print("|---|" + "---|" * (2 * len(SEQ_LENS)))
    for op in OPS:
        cells = []
        for T in SEQ_LENS:
            row = next(r for r in out["rows"] if r["op"] == op and r["T"] == T)
            cells += [str(row.get("fwd_ms", "err")), str(row.get("fwdbwd_ms", "err"))]
        print(f"| {op} | " + " | ".join(cells) + " |")
    cells = []
    for T in SEQ_LENS:
        row = next(r for r in out["rows"] if r["op"] == OPS[0] and r["T"] == T)
        cells += [str(row["floor_fwd_ms"]), str(row["floor_fwdbwd_ms"])]
    print("| memory floor of the scan (4.3 TB/s) | " + " | ".join(cells) + " |")
    print("decode, one scan step, us per token: " + ", ".join(f"batch {b}: {v}" for b, v in out["decode_us"].items()))


if __name__ == "__main__":
    sys.exit(main())
