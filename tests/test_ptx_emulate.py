"""benchmarks/ptx_emulate.py runs Triton kernels as compiled for sm_90 on CPU, in `ptx_emulator`."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")])
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=900)


def test_ttt_mlp_kernels_match_the_pytorch_path():
    """The forward and backward kernels at head dim 64 with two sequences, every output and gradient, and no race
    between warps (the kernels the H200 ran give NaN there only in their machine code)."""
    out = run(str(ROOT / "benchmarks" / "ptx_emulate.py"), "ttt_mlp", "--shape", "1x40x2x64", "--cu", "0,9,40",
              "--backward")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "dgrad_W2" in out.stdout and "0 findings" in out.stdout


def test_reports_a_race_between_warps(tmp_path):
    """Warps that read what other warps stored with no barrier between: reported, and silent with the barrier."""
    script = tmp_path / "race.py"
    script.write_text(textwrap.dedent('''
        import torch
        import triton
        import triton.language as tl
        from ptx_emulate import emulated

        @triton.jit
        def reverse(X, Y, N: tl.constexpr, BARRIER: tl.constexpr):
            i = tl.arange(0, N)
            tl.store(X + i, i.to(tl.float32))
            if BARRIER:
                tl.debug_barrier()
            tl.store(Y + i, tl.load(X + N - 1 - i))

        for barrier in (False, True):
            x, y = torch.zeros(256), torch.zeros(256)
            with emulated() as findings:
                reverse[(1,)](x, y, N=256, BARRIER=barrier, num_warps=8)
            assert torch.equal(y, torch.arange(255.0, -1, -1)), y
            print(barrier, findings)
    '''))
    out = run(str(script), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    without, with_barrier = out.stdout.splitlines()
    assert "RAW at PTX line" in without and "written by warp 7" in without, without
    assert with_barrier == "True []"
