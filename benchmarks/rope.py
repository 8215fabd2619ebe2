"""RoPE inside a compiled block: its tables built in the block (cos and sin computed for every element of q, as
inductor fuses them) against tables built once per batch outside it (`SeqInfo.rope`, what the models do).
Forward+backward of one rotation, median of --repeats calls, on CUDA when there is one, else the CPU.

    python benchmarks/rope.py [--shape 8x1024x12x64] [--dtype float32|bfloat16] [--repeats 10] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

from tttlm.layers import rope, rope_tables


def timed(fn, args, repeats: int, sync) -> float:
    """Median seconds of fn(*args) forward and backward, after 3 calls that compile and warm up."""

    def once():
        fn(*args).sum().backward()

    for _ in range(3):
        once()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        once()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="8x1024x12x64", help="BxTxHxD of q")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", help="also write the row to this file")
    args = p.parse_args()
    B, T, H, D = (int(v) for v in args.shape.split("x"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    x = torch.randn(B, T, H, D, device=device, dtype=getattr(torch, args.dtype), requires_grad=True)
    pos = torch.arange(T, device=device).expand(B, T)
    in_block = torch.compile(lambda x, pos: rope(x, rope_tables(pos, D)), dynamic=True)
    prebuilt = torch.compile(rope, dynamic=True)
    tables = rope_tables(pos, D)
    row = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "shape": args.shape, "dtype": args.dtype,
        "in_block_ms": 1e3 * timed(in_block, (x, pos), args.repeats, sync),
        "prebuilt_ms": 1e3 * timed(prebuilt, (x, tables), args.repeats, sync),
        "max_abs_diff": (in_block(x, pos) - prebuilt(x, tables)).abs().max().item(),
    }
    print(f"RoPE fwd+bwd {args.shape} {args.dtype} on {row['device']}: tables in the block "
          f"{row['in_block_ms']:.2f} ms, prebuilt {row['prebuilt_ms']:.2f} ms; outputs differ by at most "
          f"{row['max_abs_diff']:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
