"""Time TTT-Linear's GPU kernels against flash-linear-attention and SDPA flash attention (needs CUDA).

Runs benchmarks/gpu_ttt_linear.py from a source checkout: forward and forward+backward ms for 32,768 tokens
per call at T = 2k, 8k, 32k (H16xD128 and H32xD64, bf16), then decode us per token at batch 1 and 64.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tttlm.errors import UserError

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "gpu_ttt_linear.py"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", help="also write every number to this file")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per call (default 32768)")
    parser.add_argument("--heads", default="16x128,32x64", help="comma-separated HxD (default 16x128,32x64)")
    parser.add_argument("--no-peers", action="store_true", help="time only tttlm's kernels")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode timings")
    parser.add_argument("--split", type=int, help="programs per (sequence, head) in tttlm's sequential kernels, "
                        "forced in each that offers it at the head dim (1, 2, 4 or 8; default: as the op picks)")


def run(args: argparse.Namespace) -> int:
    import importlib.util

    import torch

    if not SCRIPT.is_file():
        raise UserError(f"the benchmark script {SCRIPT} is missing: run `tttlm bench` from a source checkout")
    if not torch.cuda.is_available():
        raise UserError("tttlm bench needs a CUDA GPU")
    spec = importlib.util.spec_from_file_location("gpu_ttt_linear", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--tokens", str(args.tokens), "--heads", args.heads]
    argv += ["--json", args.json] if args.json else []
    argv += ["--no-peers"] if args.no_peers else []
    argv += ["--no-decode"] if args.no_decode else []
    argv += ["--split", str(args.split)] if args.split is not None else []
    return module.main(argv)
