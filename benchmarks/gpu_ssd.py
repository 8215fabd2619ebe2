"""Time Mamba2's SSD (tttlm.ops.ssd's Triton kernels) at mamba2-125m's layer on one GPU.

Forward and forward+backward ms of one layer's scan at B16 x T2048 and B4 x T8192 (24 heads of 64, state 128,
one group, chunks of 64; x, B, C in bf16, dt and A in float32), ours beside an earlier version of the kernels
(--baseline: a git revision, or a file holding that version's triton_ssd.py) and beside the memory floor of our
kernels' traffic at 4.3 TB/s (the H200's measured bandwidth, DESIGN.md). Then GPU ms per kernel of one
forward+backward at B16 x T2048 (torch.profiler), and with --sweep ours under other tiles, warps and product
dtypes, each with its error against a float64 run (relative RMSE of y and of every gradient, B2 x T2048).
--tests first runs tests/ops/test_ssd_triton.py (on CUDA: bf16 at the 125m heads) in a subprocess.
--budget S starts no sweep setting that could end past S seconds from the start.

    python benchmarks/gpu_ssd.py [--json OUT.json] [--baseline REV|FILE] [--tests] [--sweep] [--budget S]
    tttlm bench ssd [same arguments]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ((16, 2048), (4, 8192))
H, P, G, N, L = 24, 64, 1, 128, 64  # mamba2-125m: 1536 / 64 heads, d_state 128, chunk 64
BANDWIDTH = 4.3e12  # bytes/s
DEVICE = "cuda"
# (name, settings of tttlm.ops.ssd.triton_ssd): the first is the module's own
SWEEP = (
    ("default", {}),
    ("dB dC 32 columns", dict(DBC_COLUMNS=32)),
    ("passes 32 rows, 8 warps", dict(SCAN_ROWS=32, SCAN_WARPS=8)),
    ("per-chunk kernels 2 chunks each", dict(CHUNK_STEP=2)),
    ("per-chunk kernels 8 warps", dict(CHUNK_WARPS=8)),
    ("tf32 products", dict(LOW_PRODUCTS=False)),
    ("Y, dx in the passes", dict(Y_IN_SCAN=True, DX_IN_SCAN=True, SCAN_ROWS=32, SCAN_WARPS=8)),
)
SETTING_S = 15  # about what one setting takes (compiling included): none starts later than --budget minus this


def inputs(B: int, T: int, seed: int = 0) -> list[torch.Tensor]:
    """x, dt, A, B, C as the layer gives them (dt after the softplus), on the GPU."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(B, T, H, P, device=DEVICE, generator=g).bfloat16()
    dt = torch.rand(B, T, H, device=DEVICE, generator=g) * 0.1
    A = -(torch.rand(H, device=DEVICE, generator=g) * 15 + 1)
    Bm, Cm = (torch.randn(B, T, G, N, device=DEVICE, generator=g).bfloat16() for _ in range(2))
    return [x, dt, A, Bm, Cm]


