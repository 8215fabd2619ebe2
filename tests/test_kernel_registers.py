"""benchmarks/kernel_registers.py compiles every TTT-Linear kernel for the H100 on this (GPU-less) machine."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reports_every_kernel():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel_registers.py"), "--heads", "2x16"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| 2×16 |")]
    names = {r[1].strip() for r in rows}
    kernels = {"_fwd_kernel", "_output_kernel", "_local_kernel", "_chain_kernel", "_finish_kernel", "_step_kernel"}
    assert kernels <= names
    for r in rows:
        assert 0 < int(r[4]) <= 255, r  # registers per thread
