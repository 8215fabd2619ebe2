"""benchmarks/kernel_registers.py compiles every Triton kernel of tttlm (the TTT and Mesa ops', the Mamba2 scan's,
the fused loss's) for the H100 on this (GPU-less) machine."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def report(*args: str) -> list[list[str]]:
    """The report's table rows (cells stripped) for `kernel_registers.py ARGS`."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel_registers.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.stdout.splitlines() if line.startswith("| ")]
    return [r for r in rows if r[0] != "H×D"]


def test_reports_every_ttt_linear_kernel():
    """At a small head every kernel but the split ones (which run only at on-chip width 128); at 128 those
    too, as they compile for the GPU only there."""
    rows = report("--heads", "2x16,1x128", "--ops", "ttt_linear")
    kernels = {"_fwd_kernel", "_output_kernel", "_local_kernel", "_chain_kernel", "_finish_kernel", "_step_kernel"}
    for heads, expected in (("2×16", kernels), ("1×128", kernels | {"_split_fwd_kernel", "_split_chain_kernel"})):
        assert expected <= {r[1] for r in rows if r[0] == heads}, heads
    for r in rows:
        assert 0 < int(r[4]) <= 255, r  # registers per thread


def test_reports_every_ttt_mlp_kernel():
    rows = report("--heads", "2x16", "--ops", "ttt_mlp")
    assert {r[1] for r in rows} == {"_fwd_kernel", "_bwd_kernel", "_step_kernel"}
    assert len(rows) == 6  # the forward with and without what the backward keeps, likewise the backward, the
    # decode step out of place and in place
    for r in rows:
        assert 0 < int(r[4]) <= 255, r


def test_ttt_mlp_width_64_compiles_to_the_wgmma_verified_on_a_gpu():
    """At head width 64 the TTT-MLP kernels, compiled with 8 warps, used a wgmma of shape m64n32k8 (A operand in
    registers) and gave NaN on an H200, though their PTX is right (`benchmarks/ptx_emulate.py`). They must use
    only m64n64k8, the shape of the kernels that pass there at width 128 (`triton_parts.CHUNK_WIDTHS_ON_CUDA`)."""
    rows = report("--heads", "1x64", "--ops", "ttt_mlp")
    assert len(rows) == 6
    for r in rows:
        assert r[-1] == ("-" if r[1] == "_step_kernel" else "m64n64k8 (A regs)"), r


def test_reports_every_mesa_kernel():
    rows = report("--heads", "2x16,1x128", "--ops", "mesa")
    kernels = {"_scan_fwd_kernel", "_solve_fwd_kernel", "_solve_bwd_kernel", "_scan_bwd_kernel", "_grads_kernel",
               "_mesa_step_kernel"}
    for heads in ("2×16", "1×128"):
        assert kernels <= {r[1] for r in rows if r[0] == heads}, heads
    for r in rows:
        assert 0 < int(r[4]) <= 255, r


def test_reports_every_ssd_and_fused_loss_kernel():
    rows = report("--ops", "ssd,linear_ce")
    ssd = {"_scan_kernel", "_chunk_y_kernel", "_scan_bwd_kernel", "_chunk_dx_kernel", "_dbc_kernel", "_ddt_kernel"}
    assert ssd <= {r[1] for r in rows if r[0] == "ssd 24×64"}
    assert {r[1] for r in rows if r[0] == "loss"} == {"_ce_rows_kernel"}
    for r in rows:
        assert 0 < int(r[4]) <= 255, r
