"""The floor of TTT-Linear's sequential steps as Triton compiles them: per-mini-batch time of the two
recurrences stripped of everything else, in two orientations; prints a table.

The forward's recurrence, per 16-token mini-batch: Z = K W + b, E = eta * (LayerNorm-L2 gradient at Z),
W -= c K^T E. The backward's dW chain, in reverse: dE = dE_local - c K dW, E dW^T (stored, dk's term),
dZ = J(eta dE), dW += Q^T dZq + K^T dZ, with J a LayerNorm backward standing in for the LayerNorm-L2 gradient's
Jacobian. No output path, varlen, state sums, checkpoints or look-ahead: what is left must run once per
mini-batch in order, so T/16 times this step is a floor under the op's sequential kernels as Triton compiles
them. Head dims are powers of two (no padding), T a multiple of 16.

rows: tiles [16, D], the D x D matrix the B operand of a 16-row product (mma.sync), as in the op's kernels.
cols: tiles [D, 16], the matrix held transposed as the M dimension of its products (wgmma-eligible).

    python benchmarks/ttt_linear_step_floor.py        # on a CUDA GPU; tests/test_step_floor.py checks the math
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from tttlm.ops.compare import rel_rmse
from tttlm.ops.ttt_linear.triton_parts import _dot, _dot_acc, _head_ln, _ln_bwd, _ln_l2_grad

BT = 16
C = 0.0625  # s_{b-1}, the step size of the update
EPS = 1e-6


@triton.jit
def _ln_bwd_cols(g, xh, rstd, D: tl.constexpr):
    """`_ln_bwd` for transposed tiles [D, BT]."""
    return rstd[None, :] * (g - (tl.sum(g, 0) / D)[None, :] - xh * (tl.sum(g * xh, 0) / D)[None, :])


@triton.jit
def _ln_l2_grad_cols(Zt, vt, kt, lnw, lnb, D: tl.constexpr, eps):
    """`_ln_l2_grad`'s dZ for a transposed tile [D, BT] (statistics over axis 0)."""
    mu = tl.sum(Zt, 0) / D
    zc = Zt - mu[None, :]
    rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, 0) / D + eps)
    xh = zc * rstd[None, :]
    G = lnw[:, None] * (lnw[:, None] * xh + lnb[:, None] - vt + kt)
    return _ln_bwd_cols(G, xh, rstd, D)


