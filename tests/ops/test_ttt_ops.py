"""TTT-Linear and TTT-MLP: the dual-form path and the one-token step against the token-by-token float64 spec."""

import pytest
import torch

from tttlm.ops.state import TTTLinearState, TTTMLPState
from tttlm.ops.ttt_linear import ttt_linear, ttt_linear_step
from tttlm.ops.ttt_linear.reference import ttt_linear_ref
from tttlm.ops.ttt_mlp import ttt_mlp, ttt_mlp_step
from tttlm.ops.ttt_mlp.reference import ttt_mlp_ref

F64 = torch.float64
OPS = {
    "linear": (ttt_linear, ttt_linear_step, ttt_linear_ref, TTTLinearState, lambda D: ((D, D), (D,))),
    "mlp": (ttt_mlp, ttt_mlp_step, ttt_mlp_ref, TTTMLPState, lambda D: ((D, 4 * D), (4 * D,), (4 * D, D), (D,))),
}


def make_inputs(B, T, H, D, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=F64).to(dtype) for _ in range(3))
    eta = (torch.rand(B, T, H, generator=g, dtype=F64) * 0.6).to(dtype)
    ln_w = 1 + 0.3 * torch.randn(H, D, generator=g, dtype=F64)
    ln_b = 0.3 * torch.randn(H, D, generator=g, dtype=F64)
    return q, k, v, eta, ln_w.to(dtype), ln_b.to(dtype)


def make_state(kind, N, H, D, b, mid=False, seed=1, dtype=F64):
    """A random state; with mid=True also random partial sums and offsets inside the mini-batch."""
    g = torch.Generator().manual_seed(seed)
    shapes = OPS[kind][4](D)
    scale = 0.5 / D**0.5
    params = [scale * torch.randn(N, H, *s, generator=g, dtype=F64).to(dtype) for s in shapes]
    state = OPS[kind][3].start(*params)
    if mid:
        sums = [0.1 * torch.randn_like(p) for p in params]
        offset = torch.randint(0, b, (N,), generator=g)
        state = OPS[kind][3](*params, *sums, offset)
    return state


