"""Run an op's Triton kernels as compiled for an H100/H200 (sm_90), on CPU: every launch is compiled as the GPU's
launcher would specialise it and its programs run one by one in `ptx_emulator` (PTX, not machine code), which
also reports races between warps. Then the outputs (and with --backward every gradient) are compared with the
PyTorch path. No GPU needed.

    python benchmarks/ptx_emulate.py ttt_mlp --shape 2x100x4x64 [--cu 0,7,100] [--backward] [--seed 0]

Prints the relative RMSE of each quantity and the emulator's findings; exits 1 if there are findings or an
error over --tol. Programs that wait for each other (TTT-MLP's split kernels) cannot run this way.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be compiled, not interpreted

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from tttlm.ops.compare import rel_rmse  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ptx_emulator import Emulator, Heap  # noqa: E402

_COMPILED = {}


def _compile(kernel: JITFunction, bound: dict, options: dict, arch: int):
    """Compile `kernel` for sm_`arch` as Triton's launcher specialises these arguments (ints equal to 1 and
    constexprs folded, pointers and multiples of 16 marked divisible by 16, except do_not_specialize ones)."""
    signature, constexprs, attrs = {}, {}, {}
    for p in kernel.params:
        value = bound.get(p.name, p.default)
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
            continue
        ty, spec = native_specialize_impl(BaseBackend, value, False, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)
        if ty == "constexpr":
            signature[p.name], constexprs[p.name] = "constexpr", spec
            continue
        signature[p.name] = ty
        if spec and "D" in spec:
            attrs[(p.num,)] = [["tt.divisibility", 16]]
    key = (kernel, repr(sorted(signature.items())), repr(sorted(constexprs.items())), repr(attrs), repr(options))
    if key not in _COMPILED:
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        _COMPILED[key] = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return _COMPILED[key], signature


def _launch(kernel: JITFunction, grid, args, kwargs, arch: int, findings: list):
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = dict(zip((p.name for p in kernel.params), args)) | kwargs
    compiled, signature = _compile(kernel, bound, options, arch)
    heap, tensors, values = Heap(), {}, []
    for p in kernel.params:
        if signature[p.name] == "constexpr":
            continue
        v = bound[p.name]
        if isinstance(v, torch.Tensor):  # one copy per storage, however many arguments name it
            key = (v.data_ptr(), v.numel() * v.element_size())
            if key not in tensors:
                raw = v.detach().contiguous().view(torch.uint8).reshape(-1).numpy()
                tensors[key] = (v, heap.alloc(raw))
            values.append(tensors[key][1])
        elif isinstance(v, float):
            values.append(int(np.float32(v).view(np.uint32)))
        else:
            values.append(int(v) & 0xFFFFFFFF)
    emu = Emulator(compiled.asm["ptx"])
    values += [0] * (len(emu.params) - len(values))  # global and profile scratch: unused
    params = dict(zip(emu.params, values))
    n_programs = (grid(bound) if callable(grid) else grid)[0]
    found = []
    for pid in range(n_programs):
        emu.run(params, heap, pid, compiled.metadata.shared, found)
    findings += [f"{kernel.__name__}: {f}" for f in found]
    for v, ptr in tensors.values():
        nbytes = v.numel() * v.element_size()
        raw = torch.from_numpy(heap.buf[ptr - Heap.BASE : ptr - Heap.BASE + nbytes].copy())
        v.data.view(torch.uint8).reshape(-1).copy_(raw)


@contextlib.contextmanager
def emulated(arch: int = 90):
    """Within it, every Triton launch (on CPU tensors) runs in the emulator; yields the list of findings."""
    findings, real_run = [], JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        _launch(self, grid, args, kwargs, arch, findings)

    JITFunction.run = run
    try:
        yield findings
    finally:
        JITFunction.run = real_run


def ttt_mlp_case(B: int, T: int, H: int, D: int, cu, backward: bool, seed: int) -> tuple[dict, list]:
    """TTT-MLP's Triton kernels (bf16 inputs) emulated against its PyTorch path (float32) on the same values:
    relative RMSE of o, the final state and, with backward, the gradients of a loss of both; and the findings."""
    from tttlm.ops.state import TTTMLPState
    from tttlm.ops.ttt_linear import triton_parts as linear_parts
    from tttlm.ops.ttt_mlp.chunked import ttt_mlp_chunked
    from tttlm.ops.ttt_mlp.triton_chunk import ttt_mlp_triton

    linear_parts.POISON_OUTPUTS = True  # an unwritten output shows as NaN
    g = torch.Generator().manual_seed(seed)
    bf = torch.bfloat16
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(bf) for _ in range(3))
    eta = (torch.rand(B, T, H, generator=g) * 2 / D).to(bf)
    ln_w, ln_b = (1 + 0.3 * torch.randn(H, D, generator=g)).to(bf), (0.3 * torch.randn(H, D, generator=g)).to(bf)
    N, F = (B if cu is None else len(cu) - 1), 4 * D
    shapes, scales = ((D, F), (F,), (F, D), (D,)), (D**-0.5, 0.1, F**-0.5, 0.1)
    params = [s * torch.randn(N, H, *sh, generator=g) for sh, s in zip(shapes, scales)]
    sums = [0.3 * s * torch.randn(N, H, *sh, generator=g) for sh, s in zip(shapes, scales)]
    offset = torch.randint(0, 16, (N,), generator=g)
    cu = None if cu is None else torch.tensor(cu)
    w_o = torch.randn(B, T, H, D, generator=g).to(bf).float()
    names = ("q", "k", "v", "eta", "ln_w", "ln_b", "W1", "b1", "W2", "b2", "grad_W1", "grad_b1", "grad_W2",
             "grad_b2")

    def run(fn, cast):
        leaves = [t.clone().requires_grad_(backward) for t in (q, k, v, eta, ln_w, ln_b, *params, *sums)]
        with torch.set_grad_enabled(backward):
            o, f = fn(*(cast(t) for t in leaves[:6]), TTTMLPState(*leaves[6:], offset), cu_seqlens=cu,
                      output_final_state=True)
        out = {"o": o, **{n: getattr(f, n) for n in names[6:]}}
        if backward:
            loss = (o.float() * w_o).sum() + sum((0.1 * t).sum() for t in f.params + f.grads)
            out |= {"d" + n: gr for n, gr in zip(names, torch.autograd.grad(loss, leaves))}
        return out

    with emulated() as findings:
        ours = run(ttt_mlp_triton, lambda t: t)
    ref = run(ttt_mlp_chunked, lambda t: t.float())
    return {n: rel_rmse(ours[n], ref[n]) for n in ours}, findings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("op", choices=["ttt_mlp"])
    p.add_argument("--shape", default="1x40x2x64", help="BxTxHxD")
    p.add_argument("--cu", help="comma-separated cu_seqlens (B must be 1)")
    p.add_argument("--backward", action="store_true", help="also the backward kernels and every gradient")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-2, help="largest relative RMSE accepted")
    args = p.parse_args(argv)
    B, T, H, D = (int(x) for x in args.shape.split("x"))
    cu = None if args.cu is None else [int(x) for x in args.cu.split(",")]
    errs, findings = ttt_mlp_case(B, T, H, D, cu, args.backward, args.seed)
    print(f"{args.op} {args.shape} cu={cu}: relative RMSE against the PyTorch path")
    for name, e in errs.items():
        print(f"  {name:10s} {e:.2e}")
    print(f"{len(findings)} findings of the emulator" + "".join(f"\n  {f}" for f in findings))
    bad = {n: e for n, e in errs.items() if not e <= args.tol}
    return 1 if findings or bad else 0


if __name__ == "__main__":
    sys.exit(main())
