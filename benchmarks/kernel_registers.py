"""Registers, spills and shared memory of tttlm's Triton kernels as compiled for an NVIDIA GPU, on any machine.

No GPU needed: the op's host code runs on CPU tensors with every kernel launch replaced by Triton's
ahead-of-time compile for the target architecture (default sm_90, the H100), and the ptxas that ships with
Triton reports what each kernel uses. Pointers are marked 16-byte aligned and integers that are multiples of 16
marked so, as Triton's launcher specialises them on the GPU; on the H100 this gave the register counts that the
driver reported there (190 for the old rebuild kernel, 135 for the old finish kernel at D=128). Kernels that spill
(a stack frame, spill stores) hold more than the registers allow, which costs time on the GPU. "code B" is the
machine code's size (its .text sections). The last column names the shapes of the Hopper wgmma instructions in
each kernel's PTX (`-` for none), "(A regs)" where the A operand comes from registers rather than shared memory.

    python benchmarks/kernel_registers.py [--heads 16x128,32x64] [--arch 90] [--ops ttt_linear,ttt_mlp,mesa,ssd,...]
                                          [--tiling FT,FWD_WARPS,BWD_WARPS]

--ops (all by default): ttt_linear, ttt_mlp and mesa compiled at each --heads; ssd (the Mamba2 scan) at the 125m
preset's heads (24 of 64, state 128) and linear_ce (the fused loss) at its width and vocabulary, once. --tiling
compiles TTT-MLP's whole-sequence kernels at every --heads with that `triton_parts.Tiling` (hidden units per
tile at most, warps of the forward and of the backward) instead of the shipped one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import struct
import subprocess
import sys
import tempfile
import types

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be compiled, not interpreted

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
POINTER_TYPES = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64", torch.int32: "i32"
}
HIDDEN_CONSTEXPRS = ("D", "BT", "DV", "BDV")  # the head dims are in their own column; the mini-batch is always 16


def _code_bytes(cubin: str) -> int:
    """Bytes of machine code in a cubin (its ELF's .text sections): a kernel whose hot loop outgrows the SM's
    instruction caches fetches its instructions from L2 at every pass."""
    with open(cubin, "rb") as f:
        elf = f.read()
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx][4]
    total = 0
    for name, _, _, _, _, size in headers:
        if elf[names + name: elf.index(b"\0", names + name)].startswith(b".text."):
            total += size
    return total


def _resources(kernel: JITFunction, args, kwargs, arch: int) -> dict:
    """Compile one launch's specialisation and read ptxas's report of it."""
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = dict(zip((p.name for p in kernel.params), args)) | kwargs
    signature, constexprs, attrs = {}, {}, {}
    for p in kernel.params:
        value = bound.get(p.name, p.default)
        if p.is_constexpr or value is None:  # a None pointer is specialised as a constant
            signature[p.name], constexprs[p.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + POINTER_TYPES[value.dtype]
            attrs[(p.num,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32"
            if value % 16 == 0:
                attrs[(p.num,)] = [["tt.divisibility", 16]]
        else:
            signature[p.name] = "fp32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run(
            [PTXAS, f"-arch=sm_{arch}a", "-v", ptx, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
        code = _code_bytes(os.path.join(tmp, "kernel.cubin"))
    text = report.stdout + report.stderr
    regs = re.search(r"Used (\d+) registers", text)
    # a shape whose A operand comes from registers ("{...}" after the accumulators, not a descriptor) is marked
    wgmma = sorted(set(
        shape + (" (A regs)" if a == "{" else "")
        for shape, a in re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\S*\s+\{[^}]*\},\s*(\{|%)",
                                   compiled.asm["ptx"])
    ))
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return dict(
        kernel=kernel.__name__,
        constexprs={k: v for k, v in constexprs.items() if k not in HIDDEN_CONSTEXPRS},
        warps=options.get("num_warps", 4),
        registers=int(regs.group(1)),
        stack_bytes=int(spills.group(1)),
        spill_store_bytes=int(spills.group(2)),
        spill_load_bytes=int(spills.group(3)),
        shared_bytes=compiled.metadata.shared,
        code_bytes=code,
        wgmma=",".join(wgmma) or "-",
    )


@contextlib.contextmanager
def compile_only(arch: int):
    """Within it, every Triton launch compiles for sm_`arch` and runs nothing; yields the list of reports
    (one per distinct specialisation)."""
    rows, seen = [], set()
    real_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        key = (self.__name__, repr(sorted((k, v) for k, v in kwargs.items() if not isinstance(v, torch.Tensor))))
        if key not in seen:
            seen.add(key)
            rows.append(_resources(self, args, dict(kwargs), arch))
        return None

    JITFunction.run = run
    try:
        yield rows
    finally:
        JITFunction.run = real_run


def ttt_linear_launches(H: int, D: int) -> None:
    """The forward (with and without what the backward needs), the backward (with and without the final
    state's gradient) and the decode step (out of place and in place), on CPU tensors of 4 mini-batches."""
    from tttlm.ops.state import TTTLinearState
    from tttlm.ops.ttt_linear import triton_chunk, triton_parts, triton_split, triton_split_chain, triton_step

    T, dt = 64, torch.bfloat16
    q, k, v = (torch.randn(T, H, D, dtype=dt) for _ in range(3))
    eta = torch.rand(T, H, dtype=dt)
    ln_w, ln_b = torch.ones(H, D, dtype=dt), torch.zeros(H, D, dtype=dt)
    s = torch.ones(16)
    W, gW = torch.zeros(1, H, D, D), torch.zeros(1, H, D, D)
    b, gb = torch.zeros(1, H, D), torch.zeros(1, H, D)
    cu, offset = torch.tensor([0, T]), torch.zeros(1, dtype=torch.long)
    ctx = types.SimpleNamespace(set_materialize_grads=lambda flag: None)
    ctx.save_for_backward = lambda *t: setattr(ctx, "saved_tensors", t)
    fn = triton_chunk._TTTLinearFn
    fn.forward(ctx, q, k, v, eta, ln_w, ln_b, s, W, b, gW, gb, cu, offset, 1e-6, False)
    fn.forward(ctx, q, k, v, eta, ln_w, ln_b, s, W, b, gW, gb, cu, offset, 1e-6, True)
    fn.backward(ctx, torch.randn_like(q), None, None, None, None)
    fn.backward(ctx, torch.randn_like(q), W, b, gW, gb)
    splits = triton_split.splits
    offered = {split for options in (triton_split.SPLITS, triton_split_chain.SPLITS)
               for split in options.get(triton_parts.block_d(D), ())}
    for split in sorted(offered):  # as picked for few sequences
        triton_split.splits = triton_split.forced(split)
        fn.forward(ctx, q, k, v, eta, ln_w, ln_b, s, W, b, gW, gb, cu, offset, 1e-6, False)
        fn.forward(ctx, q, k, v, eta, ln_w, ln_b, s, W, b, gW, gb, cu, offset, 1e-6, True)
        fn.backward(ctx, torch.randn_like(q), None, None, None, None)
        fn.backward(ctx, torch.randn_like(q), W, b, gW, gb)
    triton_split.splits = splits
    state = TTTLinearState(W, b, gW, gb, torch.full((1,), 3))
    for inplace in (False, True):
        triton_step.ttt_linear_step_triton(q[:1], k[:1], v[:1], eta[:1], ln_w, ln_b, state, inplace=inplace)


def mesa_launches(H: int, D: int) -> None:
    """Mesa's forward (with and without what the backward keeps, with the solver's telemetry), its backward
    (with and without the final state's gradient) and the decode step (out of place and in place), on CPU tensors
    of 4 chunks of 64."""
    from tttlm.ops.mesa import triton_chunk, triton_step
    from tttlm.ops.state import MesaState

    T, dt = 256, torch.bfloat16
    q, k, v = (torch.randn(1, T, H, D, dtype=dt) for _ in range(3))
    g, beta = torch.full((1, T, H), -0.1), torch.rand(1, T, H)
    lamb = torch.ones(H, D)
    state = MesaState(torch.zeros(1, H, D, D), torch.zeros(1, H, D, D))
    fn = triton_chunk._MesaFn
    ctx = types.SimpleNamespace(set_materialize_grads=lambda flag: None)
    ctx.save_for_backward = lambda *t: setattr(ctx, "saved_tensors", t)
    grid = triton_chunk._Grid(1, T, None, 64, q.device)
    flat = [t.reshape(T, H, D) for t in (q, k, v)] + [t.reshape(T, H) for t in (g, beta)] + [lamb]
    init = torch.zeros(1, H, D, 2 * D)
    fn.forward(ctx, *flat, None, grid, 30, -1.0, dt, False, None)
    fn.forward(ctx, *flat, init, grid, 30, -1.0, dt, True, {"stats": True})
    fn.backward(ctx, torch.randn(T, H, D, dtype=dt), None)
    fn.backward(ctx, torch.randn(T, H, D, dtype=dt), init)
    for inplace in (False, True):
        triton_step.mesa_step_triton(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], lamb, state, cg_max_iter=30,
                                     cg_tol=None, inplace=inplace)


def ttt_mlp_launches(H: int, D: int) -> None:
    """TTT-MLP's forward (with and without what the backward keeps), backward (with and without the final
    state's gradient) and decode step (out of place and in place), on CPU tensors of 4 mini-batches."""
    from tttlm.ops.state import TTTMLPState
    from tttlm.ops.ttt_mlp import triton_chunk, triton_step

    T, dt, F = 64, torch.bfloat16, 4 * D
    q, k, v = (torch.randn(T, H, D, dtype=dt) for _ in range(3))
    eta = torch.rand(T, H, dtype=dt)
    ln_w, ln_b = torch.ones(H, D, dtype=dt), torch.zeros(H, D, dtype=dt)
    s = torch.ones(16)
    params = [torch.zeros(1, H, *shape) for shape in ((D, F), (F,), (F, D), (D,))]
    sums = [torch.zeros_like(p) for p in params]
    cu, offset = torch.tensor([0, T]), torch.zeros(1, dtype=torch.long)
    ctx = types.SimpleNamespace(set_materialize_grads=lambda flag: None)
    ctx.save_for_backward = lambda *t: setattr(ctx, "saved_tensors", t)
    fn = triton_chunk._TTTMLPFn
    fn.forward(ctx, q, k, v, eta, ln_w, ln_b, s, *params, *sums, cu, offset, 1e-6, False)
    fn.forward(ctx, q, k, v, eta, ln_w, ln_b, s, *params, *sums, cu, offset, 1e-6, True)
    fn.backward(ctx, torch.randn_like(q), *(None,) * 8)
    fn.backward(ctx, torch.randn_like(q), *params, *sums)
    state = TTTMLPState(*params, *sums, torch.full((1,), 3))
    for inplace in (False, True):
        triton_step.ttt_mlp_step_triton(q[:1], k[:1], v[:1], eta[:1], ln_w, ln_b, state, inplace=inplace)


def ssd_launches() -> None:
    """The Mamba2 scan's forward and backward, rows with states and a packed row (with the gradient of the states
    entering its chunks, as its documents' final states give), at the 125m preset's heads."""
    from tttlm.ops.ssd import triton_ssd

    ctx = types.SimpleNamespace(set_materialize_grads=lambda flag: None, chunk_size=64)
    ctx.save_for_backward = lambda *t: setattr(ctx, "saved_tensors", t)
    Bt, T, H, P, G, N = 2, 128, 24, 64, 1, 128
    x = torch.randn(Bt, T, H, P, dtype=torch.bfloat16)
    dt, A = torch.rand(Bt, T, H), -torch.rand(H)
    B, C = (torch.randn(Bt, T, G, N, dtype=torch.bfloat16) for _ in range(2))
    h0 = torch.zeros(Bt, H, P, N)
    fn = triton_ssd._SSDFn
    fn.forward(ctx, x, dt, A, B, C, h0, None, 64, True, False)
    fn.backward(ctx, torch.randn_like(x), torch.randn_like(h0), None)
    seg = torch.zeros(1, T, dtype=torch.int32)
    fn.forward(ctx, x[:1], dt[:1], A, B[:1], C[:1], None, seg, 64, False, True)
    fn.backward(ctx, torch.randn_like(x[:1]), None, torch.randn(1, T // 64, H, P, N))


def linear_ce_launches() -> None:
    """The fused loss's rows kernel at the 125m presets' width and vocabulary, with and without gradients."""
    from tttlm.ops.linear_cross_entropy import triton_ce

    h, w = torch.randn(64, 768, dtype=torch.bfloat16), torch.randn(32000, 768, dtype=torch.bfloat16)
    for grad in (True, False):
        triton_ce._losses(h, w, torch.zeros(64, dtype=torch.long), -100, grad)


# ops compiled at each --heads, and ops compiled once at a fixed shape (with the label of their rows)
OPS = {"ttt_linear": ttt_linear_launches, "ttt_mlp": ttt_mlp_launches, "mesa": mesa_launches}
FIXED_OPS = {"ssd": (ssd_launches, "ssd 24×64"), "linear_ce": (linear_ce_launches, "loss")}


def _print(label: str, rows: list[dict]) -> None:
    for r in rows:
        print(
            f"| {label} | {r['kernel']} | {r['constexprs']} | {r['warps']} | {r['registers']} | "
            f"{r['stack_bytes']} | {r['spill_store_bytes']} | {r['spill_load_bytes']} | {r['shared_bytes']} | "
            f"{r['code_bytes']} | {r['wgmma']} |",
            flush=True,
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", default="16x128,32x64", help="comma-separated HxD")
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for the H100")
    names = [*OPS, *FIXED_OPS]
    p.add_argument("--ops", default=",".join(names), help="comma-separated, of " + ", ".join(names))
    p.add_argument("--tiling", help="FT,FWD_WARPS,BWD_WARPS: TTT-MLP's whole-sequence kernels with this tiling")
    args = p.parse_args(argv)
    print(f"sm_{args.arch}, triton {triton.__version__}")
    if args.tiling:
        from tttlm.ops.ttt_mlp import triton_parts

        chosen = triton_parts.Tiling(*(int(x) for x in args.tiling.split(",")))
        triton_parts.TILINGS = dict.fromkeys(triton_parts.TILINGS, chosen)
        print(f"TTT-MLP tiling: {chosen}")
    ops = args.ops.split(",")
    if not set(ops) <= set(names):
        p.error(f"--ops must name some of {', '.join(names)}; got {args.ops}")
    print("| H×D | kernel | constexprs | warps | registers | stack B | spill stores B | spill loads B | shared B "
          "| code B | wgmma |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for hd in args.heads.split(",") if set(ops) & set(OPS) else ():
        H, D = (int(x) for x in hd.split("x"))
        with compile_only(args.arch) as rows:
            for op in ops:
                if op in OPS:
                    OPS[op](H, D)
        _print(f"{H}×{D}", rows)
    for op in ops:
        if op in FIXED_OPS:
            launches, label = FIXED_OPS[op]
            with compile_only(args.arch) as rows:
                launches()
            _print(label, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
