"""Mesa: the chunked op and the decode step against the token-by-token exact-solve reference."""

import pytest
import torch
import torch.nn.functional as F

from tttlm.ops.mesa import mesa, mesa_step
from tttlm.ops.mesa.reference import mesa_ref
from tttlm.ops.state import MesaState

from ..layers.plain_lm import cg_solve, exact_solve, mesa_scan

F64 = torch.float64


def make_inputs(B=2, T=37, H=3, D=8, Dv=5, dtype=F64, seed=0, N=None):
    """Inputs as the Mesa layer builds them (L2-normed q, k; sigmoid beta; logsigmoid g), a random state."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    q = F.normalize(randn(B, T, H, D), dim=-1)
    k = F.normalize(randn(B, T, H, D), dim=-1)
    v = randn(B, T, H, Dv)
    g = F.logsigmoid(randn(B, T, H) + 2.0)
    beta = torch.sigmoid(randn(B, T, H))
    lamb = 0.25 + torch.rand(H, D, generator=gen, dtype=F64)
    N = B if N is None else N
    a = randn(N, H, D, D) / D**0.5
    state = MesaState(a @ a.mT, randn(N, H, D, Dv))
    inputs = [t.to(dtype) for t in (q, k, v, g, beta, lamb)]
    return inputs, state


def max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("T, chunk_size", [(37, 8), (1, 8), (5, 64), (24, 8)])
def test_matches_exact_solve_reference(T, chunk_size):
    inputs, state = make_inputs(T=T)
    stats = {}
    o, s = mesa(*inputs, state, chunk_size=chunk_size, cg_max_iter=40, output_final_state=True, cg_stats=stats)
    o_ref, s_ref = mesa_ref(*inputs, state)
    assert o.dtype == F64 and o.shape == (2, T, 3, 5)
    assert max_err(o, o_ref) <= 1e-8
    assert max_err(s.h_kk, s_ref.h_kk) <= 1e-12
    assert max_err(s.h_kv, s_ref.h_kv) <= 1e-12
    assert stats["iterations"] == 40 and stats["residual"].shape == (2, 3)
    assert stats["residual"].max() <= 1e-10


def test_no_state_means_zeros():
    inputs, state = make_inputs(T=19)
    zeros = MesaState(torch.zeros_like(state.h_kk), torch.zeros_like(state.h_kv))
    o, s = mesa(*inputs, None, chunk_size=8, cg_max_iter=40, output_final_state=True)
    o_ref, s_ref = mesa_ref(*inputs, zeros)
    assert max_err(o, o_ref) <= 1e-8 and max_err(s.h_kk, s_ref.h_kk) <= 1e-12


def test_gradcheck_all_inputs():
    inputs, state = make_inputs(B=1, T=11, H=2, D=3, Dv=2)
    args = [t.clone().requires_grad_() for t in (*inputs, state.h_kk, state.h_kv)]

    def fn(q, k, v, g, beta, lamb, h_kk, h_kv):
        o, s = mesa(
            q,
            k,
            v,
            g,
            beta,
            lamb,
            MesaState(h_kk, h_kv),
            chunk_size=4,
            cg_max_iter=12,
            output_final_state=True,
        )
        return o, s.h_kk, s.h_kv

    assert torch.autograd.gradcheck(fn, args, atol=1e-7, rtol=1e-6)


def test_gradcheck_packed_sequences():
    inputs, state = make_inputs(B=1, T=9, H=2, D=3, Dv=2, N=3)
    cu = torch.tensor([0, 2, 7, 9])
    args = [t.clone().requires_grad_() for t in (*inputs, state.h_kk, state.h_kv)]

    def fn(q, k, v, g, beta, lamb, h_kk, h_kv):
        o, s = mesa(
            q,
            k,
            v,
            g,
            beta,
            lamb,
            MesaState(h_kk, h_kv),
            chunk_size=4,
            cg_max_iter=12,
            cu_seqlens=cu,
            output_final_state=True,
        )
        return o, s.h_kk, s.h_kv

    assert torch.autograd.gradcheck(fn, args, atol=1e-7, rtol=1e-6, fast_mode=True)


def test_gradient_equals_exact_solve_gradient():
    """The implicit backward of a converged solve equals the gradient of the exact solve (torch.linalg)."""
    inputs, state = make_inputs(T=21, D=8)
    weights = torch.randn(2, 21, 3, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn, kwargs in ((mesa, dict(chunk_size=8, cg_max_iter=40)), (mesa_ref, {})):
        args = [t.clone().requires_grad_() for t in (*inputs, state.h_kk, state.h_kv)]
        o, _ = fn(*args[:6], MesaState(args[6], args[7]), **kwargs)
        (o * weights).sum().backward()
        grads.append([a.grad for a in args])
    for name, got, want in zip("q k v g beta lamb h_kk h_kv".split(), *grads, strict=True):
        # Only the symmetric part of h_kk acts, so only the symmetric part of its gradient is defined.
        if name == "h_kk":
            got, want = got + got.mT, want + want.mT
        assert max_err(got, want) <= 1e-8 * (1 + want.abs().max().item()), name


def plain_mesa(inputs, state, solve):
    """mesa_scan (tests/layers/plain_lm.py: the recurrence token by token, each head's system solved by `solve`)
    on every batch row: o [B,T,H,Dv] and the final MesaState."""
    q, k, v, g, beta, lamb = inputs
    rows = [mesa_scan(q[b], k[b], v[b], g[b].exp(), beta[b], lamb, state.h_kk[b], state.h_kv[b], solve)
            for b in range(q.shape[0])]
    return torch.stack([o for o, _ in rows]), MesaState(*(torch.stack(s) for s in zip(*(s for _, s in rows))))


def grads_of(fn, inputs, state, weights):
    """The gradients of sum(o * weights) for every input and both state tensors, and o, of o, _ = fn(args)."""
    args = [t.clone().requires_grad_() for t in (*inputs, state.h_kk, state.h_kv)]
    o, _ = fn(args[:6], MesaState(args[6], args[7]))
    return o.detach(), torch.autograd.grad((o * weights).sum(), args)


NAMES = "q k v g beta lamb h_kk h_kv".split()


@pytest.mark.parametrize("cg_max_iter, cg_tol", [(12, None), (40, 1e-3)])
def test_truncated_solves_at_head_dim_64(cg_max_iter, cg_tol):
    """At the paper's sizes CG stops long before D steps (fewer steps than D, or at cg_tol): the forward and the
    implicit backward (a second solve with the same limits) are those of CG from the Jacobi guess with the same
    stopping rule, solved per query, and differ from the exact solve's by the truncation alone."""
    inputs, state = make_inputs(B=2, T=20, H=2, D=64, Dv=16)
    weights = torch.randn(2, 20, 2, 16, dtype=F64, generator=torch.Generator().manual_seed(1))
    stats = {}

    def op(args, s):
        return mesa(*args, s, chunk_size=8, cg_max_iter=cg_max_iter, cg_tol=cg_tol, cg_stats=stats,
                    backend="torch")

    o, got = grads_of(op, inputs, state, weights)
    o_cg, want = grads_of(lambda a, s: plain_mesa(a, s, cg_solve(cg_max_iter, cg_tol)), inputs, state, weights)
    o_exact, exact = grads_of(lambda a, s: plain_mesa(a, s, exact_solve), inputs, state, weights)
    assert stats["iterations"] < 64 and (cg_tol is None) == (stats["iterations"] == cg_max_iter)
    assert max_err(o, o_cg) <= 1e-10 * o_cg.abs().max() < max_err(o, o_exact) <= 1e-2 * o_exact.abs().max()
    for name, g, w, e in zip(NAMES, got, want, exact, strict=True):
        scale = e.abs().max().item()
        assert max_err(g, w) <= 1e-9 * scale, name
        assert max_err(g, e) <= 5e-2 * scale, name  # the truncation's error, small beside the gradient itself
        if name in ("q", "k", "lamb"):  # inputs of the solves: their gradients carry the backward's truncation
            assert max_err(g, e) > 1e-7 * scale, name


@pytest.mark.parametrize("step", [False, True], ids=["chunked", "step"])
def test_non_symmetric_initial_h_kk(step):
    """Only h_kk's symmetric part acts: a non-symmetric initial h_kk gives what its symmetric part gives, the final
    h_kk is symmetric, and the gradient of h_kk is the symmetric one of the reference."""
    T = 1 if step else 21
    inputs, state = make_inputs(T=T)
    skew = torch.randn(state.h_kk.shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    state = MesaState(state.h_kk + skew - skew.mT, state.h_kv)
    weights = torch.randn(2, T, 3, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    finals = {}

    def op(args, s):
        if step:
            o, finals["op"] = mesa_step(*(a[:, 0] for a in args[:5]), args[5], s, cg_max_iter=40)
            return o[:, None], None
        o, finals["op"] = mesa(*args, s, chunk_size=8, cg_max_iter=40, output_final_state=True)
        return o, None

    def ref(args, s):
        o, finals["ref"] = plain_mesa(args, s, exact_solve)
        return o, None

    o, got = grads_of(op, inputs, state, weights)
    o_ref, want = grads_of(ref, inputs, state, weights)
    sym = MesaState((state.h_kk + state.h_kk.mT) / 2, state.h_kv)
    assert max_err(o, o_ref) <= 1e-10 and max_err(o, op(inputs, sym)[0]) <= 1e-12
    assert max_err(finals["op"].h_kk, finals["ref"].h_kk) <= 1e-12
    assert max_err(finals["op"].h_kk, finals["op"].h_kk.mT) <= 1e-14
    for name, g, w in zip(NAMES, got, want, strict=True):
        assert max_err(g, w) <= 1e-9 * (1 + w.abs().max().item()), name


def test_gradcheck_step():
    inputs, state = make_inputs(B=2, T=1, H=2, D=4, Dv=3)
    args = [t[:, 0].clone().requires_grad_() for t in inputs[:5]]
    args += [t.clone().requires_grad_() for t in (inputs[5], state.h_kk, state.h_kv)]

    def fn(q, k, v, g, beta, lamb, h_kk, h_kv):
        o, s = mesa_step(q, k, v, g, beta, lamb, MesaState(h_kk, h_kv), cg_max_iter=40)
        return o, s.h_kk, s.h_kv

    assert torch.autograd.gradcheck(fn, args, atol=1e-7, rtol=1e-6, fast_mode=True)


def test_split_and_continue_equals_one_call():
    inputs, state = make_inputs(T=37)
    full, s_full = mesa(*inputs, state, chunk_size=8, cg_max_iter=40, output_final_state=True)
    s = state
    pieces = []
    for lo, hi in ((0, 13), (13, 14), (14, 37)):
        part = [t[:, lo:hi] for t in inputs[:5]] + [inputs[5]]
        o, s = mesa(*part, s, chunk_size=8, cg_max_iter=40, output_final_state=True)
        pieces.append(o)
    assert max_err(torch.cat(pieces, 1), full) <= 1e-10
    assert max_err(s.h_kk, s_full.h_kk) <= 1e-10 and max_err(s.h_kv, s_full.h_kv) <= 1e-10


def test_step_by_step_equals_full_call():
    inputs, state = make_inputs(T=17)
    full, s_full = mesa(*inputs, state, chunk_size=8, cg_max_iter=40, output_final_state=True)
    s = state
    outs = []
    stats = {}
    for t in range(17):
        o_t, s = mesa_step(*[x[:, t] for x in inputs[:5]], inputs[5], s, cg_max_iter=40, cg_stats=stats)
        outs.append(o_t)
    assert max_err(torch.stack(outs, 1), full) <= 1e-10
    assert max_err(s.h_kk, s_full.h_kk) <= 1e-10 and max_err(s.h_kv, s_full.h_kv) <= 1e-10
    assert stats["residual"].shape == (2, 3)


def test_step_from_no_state():
    inputs, _ = make_inputs(T=1)
    o_t, s = mesa_step(*[x[:, 0] for x in inputs[:5]], inputs[5], None, cg_max_iter=40)
    o, s_ref = mesa_ref(*inputs, None)
    assert max_err(o_t, o[:, 0]) <= 1e-10 and max_err(s.h_kv, s_ref.h_kv) <= 1e-12


def test_step_half_inputs_and_early_stop():
    inputs, state = make_inputs(T=1, D=16, dtype=torch.bfloat16)
    step_inputs = [x[:, 0] for x in inputs[:5]] + [inputs[5]]
    stats = {}
    o_t, s = mesa_step(*step_inputs, state.map(lambda t: t.float()), cg_max_iter=50, cg_tol=1e-3, cg_stats=stats)
    assert o_t.dtype == torch.bfloat16 and s.h_kk.dtype == torch.float32
    assert 0 < stats["iterations"] < 16 and stats["residual"].max() <= 1e-3
    o_ref, _ = mesa_ref(*[t.to(F64) for t in inputs], state)
    assert ((o_t.to(F64) - o_ref[:, 0]).pow(2).mean() / o_ref.pow(2).mean()).sqrt() <= 1e-2


def test_packed_sequences_equal_separate_calls():
    bounds = [0, 5, 23, 24, 40]
    inputs, state = make_inputs(B=1, T=40, N=4)
    cu = torch.tensor(bounds)
    o, s = mesa(*inputs, state, chunk_size=8, cg_max_iter=40, cu_seqlens=cu, output_final_state=True)
    assert s.h_kk.shape == (4, 3, 8, 8) and s.h_kv.shape == (4, 3, 8, 5)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        part = [t[:, lo:hi] for t in inputs[:5]] + [inputs[5]]
        o_i, s_i = mesa(
            *part,
            state.map(lambda t, i=i: t[i : i + 1]),
            chunk_size=8,
            cg_max_iter=40,
            output_final_state=True,
        )
        assert max_err(o[:, lo:hi], o_i) <= 1e-10
        assert max_err(s.h_kk[i], s_i.h_kk[0]) <= 1e-10 and max_err(s.h_kv[i], s_i.h_kv[0]) <= 1e-10


def test_cg_tol_stops_early_and_meets_tolerance():
    inputs, state = make_inputs(T=40, D=16)
    o_ref, _ = mesa_ref(*inputs, state)
    stats = {}
    o, _ = mesa(*inputs, state, chunk_size=16, cg_max_iter=100, cg_tol=1e-6, cg_stats=stats)
    assert 0 < stats["iterations"] < 100
    assert stats["residual"].max() <= 1e-6
    # The error in o is about the relative residual times the condition number of H + lamb (< 10 here).
    assert max_err(o, o_ref) <= 10 * 1e-6 * (1 + o_ref.abs().max().item())
    loose = {}
    mesa(*inputs, state, chunk_size=16, cg_max_iter=100, cg_tol=1e-2, cg_stats=loose)
    assert loose["iterations"] < stats["iterations"]


def test_cg_tol_stops_each_query_on_its_own():
    """With cg_tol a query's solve does not depend on what else is in the call: a batch row gives the same output
    alone and beside a row whose systems take more steps (each query stops at its own tolerance)."""
    inputs, state = make_inputs(B=2, T=30, D=16)
    inputs[3] = torch.stack([inputs[3][0], inputs[3][1] * 0.01])  # the second row remembers longer
    inputs[4] = torch.stack([inputs[4][0], inputs[4][1] * 20])  # and writes harder: worse conditioned
    both_stats, alone_stats = {}, {}
    both, _ = mesa(*inputs, state, chunk_size=8, cg_max_iter=100, cg_tol=1e-6, cg_stats=both_stats)
    first = [t[:1] for t in inputs[:5]] + [inputs[5]]
    alone, _ = mesa(*first, state.map(lambda t: t[:1]), chunk_size=8, cg_max_iter=100, cg_tol=1e-6,
                    cg_stats=alone_stats)
    assert alone_stats["iterations"] < both_stats["iterations"]
    assert max_err(both[:1], alone) <= 1e-13


def test_zero_residual_does_not_divide_by_zero():
    """A zero query is solved exactly by the starting guess; the CG steps after that must stay finite."""
    inputs, state = make_inputs(T=12)
    inputs[0] = inputs[0].clone()
    inputs[0][:, 3] = 0.0
    args = [t.clone().requires_grad_() for t in inputs]
    o, _ = mesa(*args, state, chunk_size=8, cg_max_iter=40)
    o.sum().backward()
    o_ref, _ = mesa_ref(*inputs, state)
    assert max_err(o, o_ref) <= 1e-8
    assert all(torch.isfinite(a.grad).all() for a in args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_close_to_float64(dtype):
    inputs, state = make_inputs(B=2, T=70, H=2, D=32, Dv=32, dtype=dtype)
    o, s = mesa(*inputs, state.map(lambda t: t.float()), cg_max_iter=30, output_final_state=True)
    assert o.dtype == dtype and s.h_kk.dtype == torch.float32
    o_ref, _ = mesa_ref(*[t.to(F64) for t in inputs], state)
    rel_rmse = ((o.to(F64) - o_ref).pow(2).mean() / o_ref.pow(2).mean()).sqrt()
    assert rel_rmse <= 1e-2


def test_mixed_input_dtypes():
    """Under autocast q, k may leave a norm in float32 while v is bfloat16: o takes the promoted dtype."""
    inputs, state = make_inputs(T=20)
    mixed = [t.float() for t in inputs[:2]] + [inputs[2].bfloat16()] + [t.float() for t in inputs[3:]]
    o, _ = mesa(*mixed, state.map(lambda t: t.float()), chunk_size=8)
    o_t, _ = mesa_step(*[t[:, 0] for t in mixed[:5]], mixed[5], state.map(lambda t: t.float()))
    assert o.dtype == torch.float32 and o_t.dtype == torch.float32
    o_ref, _ = mesa_ref(*[t.to(F64) for t in mixed], state)
    assert ((o - o_ref).pow(2).mean() / o_ref.pow(2).mean()).sqrt() <= 1e-2
    assert max_err(o_t, o[:, 0]) <= 1e-5


def test_half_inputs_backward():
    """bfloat16 inputs get bfloat16 gradients within bfloat16's precision of the float64 exact solve's."""
    inputs, state = make_inputs(T=20, dtype=torch.bfloat16)
    weights = torch.randn(2, 20, 3, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    args = [t.clone().requires_grad_() for t in inputs]
    o, _ = mesa(*args, None, chunk_size=8)
    (o.double() * weights).sum().backward()
    exact = [t.to(F64).requires_grad_() for t in inputs]
    o_ref, _ = mesa_ref(*exact, None)
    want = torch.autograd.grad((o_ref * weights).sum(), exact)
    for name, a, w in zip("q k v g beta lamb".split(), args, want, strict=True):
        assert a.grad.dtype == torch.bfloat16, name
        assert (a.grad.to(F64) - w).norm() <= 2e-2 * w.norm(), name


def test_autocast_does_not_lower_inner_precision():
    inputs, state = make_inputs(T=40, D=16, dtype=torch.float32)
    state = state.map(lambda t: t.float())
    results = []
    for enabled in (False, True):
        args = [t.clone().requires_grad_() for t in inputs]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            o, _ = mesa(*args, state, chunk_size=8)
        o.square().sum().backward()  # outside autocast, as torch.amp recommends
        results.append([o] + [a.grad for a in args])
    for plain, autocast in zip(*results, strict=True):
        assert max_err(plain, autocast) <= 1e-5 * (1 + plain.abs().max().item())


def _bad_calls():
    """(name, arguments that replace good ones, message fragment)."""
    inputs, state = make_inputs(B=1, T=6, H=2, D=4, Dv=3)
    q, k, v, g, beta, lamb = inputs
    two_rows = dict(
        q=q.expand(2, -1, -1, -1),
        k=k.expand(2, -1, -1, -1),
        v=v.expand(2, -1, -1, -1),
        g=g.expand(2, -1, -1),
        beta=beta.expand(2, -1, -1),
    )
    return [
        ("q rank", dict(q=q[0]), "q must have shape"),
        ("k shape", dict(k=k[..., :3]), "k must have shape"),
        ("v heads", dict(v=v[:, :, :1]), "v must have shape"),
        ("g rank", dict(g=g[..., None]), "g must have rank"),
        ("beta length", dict(beta=beta[:, :4]), "beta must have shape"),
        ("lamb shape", dict(lamb=lamb[:1]), "lamb must have shape"),
        ("int dtype", dict(beta=beta.long()), "beta must be float16"),
        ("device", dict(lamb=lamb.to("meta")), "lamb must be on"),
        ("g > 0", dict(g=g + 10), "g is the log forget gate"),
        ("lamb <= 0", dict(lamb=-lamb), "lamb must be > 0"),
        ("cg_max_iter", dict(cg_max_iter=0), "cg_max_iter must be an int >= 1"),
        ("cg_tol", dict(cg_tol=-1.0), "cg_tol must be"),
        ("chunk_size", dict(chunk_size=0), "chunk_size must be"),
        ("cu dtype", dict(cu_seqlens=torch.tensor([0, 6], dtype=torch.int32)), "cu_seqlens must be int64"),
        ("cu start", dict(cu_seqlens=torch.tensor([1, 6])), "cu_seqlens must start at 0"),
        ("cu order", dict(cu_seqlens=torch.tensor([0, 4, 4, 6])), "strictly increasing"),
        ("cu end", dict(cu_seqlens=torch.tensor([0, 5])), "cu_seqlens must end at T"),
        ("cu batch", dict(two_rows, cu_seqlens=torch.tensor([0, 6])), "needs B == 1"),
        ("state type", dict(state=(state.h_kk, state.h_kv)), "state must be a MesaState"),
        ("state h_kk", dict(state=MesaState(state.h_kk[..., :3], state.h_kv)), "state.h_kk must have shape"),
        ("state rows", dict(state=state, cu_seqlens=torch.tensor([0, 2, 6])), "state.h_kk must have shape"),
    ]


@pytest.mark.parametrize("name, changes, message", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_arguments_raise(name, changes, message):
    inputs, _ = make_inputs(B=1, T=6, H=2, D=4, Dv=3)
    args = dict(zip("q k v g beta lamb".split(), inputs, strict=True), state=None)
    with pytest.raises(ValueError, match=message):
        mesa(**{**args, **changes})


def test_step_bad_arguments_raise():
    inputs, state = make_inputs(B=2, T=1, H=2, D=4, Dv=3)
    q, k, v, g, beta, lamb = [t[:, 0] for t in inputs[:5]] + [inputs[5]]
    with pytest.raises(ValueError, match="q must have shape"):
        mesa_step(q[:, None], k, v, g, beta, lamb, state)
    with pytest.raises(ValueError, match="g must have shape"):
        mesa_step(q, k, v, g[:, :1], beta, lamb, state)
    with pytest.raises(ValueError, match="state.h_kv must have shape"):
        mesa_step(q, k, v, g, beta, lamb, MesaState(state.h_kk, state.h_kv[:1]))
    with pytest.raises(ValueError, match="cg_max_iter"):
        mesa_step(q, k, v, g, beta, lamb, state, cg_max_iter=0)