def states_close(a, b, tol):
    assert torch.equal(a.offset, b.offset)
    for x, y in zip(a.params + a.grads, b.params + b.grads):
        assert (x - y).abs().max().item() <= tol


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize(
    "B,T,H,D,b,mid",
    [(1, 1, 1, 4, 4, False), (2, 37, 3, 8, 16, False), (3, 21, 2, 4, 4, True), (1, 16, 1, 8, 16, True),
     (2, 9, 1, 4, 1, False)],
)
def test_chunked_equals_reference(kind, B, T, H, D, b, mid):
    op, _, ref, *_ = OPS[kind]
    x = make_inputs(B, T, H, D)
    s0 = make_state(kind, B, H, D, b, mid)
    o_ref, f_ref = ref(*x, s0, mini_batch_size=b)
    o, f = op(*x, s0, mini_batch_size=b, output_final_state=True)
    assert o.dtype == F64 and (o - o_ref).abs().max().item() <= 1e-10
    states_close(f, f_ref, 1e-10)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_token_scale_and_gradients_match_reference(kind):
    """Gradients of every input through the dual form equal those through the spec (autograd of autograd)."""
    op, _, ref, *_ = OPS[kind]
    B, T, H, D, b = 2, 11, 2, 4, 4
    x = [t.requires_grad_() for t in make_inputs(B, T, H, D)]
    s0 = make_state(kind, B, H, D, b, mid=True).map(lambda t: t.requires_grad_() if t.is_floating_point() else t)
    ts = (1.0 / torch.arange(1, b + 1, dtype=F64) + 0.1 * torch.randn(b, dtype=F64)).requires_grad_()
    leaves = [*x, ts, *s0.params, *s0.grads]
    grads = []
    for fn in (op, ref):
        kw = {"output_final_state": True} if fn is op else {}
        o, f = fn(*x, s0, mini_batch_size=b, token_scale=ts, **kw)
        w = torch.randn_like(o, generator=torch.Generator().manual_seed(5))
        loss = (o * w).sum() + sum((p * (i + 1)).sum() for i, p in enumerate(f.params + f.grads))
        grads.append(torch.autograd.grad(loss, leaves))
    for g1, g2 in zip(*grads):
        assert (g1 - g2).abs().max().item() <= 1e-9 * (1 + g2.abs().max().item())


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("varlen", [False, True])
def test_gradcheck(kind, varlen):
    op, *_ = OPS[kind]
    H, D, b = 1, 3, 2
    if varlen:
        B, T, N, cu = 1, 7, 2, torch.tensor([0, 3, 7])
    else:
        B, T, N, cu = 2, 5, 2, None
    x = [t.requires_grad_() for t in make_inputs(B, T, H, D)]
    s0 = make_state(kind, N, H, D, b, mid=True)
    ts = torch.tensor([0.9, 0.6], dtype=F64, requires_grad=True)
    tensors = [t.requires_grad_() for t in (*s0.params, *s0.grads)]
    n = len(s0.params)

    def fn(q, k, v, eta, ln_w, ln_b, ts, *st):
        state = OPS[kind][3](*st, s0.offset)
        o, f = op(q, k, v, eta, ln_w, ln_b, state, mini_batch_size=b, token_scale=ts, cu_seqlens=cu,
                  output_final_state=True)
        return (o, *f.params[:n], *f.grads)

    assert torch.autograd.gradcheck(fn, (*x, ts, *tensors), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_split_and_continue_and_decode(kind):
    op, step, *_ = OPS[kind]
    B, T, H, D, b = 2, 45, 2, 8, 16
    x = make_inputs(B, T, H, D)
    s0 = make_state(kind, B, H, D, b, mid=True)
    o_full, f_full = op(*x, s0, mini_batch_size=b, output_final_state=True)
    for cuts in ([7], [16, 32], [3, 4, 30, 44]):  # inside and at mini-batch boundaries
        outs, s = [], s0
        for lo, hi in zip([0, *cuts], [*cuts, T]):
            o, s = op(*(t[:, lo:hi] for t in x[:4]), *x[4:], s, mini_batch_size=b, output_final_state=True)
            outs.append(o)
        assert (torch.cat(outs, 1) - o_full).abs().max().item() <= 1e-10
        states_close(s, f_full, 1e-10)
    outs, s = [], s0
    for t in range(T):
        o, s = step(*(u[:, t] for u in x[:4]), *x[4:], s, mini_batch_size=b)
        outs.append(o)
    assert (torch.stack(outs, 1) - o_full).abs().max().item() <= 1e-10
    states_close(s, f_full, 1e-10)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_varlen_equals_per_sequence(kind):
    op, *_ = OPS[kind]
    H, D, b = 2, 8, 4
    lengths = [5, 1, 16, 11]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    x = make_inputs(1, sum(lengths), H, D)
    s0 = make_state(kind, len(lengths), H, D, b, mid=True)
    o, f = op(*x, s0, mini_batch_size=b, cu_seqlens=cu, output_final_state=True)
    for i in range(len(lengths)):
        lo, hi = cu[i].item(), cu[i + 1].item()
        oi, fi = op(*(t[:, lo:hi] for t in x[:4]), *x[4:], s0.map(lambda t, i=i: t[i : i + 1]), mini_batch_size=b,
                    output_final_state=True)
        assert (o[:, lo:hi] - oi).abs().max().item() <= 1e-12
        states_close(f.map(lambda t, i=i: t[i : i + 1]), fi, 1e-12)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(kind, dtype):
    op, _, ref, *_ = OPS[kind]
    B, T, H, D, b = 2, 40, 2, 16, 16
    x64 = make_inputs(B, T, H, D)
    s0 = make_state(kind, B, H, D, b)
    xl = [t.to(dtype) for t in x64]
    o, f = op(*xl, s0.map(lambda t: t.float() if t.is_floating_point() else t), mini_batch_size=b,
              output_final_state=True)
    assert o.dtype == dtype and all(t.dtype == torch.float32 for t in f.params + f.grads)
    o_ref, _ = ref(*(t.to(F64) for t in xl), s0, mini_batch_size=b)
    rel = ((o.to(F64) - o_ref).pow(2).mean() / o_ref.pow(2).mean()).sqrt().item()
    assert rel <= 1e-2


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_training_keeps_inner_weights_sparsely(kind):
    """Memory O(T*D + state) per head: the weights saved for backward are only every few mini-batches' (the rest
    is recomputed), together no larger than one D-vector per token."""
    op, *_ = OPS[kind]
    T, D, b = 1024, 16, 16
    x = [t.float().requires_grad_() for t in make_inputs(1, T, 1, D)]
    s0 = make_state(kind, 1, 1, D, b, dtype=torch.float32)
    weight_shapes = {tuple(p.shape) for p in s0.params}
    kept = {}

    def pack(t):
        if tuple(t.shape) in weight_shapes:
            kept[t.untyped_storage().data_ptr()] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        op(*x, s0, mini_batch_size=b)
    state_numel = sum(p.numel() for p in s0.params)
    assert 0 < sum(kept.values()) <= T * D + 2 * state_numel


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_cuda_torch_path_matches_reference(kind):
    """The PyTorch path on a GPU (compiled there) against the float64 spec: outputs, final state, gradients."""
    op, _, ref, *_ = OPS[kind]
    B, T, H, D, b = 2, 50, 2, 16, 16
    x64 = [t.requires_grad_() for t in make_inputs(B, T, H, D)]
    s0 = make_state(kind, B, H, D, b, mid=True)
    x = [t.detach().float().cuda().requires_grad_() for t in x64]
    kw = {"backend": "torch"} if kind == "linear" else {}
    o, f = op(*x, s0.map(lambda t: t.float().cuda() if t.is_floating_point() else t.cuda()), mini_batch_size=b,
              output_final_state=True, **kw)
    o_ref, f_ref = ref(*x64, s0, mini_batch_size=b)
    w = torch.randn(o.shape, dtype=F64)
    grads = torch.autograd.grad((o.double().cpu() * w).sum(), x)
    grads_ref = torch.autograd.grad((o_ref * w).sum(), x64)
    rel = lambda a, r: ((a.double().cpu() - r).norm() / r.norm()).item()  # noqa: E731
    assert rel(o, o_ref) <= 1e-4
    for a, r in zip(f.params + f.grads, f_ref.params + f_ref.grads):
        assert rel(a, r.detach()) <= 1e-4
    for a, r in zip(grads, grads_ref):
        assert rel(a, r) <= 1e-4


def _bad(kind, **change):
    B, T, H, D, b = 2, 5, 2, 4, 4
    q, k, v, eta, ln_w, ln_b = make_inputs(B, T, H, D)
    args = dict(q=q, k=k, v=v, eta=eta, ln_weight=ln_w, ln_bias=ln_b, state=make_state(kind, B, H, D, b))
    kw = dict(mini_batch_size=b)
    for key, val in change.items():
        (args if key in args else kw)[key] = val
    return OPS[kind][0](*args.values(), **kw)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize(
    "change,match",
    [
        (dict(q=torch.randn(2, 5, 8)), "q must have shape"),
        (dict(k=torch.randn(2, 5, 2, 3, dtype=F64)), "k must have shape"),
        (dict(v=torch.randn(2, 5, 2, 4, dtype=torch.float32)), "v must have q's dtype"),
        (dict(eta=-torch.rand(2, 5, 2, dtype=F64)), "eta must be >= 0"),
        (dict(eta=torch.rand(2, 5, dtype=F64)), "eta must have shape"),
        (dict(ln_weight=torch.ones(3, 4, dtype=F64)), "ln_weight must have shape"),
        (dict(mini_batch_size=0), "mini_batch_size must be an int >= 1"),
        (dict(token_scale=torch.ones(3, dtype=F64)), "token_scale must have shape"),
        (dict(cu_seqlens=torch.tensor([0, 5])), "B == 1"),
        (dict(state=None), "state must be a"),
        (dict(q=torch.randn(2, 5, 2, 4).int()), "q must be float16"),
    ],
)
def test_bad_inputs(kind, change, match):
    with pytest.raises(ValueError, match=match):
        _bad(kind, **change)


@pytest.mark.parametrize("cu,match", [([0, 3, 3, 5], "increase strictly"), ([0, 2, 4], "end at T"),
                                      ([1, 5], "start at 0")])
def test_bad_cu_seqlens(cu, match):
    q, k, v, eta, ln_w, ln_b = make_inputs(1, 5, 2, 4)
    N = len(cu) - 1
    with pytest.raises(ValueError, match=match):
        ttt_linear(q, k, v, eta, ln_w, ln_b, make_state("linear", N, 2, 4, 4), mini_batch_size=4,
                   cu_seqlens=torch.tensor(cu))


def test_bad_state():
    q, k, v, eta, ln_w, ln_b = make_inputs(2, 5, 2, 4)
    s = make_state("linear", 2, 2, 4, 4)
    with pytest.raises(ValueError, match="state.W must have shape"):
        ttt_linear(q, k, v, eta, ln_w, ln_b, s.map(lambda t: t[:1]), mini_batch_size=4)
    with pytest.raises(ValueError, match="state.offset must lie in"):
        ttt_linear(q, k, v, eta, ln_w, ln_b, TTTLinearState(*s.params, *s.grads, torch.tensor([0, 4])),
                   mini_batch_size=4)
    with pytest.raises(ValueError, match="never drop to 16 bits"):
        ttt_linear(q, k, v, eta, ln_w, ln_b, s.map(lambda t: t.half() if t.is_floating_point() else t),
                   mini_batch_size=4)


def test_minibatch_step_sees_the_same_layout_at_every_length():
    """The step that is compiled on CUDA gets contiguous mini-batches whose shapes and strides do not depend
    on the sequence length (else torch.compile recompiles for every length)."""
    from tttlm.ops.ttt_common import run_chunked
    from tttlm.ops.ttt_linear.chunked import LINEAR

    seen = set()

    def recording(params, sums, Q, K, V, eta, *rest):
        seen.add(tuple((tuple(t.shape), t.stride()) for t in (Q, K, V, eta)))
        return LINEAR.minibatch(params, sums, Q, K, V, eta, *rest)

    model = LINEAR._replace(minibatch=recording)
    for T in (20, 37, 64):
        run_chunked(model, *make_inputs(2, T, 2, 8), make_state("linear", 2, 2, 8, 16), mini_batch_size=16,
                    token_scale=None, eps=1e-6, cu_seqlens=None, output_final_state=False)
    assert len(seen) == 1
    (layout,) = seen
    assert all(torch.empty(shape).stride() == stride for shape, stride in layout)