def baseline_module(spec: str):
    """The earlier kernels' module, from a file or from git (`git show REV:src/tttlm/ops/ssd/triton_ssd.py`)."""
    path = Path(spec)
    if not path.is_file():
        src = subprocess.run(["git", "show", f"{spec}:src/tttlm/ops/ssd/triton_ssd.py"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        path = Path(tempfile.mkdtemp()) / "triton_ssd_baseline.py"
        path.write_text(src)
    module_spec = importlib.util.spec_from_file_location("triton_ssd_baseline", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def timings(op, B: int, T: int) -> dict:
    """Forward (no autograd) and forward+backward ms, medians of triton.testing.do_bench."""
    from triton.testing import do_bench

    leaves = [t.requires_grad_() for t in inputs(B, T)]
    fn = lambda: op(*leaves, chunk_size=L)[0]  # noqa: E731
    with torch.no_grad():
        fwd = do_bench(fn, warmup=10, rep=50, return_mode="median")
    dy = torch.randn_like(fn())
    fwdbwd = do_bench(lambda: fn().backward(dy), warmup=5, rep=50, return_mode="median", grad_to_none=leaves)
    return dict(fwd_ms=round(fwd, 3), fwdbwd_ms=round(fwdbwd, 3))


def kernel_ms(op, B: int, T: int) -> dict:
    """GPU ms per kernel of one forward+backward (the mean of 3 calls after 2 warm-up calls)."""
    from torch.profiler import ProfilerActivity, profile

    leaves = [t.requires_grad_() for t in inputs(B, T)]
    dy = torch.randn(B, T, H, P, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(2):
        op(*leaves, chunk_size=L)[0].backward(dy)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            op(*leaves, chunk_size=L)[0].backward(dy)
        torch.cuda.synchronize()
    times = {e.key: round(e.device_time_total / 3e3, 3) for e in prof.key_averages() if e.device_time_total > 0}
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def errors(op, reference: dict) -> dict:
    """Relative RMSE of y and of each gradient against the float64 PyTorch path (B2 x T2048)."""
    leaves = [t.requires_grad_() for t in inputs(2, 2048, seed=1)]
    y = op(*leaves, chunk_size=L)[0]
    y.float().backward(reference["wy"])
    got = {"y": y, **{f"d{n}": t.grad for n, t in zip(("x", "dt", "A", "B", "C"), leaves)}}
    return {k: float((got[k].detach().double() - v).norm() / v.norm()) for k, v in reference["out"].items()}


def reference() -> dict:
    from tttlm.ops.ssd import ssd_chunked

    leaves = [t.double().requires_grad_() for t in inputs(2, 2048, seed=1)]
    y = ssd_chunked(*leaves, chunk_size=L)[0]
    wy = torch.randn(y.shape, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(2))
    (y * wy.double()).sum().backward()
    out = {"y": y.detach(), **{f"d{n}": t.grad for n, t in zip(("x", "dt", "A", "B", "C"), leaves)}}
    return dict(wy=wy, out=out)


def floor_ms(B: int, T: int) -> tuple[float, float]:
    """Our kernels' memory floor in ms (forward, forward+backward) as placed by default, the kept states and
    their gradients (K) in float32: the forward's pass reads x, B, dt and writes K, the per-chunk kernel reads them
    with C and writes y; the backward reruns the pass, its reverse pass reads dy, C, dt and writes dK, dx's kernel
    reads x, dy, B, C, dt, dK and writes dx, and B's and C's gradients read x, dy, B, C, K, dK and write float32
    dB, dC (the small per-token parts of dt's gradient left out)."""
    tokens = B * T
    x = tokens * H * P * 2
    bc = tokens * G * N * 2
    dt = tokens * H * 4
    K = B * -(-T // L) * H * P * N * 4
    fwd = (x + bc + dt + K) + (2 * x + 2 * bc + dt + K)
    bwd = (x + bc + dt + K) + (x + bc + dt + K) + (3 * x + 2 * bc + dt + K) + (2 * x + 6 * bc + 2 * K)
    return 1e3 * fwd / BANDWIDTH, 1e3 * (fwd + bwd) / BANDWIDTH


def run_tests() -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/ops/test_ssd_triton.py"]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        print("tests: timed out after 90 s\n" + out[-2000:], flush=True)
        return dict(returncode=None, seconds=90.0, summary="timed out after 90 s")
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    print("tests: " + "\n".join(tail), flush=True)
    return dict(returncode=proc.returncode, seconds=round(time.time() - start, 1), summary=tail[-1] if tail else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write every number to this file")
    p.add_argument("--baseline", default="854a3c7", help="earlier kernels: a git revision or a triton_ssd.py file")
    p.add_argument("--tests", action="store_true", help="first run tests/ops/test_ssd_triton.py")
    p.add_argument("--sweep", action="store_true", help="also time ours under other settings (SWEEP)")
    p.add_argument("--budget", type=float, default=float("inf"), help="seconds after which no sweep setting starts")
    args = p.parse_args(argv)
    start = time.time()
    if not torch.cuda.is_available():
        print("gpu_ssd: needs a CUDA GPU", file=sys.stderr)
        return 2
    from tttlm.ops.ssd import triton_ssd

    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": [], "kernels_ms": {}}
    print(f"device: {out['device']}, torch {out['torch']}; H{H} P{P} G{G} N{N} chunk {L}, bf16", flush=True)

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))

    if args.tests:
        out["tests"] = run_tests()
        save()
    ops = {"ours": triton_ssd.ssd_triton}
    try:
        ops["baseline"] = baseline_module(args.baseline).ssd_triton
    except Exception as e:  # no git or no file: ours alone
        print(f"baseline {args.baseline!r} not loaded: {str(e)[:200]}", flush=True)
    for name, op in ops.items():
        for B, T in SHAPES:
            try:
                row = dict(op=name, B=B, T=T, **timings(op, B, T))
            except Exception as e:  # one failing must not hide the other rows
                row = dict(op=name, B=B, T=T, error=repr(e)[:300])
            if name == "ours":
                row["floor_fwd_ms"], row["floor_fwdbwd_ms"] = (round(v, 3) for v in floor_ms(B, T))
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
        out["kernels_ms"][name] = kernel_ms(op, *SHAPES[0])
        print(f"kernels {name} B{SHAPES[0][0]}xT{SHAPES[0][1]} fwd+bwd: " + json.dumps(out["kernels_ms"][name]),
              flush=True)
        save()
    if args.sweep:
        out["sweep"] = sweep(triton_ssd, start, args.budget, save, out)
    print_table(out)
    save()
    return 0


def sweep(triton_ssd, start: float, budget: float, save, out: dict) -> list[dict]:
    ref = reference()
    rows = []
    out["sweep"] = rows
    for name, settings in SWEEP:
        if time.time() - start > budget - SETTING_S:
            print(f"sweep: {name} skipped (past --budget)", flush=True)
            continue
        saved = {k: getattr(triton_ssd, k) for k in settings}
        for k, v in settings.items():
            setattr(triton_ssd, k, v)
        try:
            row = dict(setting=name, **settings, **timings(triton_ssd.ssd_triton, *SHAPES[0]))
            kernels = kernel_ms(triton_ssd.ssd_triton, *SHAPES[0])
            row["kernels_ms"] = {k: v for k, v in kernels.items() if k.startswith("_")}
            row["rel_rmse"] = {k: float(f"{v:.2e}") for k, v in errors(triton_ssd.ssd_triton, ref).items()}
        except Exception as e:  # a setting that fails to compile or run must not hide the others
            row = dict(setting=name, **settings, error=repr(e)[:300])
        for k, v in saved.items():
            setattr(triton_ssd, k, v)
        rows.append(row)
        print("sweep " + json.dumps(row), flush=True)
        save()
    return rows


def print_table(out: dict) -> None:
    print(f"\n{out['device']}: one mamba2-125m layer's SSD, ms (forward / forward+backward)")
    print("| op | " + " | ".join(f"B{B}xT{T} fwd | B{B}xT{T} fwd+bwd" for B, T in SHAPES) + " |")
    print("|---|" + "---|" * (2 * len(SHAPES)))
    for name in dict.fromkeys(r["op"] for r in out["rows"]):
        cells = []
        for _, T in SHAPES:
            row = next(r for r in out["rows"] if r["op"] == name and r["T"] == T)
            cells += [str(row.get("fwd_ms", "err")), str(row.get("fwdbwd_ms", "err"))]
        print(f"| {name} | " + " | ".join(cells) + " |")
    cells = []
    for _, T in SHAPES:
        row = next(r for r in out["rows"] if r["op"] == "ours" and r["T"] == T)
        cells += [str(row["floor_fwd_ms"]), str(row["floor_fwdbwd_ms"])]
    print("| memory floor of ours (4.3 TB/s) | " + " | ".join(cells) + " |")
    for name, kernels in out["kernels_ms"].items():
        top = [f"{k[:28]} {v}" for k, v in kernels.items()][:7]
        print(f"kernels, {name}: " + ", ".join(top))
    for row in out.get("sweep", []):
        if "error" in row:
            print(f"sweep {row['setting']}: {row['error'][:120]}")
        else:
            worst = max(row["rel_rmse"].items(), key=lambda kv: kv[1])
            print(f"sweep {row['setting']}: fwd {row['fwd_ms']} fwd+bwd {row['fwdbwd_ms']} ms, worst rel RMSE "
                  f"{worst[0]} {worst[1]:.1e}")
    if "tests" in out:
        print(f"tests/ops/test_ssd_triton.py: {out['tests']['summary']} ({out['tests']['seconds']} s)")


if __name__ == "__main__":
    sys.exit(main())