@triton.jit
def _fwd_rows(K, V, ETA, LNW, LNB, W0, WF, T, H, c, eps, D: tl.constexpr, BT: tl.constexpr):
    pid = tl.program_id(0)
    h = pid % H
    i = tl.arange(0, BT)
    d = tl.arange(0, D)
    W = tl.load(W0 + h * D * D + d[:, None] * D + d[None, :])
    bv = tl.zeros([D], dtype=tl.float32)
    lnw, lnb = _head_ln(LNW, LNB, h, d, D)
    for m in range(T // BT):
        tok = (pid // H) * T + m * BT + i
        p = (tok * H + h)[:, None] * D + d[None, :]
        k = tl.load(K + p).to(tl.float32)
        v = tl.load(V + p).to(tl.float32)
        eta = tl.load(ETA + tok * H + h).to(tl.float32)
        Z = _dot(k, W) + bv[None, :]
        _, _, _, _, _, dZ = _ln_l2_grad(Z, v, k, lnw, lnb, D, D, eps)
        E = eta[:, None] * dZ
        W = _dot_acc(tl.trans(-c * k), E, W)
        bv -= c * tl.sum(E, 0)
    tl.store(WF + pid * D * D + d[:, None] * D + d[None, :], W)


@triton.jit
def _fwd_cols(K, V, ETA, LNW, LNB, W0, WF, T, H, c, eps, D: tl.constexpr, BT: tl.constexpr):
    pid = tl.program_id(0)
    h = pid % H
    i = tl.arange(0, BT)
    d = tl.arange(0, D)
    Wt = tl.load(W0 + h * D * D + d[None, :] * D + d[:, None])
    bv = tl.zeros([D], dtype=tl.float32)
    lnw, lnb = _head_ln(LNW, LNB, h, d, D)
    for m in range(T // BT):
        tok = (pid // H) * T + m * BT + i
        pt = (tok * H + h)[None, :] * D + d[:, None]
        kt = tl.load(K + pt).to(tl.float32)
        vt = tl.load(V + pt).to(tl.float32)
        eta = tl.load(ETA + tok * H + h).to(tl.float32)
        Zt = _dot(Wt, kt) + bv[:, None]
        Et = eta[None, :] * _ln_l2_grad_cols(Zt, vt, kt, lnw, lnb, D, eps)
        Wt = _dot_acc(Et, tl.trans(-c * kt), Wt)
        bv -= c * tl.sum(Et, 1)
    tl.store(WF + pid * D * D + d[None, :] * D + d[:, None], Wt)


@triton.jit
def _chain_rows(Q, K, XH, DZQ, DEP, ETA, RSTD, DE, DKW, DW0, DWF, T, H, c, D: tl.constexpr, BT: tl.constexpr):
    pid = tl.program_id(0)
    h = pid % H
    i = tl.arange(0, BT)
    d = tl.arange(0, D)
    dW = tl.load(DW0 + h * D * D + d[:, None] * D + d[None, :])
    for r in range(T // BT):
        tok = (pid // H) * T + (T // BT - 1 - r) * BT + i
        p = (tok * H + h)[:, None] * D + d[None, :]
        q = tl.load(Q + p).to(tl.float32)
        k = tl.load(K + p).to(tl.float32)
        xh = tl.load(XH + p)
        eta = tl.load(ETA + tok * H + h).to(tl.float32)
        dE = tl.load(DEP + p) - c * _dot(k, dW)
        tl.store(DKW + p, -c * _dot(eta[:, None] * xh, tl.trans(dW)))
        tl.store(DE + p, dE)
        dZ = _ln_bwd(eta[:, None] * dE, xh, tl.load(RSTD + tok * H + h), D, D)
        dW = _dot_acc(tl.trans(q), tl.load(DZQ + p), dW)
        dW = _dot_acc(tl.trans(k), dZ, dW)
    tl.store(DWF + pid * D * D + d[:, None] * D + d[None, :], dW)


@triton.jit
def _chain_cols(Q, K, XH, DZQ, DEP, ETA, RSTD, DE, DKW, DW0, DWF, T, H, c, D: tl.constexpr, BT: tl.constexpr):
    pid = tl.program_id(0)
    h = pid % H
    i = tl.arange(0, BT)
    d = tl.arange(0, D)
    dWt = tl.load(DW0 + h * D * D + d[None, :] * D + d[:, None])
    for r in range(T // BT):
        tok = (pid // H) * T + (T // BT - 1 - r) * BT + i
        pt = (tok * H + h)[None, :] * D + d[:, None]
        qt = tl.load(Q + pt).to(tl.float32)
        kt = tl.load(K + pt).to(tl.float32)
        xht = tl.load(XH + pt)
        eta = tl.load(ETA + tok * H + h).to(tl.float32)
        dEt = tl.load(DEP + pt) - c * _dot(dWt, kt)
        tl.store(DKW + pt, -c * _dot(tl.trans(dWt), eta[None, :] * xht))
        tl.store(DE + pt, dEt)
        dZt = _ln_bwd_cols(eta[None, :] * dEt, xht, tl.load(RSTD + tok * H + h), D)
        dWt = _dot_acc(tl.load(DZQ + pt), tl.trans(qt), dWt)
        dWt = _dot_acc(dZt, tl.trans(kt), dWt)
    tl.store(DWF + pid * D * D + d[None, :] * D + d[:, None], dWt)


def fwd_inputs(B, T, H, D, device, seed=0):
    """k, v [B*T, H, D] bf16 (|k| = 2), eta [B*T, H] bf16, lnw, lnb [H, D], W0 [H, D, D] float32."""
    g = torch.Generator(device=device).manual_seed(seed)
    k = torch.nn.functional.normalize(torch.randn(B * T, H, D, device=device, generator=g), dim=-1) * 2
    v = torch.randn(B * T, H, D, device=device, generator=g)
    eta = torch.rand(B * T, H, device=device, generator=g) * (4 / D)
    lnw = 1 + 0.3 * torch.randn(H, D, device=device, generator=g)
    lnb = 0.3 * torch.randn(H, D, device=device, generator=g)
    W0 = torch.randn(H, D, D, device=device, generator=g) / D**0.5
    return k.bfloat16(), v.bfloat16(), eta.bfloat16(), lnw, lnb, W0


def fwd_ref(k, v, eta, lnw, lnb, W0, B, T):
    """(the final W [B, H, D, D],) in float64."""
    H, D = W0.shape[:2]
    k, v = (t.double().view(B, T, H, D).transpose(1, 2) for t in (k, v))
    eta = eta.double().view(B, T, H).transpose(1, 2)[..., None]
    lnw, lnb = lnw.double()[:, None], lnb.double()[:, None]
    W = W0.double().expand(B, H, D, D).clone()
    bv = torch.zeros(B, H, 1, D, dtype=torch.float64, device=W.device)
    for m in range(T // BT):
        sl = slice(BT * m, BT * m + BT)
        Z = k[:, :, sl] @ W + bv
        mu, var = Z.mean(-1, keepdim=True), Z.var(-1, unbiased=False, keepdim=True)
        rstd = 1 / (var + EPS).sqrt()
        xh = (Z - mu) * rstd
        G = lnw * (lnw * xh + lnb - v[:, :, sl] + k[:, :, sl])
        E = eta[:, :, sl] * rstd * (G - G.mean(-1, keepdim=True) - xh * (G * xh).mean(-1, keepdim=True))
        W = W - C * k[:, :, sl].transpose(-1, -2) @ E
        bv = bv - C * E.sum(-2, keepdim=True)
    return (W,)


def chain_inputs(B, T, H, D, device, seed=0):
    """q, k [B*T, H, D] bf16, xh, dZq, dE_local [B*T, H, D], eta [B*T, H] bf16, rstd [B*T, H], dW0 [H, D, D]."""
    g = torch.Generator(device=device).manual_seed(seed)
    q, k = (torch.randn(B * T, H, D, device=device, generator=g) / D**0.5 for _ in range(2))
    xh, dzq, dep = (torch.randn(B * T, H, D, device=device, generator=g) for _ in range(3))
    eta = torch.rand(B * T, H, device=device, generator=g) * (4 / D)
    rstd = 1 + torch.rand(B * T, H, device=device, generator=g)
    dW0 = torch.randn(H, D, D, device=device, generator=g) / D**0.5
    return q.bfloat16(), k.bfloat16(), xh, dzq, dep, eta.bfloat16(), rstd, dW0


def chain_ref(q, k, xh, dzq, dep, eta, rstd, dW0, B, T):
    """The final dW [B, H, D, D], dE and E dW^T [B*T, H, D], in float64."""
    H, D = dW0.shape[:2]
    q, k, xh, dzq, dep = (t.double().view(B, T, H, D).transpose(1, 2) for t in (q, k, xh, dzq, dep))
    eta, rstd = (t.double().view(B, T, H).transpose(1, 2)[..., None] for t in (eta, rstd))
    dW = dW0.double().expand(B, H, D, D).clone()
    dE, EdW = torch.empty_like(dep), torch.empty_like(dep)
    for m in reversed(range(T // BT)):
        sl = slice(BT * m, BT * m + BT)
        dE[:, :, sl] = dep[:, :, sl] - C * k[:, :, sl] @ dW
        EdW[:, :, sl] = -C * (eta[:, :, sl] * xh[:, :, sl]) @ dW.transpose(-1, -2)
        g, x = eta[:, :, sl] * dE[:, :, sl], xh[:, :, sl]
        dZ = rstd[:, :, sl] * (g - g.mean(-1, keepdim=True) - x * (g * x).mean(-1, keepdim=True))
        dW = dW + q[:, :, sl].transpose(-1, -2) @ dzq[:, :, sl] + k[:, :, sl].transpose(-1, -2) @ dZ
    tokens = lambda t: t.transpose(1, 2).reshape(B * T, H, D)  # noqa: E731
    return dW, tokens(dE), tokens(EdW)


def run_fwd(kernel, inputs, B, T, warps=4):
    """A closure launching `kernel` on `inputs` (`fwd_inputs`), and what it writes: (the final W [B, H, D, D],)."""
    k, v, eta, lnw, lnb, W0 = inputs
    H, D = W0.shape[:2]
    WF = torch.full((B * H, D, D), float("nan"), device=k.device)

    def call():
        kernel[(B * H,)](k, v, eta, lnw, lnb, W0, WF, T, H, C, EPS, D=D, BT=BT, num_warps=warps)

    return call, (WF.view(B, H, D, D),)


def run_chain(kernel, inputs, B, T, warps=4):
    """A closure launching `kernel` on `inputs` (`chain_inputs`), and what it writes: the final dW [B, H, D, D],
    dE and E dW^T [B*T, H, D]."""
    q, k, xh, dzq, dep, eta, rstd, dW0 = inputs
    H, D = dW0.shape[:2]
    DWF = torch.full((B * H, D, D), float("nan"), device=q.device)
    dE, EdW = torch.full_like(xh, float("nan")), torch.full_like(xh, float("nan"))

    def call():
        kernel[(B * H,)](q, k, xh, dzq, dep, eta, rstd, dE, EdW, dW0, DWF, T, H, C, D=D, BT=BT, num_warps=warps)

    return call, (DWF.view(B, H, D, D), dE, EdW)


RECURRENCES = {  # name: kernels (rows, cols), inputs, launch, float64 reference
    "forward": ((_fwd_rows, _fwd_cols), fwd_inputs, run_fwd, fwd_ref),
    "dW chain": ((_chain_rows, _chain_cols), chain_inputs, run_chain, chain_ref),
}


def main() -> int:
    if not torch.cuda.is_available():
        print("ttt_linear_step_floor: needs a CUDA GPU (tests/test_step_floor.py checks its math on CPU)",
              file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}: us per mini-batch step and ms per call "
          "(triton.testing.do_bench median); relative error of the final matrix against float64 at T = 2k")
    print("| recurrence | H×D | B×T | orientation | warps | us/step | ms | rel. error |")
    print("|---|---|---|---|---|---|---|---|")
    for H, D in ((16, 128), (32, 64)):
        for B, T in ((1, 32768), (1, 2048), (16, 2048)):
            for name, (kernels, make_inputs, launch, reference) in RECURRENCES.items():
                inputs = make_inputs(B, T, H, D, "cuda")
                expected = reference(*inputs, B, T)[0] if T <= 2048 else None
                for kernel, orientation in zip(kernels, ("rows", "cols"), strict=True):
                    for warps in (4, 8):
                        call, outputs = launch(kernel, inputs, B, T, warps)
                        call()
                        ms = triton.testing.do_bench(call, warmup=5, rep=50)
                        err = "" if expected is None else f"{rel_rmse(outputs[0], expected):.1e}"
                        print(f"| {name} | {H}×{D} | {B}×{T} | {orientation} | {warps} | "
                              f"{1e3 * ms / (T // BT):.2f} | {ms:.3f} | {err} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
