"""Time one forward and one forward+backward of each op (TTT-Linear, TTT-MLP, Mesa) on the PyTorch paths.

    python benchmarks/cpu_ops.py [--B 1 --T 2048 --H 4 --D 64 --repeats 3 --device cpu --threads N]

Prints a Markdown table (median of `repeats` runs after one warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from tttlm.ops import TTTLinearState, TTTMLPState, mesa, ttt_linear, ttt_mlp


def make_call(name: str, B: int, T: int, H: int, D: int, device: str):
    g = torch.Generator(device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    q, k, v = (rnd(B, T, H, D).requires_grad_() for _ in range(3))
    if name == "mesa":
        g_ = F.logsigmoid(rnd(B, T, H) + 4).requires_grad_()
        beta = torch.rand(B, T, H, generator=g, device=device).requires_grad_()
        lamb = torch.ones(H, D, device=device, requires_grad=True)
        leaves = [q, k, v, g_, beta, lamb]
        unit = lambda x: F.normalize(x, dim=-1)  # noqa: E731
        return (lambda: mesa(unit(q), unit(k), v, g_, beta, lamb, None, cg_max_iter=30)[0]), leaves
    eta = (torch.rand(B, T, H, generator=g, device=device) / D).requires_grad_()
    ln_w = torch.ones(H, D, device=device, requires_grad=True)
    ln_b = torch.zeros(H, D, device=device, requires_grad=True)
    if name == "ttt_linear":
        W = (0.02 * rnd(H, D, D)).requires_grad_()
        b = torch.zeros(H, D, device=device, requires_grad=True)
        state = lambda: TTTLinearState.start(W.expand(B, H, D, D), b.expand(B, H, D))  # noqa: E731
        return (lambda: ttt_linear(q, k, v, eta, ln_w, ln_b, state())[0]), [q, k, v, eta, ln_w, ln_b, W, b]
    W1, W2 = (0.02 * rnd(H, D, 4 * D)).requires_grad_(), (0.02 * rnd(H, 4 * D, D)).requires_grad_()
    b1 = torch.zeros(H, 4 * D, device=device, requires_grad=True)
    b2 = torch.zeros(H, D, device=device, requires_grad=True)
    state = lambda: TTTMLPState.start(*(p.expand(B, *p.shape) for p in (W1, b1, W2, b2)))  # noqa: E731
    return (lambda: ttt_mlp(q, k, v, eta, ln_w, ln_b, state())[0]), [q, k, v, eta, ln_w, ln_b, W1, b1, W2, b2]


def timed(fn, repeats: int, device: str) -> float:
    times = []
    for i in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ops", default="ttt_linear,ttt_mlp,mesa")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"B={a.B} T={a.T} H={a.H} D={a.D} float32 on {a.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| op | forward ms | forward+backward ms |\n|---|---|---|")
    for name in a.ops.split(","):
        fn, leaves = make_call(name, a.B, a.T, a.H, a.D, a.device)
        with torch.no_grad():
            f_ms = timed(fn, a.repeats, a.device)

        def fwd_bwd(fn=fn, leaves=leaves):
            for t in leaves:
                t.grad = None
            fn().square().mean().backward()

        print(f"| {name} | {f_ms:.0f} | {timed(fwd_bwd, a.repeats, a.device):.0f} |", flush=True)


if __name__ == "__main__":
    main()
