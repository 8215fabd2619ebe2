"""benchmarks/kernel_registers.py compiles every Triton kernel of tttlm (TTT-Linear's, the Mamba2 scan's, the
fused loss's) for the H100 on this (GPU-less) machine."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reports_every_kernel():
    """At a small head every kernel but the split ones (which run only at on-chip width 128); at 128 those
    too, as they compile for the GPU only there."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel_registers.py"), "--heads", "2x16,1x128"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    kernels = {"_fwd_kernel", "_output_kernel", "_local_kernel", "_chain_kernel", "_finish_kernel", "_step_kernel"}
    ssd = {"_chunk_state_kernel", "_state_passing_kernel", "_chunk_scan_kernel", "_chunk_dstate_kernel",
           "_dstate_passing_kernel", "_chunk_dx_kernel", "_chunk_dbc_kernel"}
    for heads, expected in (("2×16", kernels), ("1×128", kernels | {"_split_fwd_kernel", "_split_chain_kernel"}),
                            ("ssd 24×64", ssd), ("loss", {"_ce_rows_kernel"})):
        rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith(f"| {heads} |")]
        assert expected <= {r[1].strip() for r in rows}, heads
        for r in rows:
            assert 0 < int(r[4]) <= 255, r  # registers per thread
