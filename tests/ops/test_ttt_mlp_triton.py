"""TTT-MLP's Triton kernels against the float64 spec: outputs, final states and every gradient.

On CUDA in bf16 at the paper's head sizes; on CPU under TRITON_INTERPRET=1 (tests/conftest.py) in float32 with
small heads (several tiles of the hidden width at D=12, 24 and 32). Inputs are cast to the kernel dtype first and
the reference runs on those same values in float64.
"""

import functools

import pytest
import torch

from tttlm.ops.compare import rel_rmse
from tttlm.ops.state import TTTMLPState
from tttlm.ops.ttt_linear import triton_parts as linear_parts
from tttlm.ops.ttt_mlp import triton_parts, ttt_mlp, ttt_mlp_step
from tttlm.ops.ttt_mlp.reference import ttt_mlp_ref

from .ttt_steps import check_steps_in_place

F64 = torch.float64
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
TOL = 5e-3 if CUDA else 1e-5  # relative RMSE
B_MB = 16
STATE = ("W1", "b1", "W2", "b2", "grad_W1", "grad_b1", "grad_W2", "grad_b2")
GRADS = ("dq", "dk", "dv", "deta", "dln_w", "dln_b", "dtoken_scale") + tuple("d" + name for name in STATE)


CUDA_WIDTHS = triton_parts.CHUNK_WIDTHS_ON_CUDA  # as shipped


@pytest.fixture(autouse=True)
def every_width(monkeypatch):
    """The kernels at every head width, also those not (yet) run by default on CUDA: their tests on a GPU are
    what decides `triton_parts.CHUNK_WIDTHS_ON_CUDA`."""
    monkeypatch.setattr(triton_parts, "CHUNK_WIDTHS_ON_CUDA", (16, 32, 64, 128))


WORST: dict[str, float] = {}  # the largest error of each quantity over the cases run


@pytest.fixture(scope="module", autouse=True)
def report_worst_errors():
    """With pytest -s (the record of a GPU run), the largest relative RMSE of each quantity over the cases."""
    yield
    print("\nlargest relative RMSE per quantity:", " ".join(f"{name} {e:.1e}" for name, e in WORST.items()))


@pytest.fixture(autouse=True)
def one_program_per_head(monkeypatch):
    """One program per (sequence, head), which the GPU runs unless few sequences leave SMs idle;
    `test_split_kernels` checks the others."""
    monkeypatch.setattr(triton_parts, "splits", lambda programs, D, device: 1)


def make_case(B, T, H, D, N, seed):
    """Inputs rounded to the kernel dtype, as float64 leaves (the reference's) and kernel-dtype leaves, the
    state's offsets, and the loss weights of o and of the final state."""
    g = torch.Generator().manual_seed(seed)
    F = 4 * D
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=F64) for _ in range(3))
    eta = torch.rand(B, T, H, generator=g, dtype=F64) * (2.0 / D)  # eta * |k|^2 of order 1, as in the layer
    ln_w = 1 + 0.3 * torch.randn(H, D, generator=g, dtype=F64)
    ln_b = 0.3 * torch.randn(H, D, generator=g, dtype=F64)
    ts = 1.0 / torch.arange(1, B_MB + 1, dtype=F64) + 0.05 * torch.rand(B_MB, generator=g, dtype=F64)
    inputs = [t.to(DTYPE).to(F64) for t in (q, k, v, eta, ln_w, ln_b)] + [ts.float().to(F64)]
    shapes = ((D, F), (F,), (F, D), (D,))
    scales = (D**-0.5, 0.1, F**-0.5, 0.1)  # gelu(k W1 + b1) W2 of order 1
    params = [scale * torch.randn(N, H, *shape, generator=g, dtype=F64) for shape, scale in zip(shapes, scales)]
    sums = [0.3 * scale * torch.randn(N, H, *shape, generator=g, dtype=F64) for shape, scale in zip(shapes, scales)]
    state = [t.float().to(F64) for t in params + sums]
    offset = torch.randint(0, B_MB, (N,), generator=g)
    ref_leaves = [t.clone().requires_grad_() for t in inputs + state]
    dev_leaves = [t.to(DEV, DTYPE).requires_grad_() for t in inputs[:6]]
    dev_leaves += [t.to(DEV, torch.float32).requires_grad_() for t in [inputs[6]] + state]
    weights = [torch.randn(B, T, H, D, generator=g, dtype=F64)] + [torch.randn_like(t) for t in state]
    # o's weight is the gradient the kernels receive, in o's dtype: representable in it, so that the gradients'
    # errors are the kernels' own, not those of rounding it (as in tests/ops/test_ttt_linear_triton.py)
    weights[0] = weights[0].to(DTYPE).to(F64)
    return ref_leaves, dev_leaves, offset, weights


def loss_of(o, final, weights, with_state):
    loss = (o.to(F64).cpu() * weights[0]).sum()
    if with_state:
        for t, w in zip(final.params + final.grads, weights[1:], strict=True):
            loss = loss + (t.to(F64).cpu() * w).sum()
    return loss


def run_reference(leaves, offset, cu, default_scale=False):
    """The spec per sequence (it takes no cu_seqlens); returns o and the final state."""
    q, k, v, eta, ln_w, ln_b, ts, *state = leaves
    ts = None if default_scale else ts
    if cu is None:
        return ttt_mlp_ref(q, k, v, eta, ln_w, ln_b, TTTMLPState(*state, offset), mini_batch_size=B_MB,
                           token_scale=ts)
    outs, finals = [], []
    for n in range(len(cu) - 1):
        sl = slice(int(cu[n]), int(cu[n + 1]))
        row = [t[n : n + 1] for t in state]
        o, f = ttt_mlp_ref(q[:, sl], k[:, sl], v[:, sl], eta[:, sl], ln_w, ln_b,
                           TTTMLPState(*row, offset[n : n + 1]), mini_batch_size=B_MB, token_scale=ts)
        outs.append(o)
        finals.append(f)
    cat = [torch.cat([getattr(f, name) for f in finals]) for name in (*STATE, "offset")]
    return torch.cat(outs, 1), TTTMLPState(*cat)


@functools.cache
def reference_case(B, T, H, D, cu):
    """`make_case` for a test shape (its seed from the shape; the last row's offset such that it ends at a
    mini-batch boundary, the others' random), with the reference's output, final state, and gradients of the
    loss with and without the final state's terms (one reference run for both)."""
    N = B if cu is None else len(cu) - 1
    ref_leaves, dev_leaves, offset, weights = make_case(B, T, H, D, N, seed=T + D)
    offset[-1] = -(T if cu is None else cu[-1] - cu[-2]) % B_MB  # the last row ends at a mini-batch boundary
    o_ref, f_ref = run_reference(ref_leaves, offset, cu)
    grads = {
        with_state: torch.autograd.grad(loss_of(o_ref, f_ref, weights, with_state), ref_leaves, retain_graph=True)
        for with_state in (True, False)
    }
    return dev_leaves, offset, weights, o_ref.detach(), f_ref.detach(), grads


def run_kernel(dev_leaves, offset, cu, backend="triton"):
    q, k, v, eta, ln_w, ln_b, ts, *state = dev_leaves
    cu_dev = None if cu is None else torch.tensor(cu, dtype=torch.long, device=DEV)
    return ttt_mlp(q, k, v, eta, ln_w, ln_b, TTTMLPState(*state, offset.to(DEV)), mini_batch_size=B_MB,
                   token_scale=ts, cu_seqlens=cu_dev, output_final_state=True, backend=backend)


def forward_errors(o, f, o_ref, f_ref):
    """Relative RMSE of the output and of each final-state tensor; checks dtypes and the final offsets."""
    assert o.dtype == DTYPE and f.W1.dtype == torch.float32
    assert torch.equal(f.offset.cpu(), f_ref.offset)
    errs = {"o": rel_rmse(o, o_ref)}
    for name in STATE:
        errs[name] = rel_rmse(getattr(f, name), getattr(f_ref, name))
    return errs


def assert_within_tol(errs, tol=TOL):
    for name, e in errs.items():
        WORST[name] = max(WORST.get(name, 0.0), e)
    bad = {name: e for name, e in errs.items() if not e <= tol}
    assert not bad, f"relative RMSE over {tol}: {bad}"


# B, T, H, D, cu_seqlens; a D that is not a power of two runs padded on chip. On the GPU only the paper's head
# dims, as every head dim compiles kernels of its own (some 10 s each).
SHAPES = [
    (2, 37, 2, 16, None),
    (1, 45, 2, 32, (0, 5, 28, 45)),
    (2, 21, 2, 24, None),
    (1, 30, 2, 12, (0, 3, 30)),  # a sequence inside one unfinished mini-batch
]
if CUDA:
    SHAPES = [
        (2, 100, 4, 64, None),
        (1, 333, 3, 64, (0, 1, 17, 200, 333)),  # a sequence of one token
        (1, 150, 2, 128, None),
        (2, 70, 2, 128, None),
    ]


@pytest.mark.parametrize("B,T,H,D,cu", SHAPES)
def test_kernel_matches_reference(B, T, H, D, cu):
    """Output, final state and every gradient, with and without the final state in the loss (the backward
    without the final state's gradient is a kernel variant of its own)."""
    check_kernel(B, T, H, D, cu)


@pytest.mark.parametrize("B,T,H,D,cu", SHAPES)
def test_kernel_forward_only_matches_reference(B, T, H, D, cu):
    """Without autograd (prefill, evaluation) the forward keeps nothing for the backward: a kernel variant of
    its own."""
    check_forward(B, T, H, D, cu)


SPLIT_CASES = [(2, SHAPES[1]), (4, (1, 40, 2, 64, (0, 19, 40)))]  # the hidden tiles over 2 and 4 programs
if CUDA:
    SPLIT_CASES = [(4, SHAPES[1]), (2, SHAPES[0]), (8, SHAPES[2]), (2, SHAPES[3])]


def test_split_count():
    assert [triton_parts.split_count(p, 64, 132) for p in (12, 33, 34, 66, 67)] == [4, 4, 2, 2, 1]
    assert [triton_parts.split_count(p, 128, 132) for p in (16, 17, 33, 66, 67)] == [8, 4, 4, 2, 1]
    assert triton_parts.split_count(4, 96, 132) == 2  # 6 tiles of 64
    assert triton_parts.split_count(4, 24, 132) == 1  # 3 tiles of 32


@pytest.mark.usefixtures("concurrent_programs")
@pytest.mark.parametrize("split,shape", SPLIT_CASES)
def test_split_kernels(monkeypatch, split, shape):
    """The hidden tiles split over programs that exchange partial sums at every mini-batch (chosen on the GPU
    for few sequences): outputs, final states and every gradient, and the forward without autograd."""
    monkeypatch.setattr(triton_parts, "splits", lambda programs, D, device: split)
    check_kernel(*shape)
    check_forward(*shape)


@pytest.mark.skipif(CUDA, reason="on a GPU benchmarks/gpu_ttt_mlp.py --tilings checks them")
@pytest.mark.usefixtures("concurrent_programs")
@pytest.mark.parametrize("tiling", sorted({t.max_f_tile for t in triton_parts.CANDIDATE_TILINGS} - {64}))
def test_candidate_tilings(monkeypatch, tiling):
    """The tile widths that benchmarks/gpu_ttt_mlp.py --tilings offers (at head width 64 there) on the shape of a
    split case: one program per (sequence, head) and the hidden tiles split over 2 (the interpreter has no
    warps)."""
    B, T, H, D, cu = SHAPES[1]
    tilings = dict(triton_parts.TILINGS)
    tilings[linear_parts.block_d(D)] = triton_parts.Tiling(tiling, 4, 4)
    monkeypatch.setattr(triton_parts, "TILINGS", tilings)
    assert 4 * D // triton_parts.chunk_f_tile(D) == 4 * D // tiling
    check_kernel(B, T, H, D, cu)
    monkeypatch.setattr(triton_parts, "splits", lambda programs, D, device: 2)
    check_kernel(B, T, H, D, cu)


def check_kernel(B, T, H, D, cu):
    dev_leaves, offset, weights, o_ref, f_ref, grads = reference_case(B, T, H, D, cu)
    for with_state in (True, False):
        o, f = run_kernel(dev_leaves, offset, cu)
        errs = forward_errors(o, f, o_ref, f_ref)
        g_dev = torch.autograd.grad(loss_of(o, f, weights, with_state), dev_leaves)
        for name, gd, gr in zip(GRADS, g_dev, grads[with_state], strict=True):
            assert gd.shape == gr.shape
            errs[name] = rel_rmse(gd, gr)
        assert_within_tol(errs)


def check_forward(B, T, H, D, cu):
    dev_leaves, offset, _, o_ref, f_ref, _ = reference_case(B, T, H, D, cu)
    with torch.no_grad():
        o, f = run_kernel(dev_leaves, offset, cu)
    assert_within_tol(forward_errors(o, f, o_ref, f_ref))


def test_split_and_continue():
    """A packed batch read in two calls, the second from the first's final state (cut inside mini-batches),
    equals one call."""
    D = 64 if CUDA else 32
    cu = (0, 5, 28, 45)
    _, dev_leaves, offset, _ = make_case(1, 45, 2, D, 3, seed=1)
    q, k, v, eta, ln_w, ln_b, ts, *state = (t.detach() for t in dev_leaves)
    cut = (0, 3, 17, 30)  # each sequence's first part, of lengths 3, 14 and 13
    cu1 = torch.tensor(cut, device=DEV)
    first = torch.cat([torch.arange(cu[n], cu[n] + cut[n + 1] - cut[n]) for n in range(3)]).to(DEV)
    second = torch.cat([torch.arange(cu[n] + cut[n + 1] - cut[n], cu[n + 1]) for n in range(3)]).to(DEV)
    lengths2 = [cu[n + 1] - cu[n] - (cut[n + 1] - cut[n]) for n in range(3)]
    cu2 = torch.tensor([0, *torch.tensor(lengths2).cumsum(0).tolist()], device=DEV)
    kw = dict(mini_batch_size=B_MB, token_scale=ts, output_final_state=True, backend="triton")
    with torch.no_grad():
        o, f = ttt_mlp(q, k, v, eta, ln_w, ln_b, TTTMLPState(*state, offset.to(DEV)), cu_seqlens=cu1.new_tensor(cu),
                       **kw)
        parts = [x[:, first] for x in (q, k, v, eta)]
        o1, f1 = ttt_mlp(*parts, ln_w, ln_b, TTTMLPState(*state, offset.to(DEV)), cu_seqlens=cu1, **kw)
        parts = [x[:, second] for x in (q, k, v, eta)]
        o2, f2 = ttt_mlp(*parts, ln_w, ln_b, f1, cu_seqlens=cu2, **kw)
    assert rel_rmse(o2, o[:, second]) <= TOL and rel_rmse(o1, o[:, first]) <= TOL
    assert torch.equal(f2.offset, f.offset)
    for name in STATE:
        assert rel_rmse(getattr(f2, name), getattr(f, name)) <= TOL, name


@pytest.mark.parametrize("D", [32, 24] if not CUDA else [64, 128])
@pytest.mark.parametrize("default_scale", [False, True])
def test_decode_steps_match_reference(default_scale, D):
    B, T, H = 2, 21, 2
    ref_leaves, dev_leaves, offset, _ = make_case(B, T, H, D, B, seed=3)
    o_ref, f_ref = run_reference([t.detach() for t in ref_leaves], offset, None, default_scale)
    with torch.no_grad():
        q, k, v, eta, ln_w, ln_b, ts, *state = dev_leaves
        ts = None if default_scale else ts
        s = TTTMLPState(*state, offset.to(DEV))
        outs = []
        for t in range(T):
            o, s = ttt_mlp_step(q[:, t], k[:, t], v[:, t], eta[:, t], ln_w, ln_b, s, mini_batch_size=B_MB,
                                token_scale=ts, backend="triton")
            outs.append(o)
    assert torch.equal(s.offset.cpu(), f_ref.offset)
    errs = {"o": rel_rmse(torch.stack(outs, 1), o_ref)} | {name: rel_rmse(getattr(s, name), getattr(f_ref, name))
                                                           for name in STATE}
    assert_within_tol(errs)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_decode_step_in_place(backend):
    """inplace=True writes the new state over the given one, equal to the out-of-place step (`ttt_steps`): rows
    mid mini-batch, at its last token and at its start, heads that share their row's offset, and several tiles of
    the hidden width (each read twice by the kernel before it is written)."""
    B, T, H, D = 3, 3, (12 if CUDA else 3), (64 if CUDA else 12)  # 4 and 3 tiles
    _, leaves, _, _ = make_case(B, T, H, D, B, seed=5)
    *inputs, W1, b1, W2, b2, gW1, gb1, gW2, gb2 = (t.detach() for t in leaves)
    ref = TTTMLPState(W1, b1, W2, b2, gW1, gb1, gW2, gb2, torch.tensor([5, B_MB - 1, 0], device=DEV))
    bad = (("W2", W2.mT.contiguous().mT), ("grad_b1", gb1.double()), ("b2", leaves[10]))
    check_steps_in_place(ttt_mlp_step, inputs, ref, backend, bad)


def test_supports_and_backend_choice(monkeypatch):
    monkeypatch.setattr(triton_parts, "CHUNK_WIDTHS_ON_CUDA", CUDA_WIDTHS)
    q = torch.zeros(1, 4, 2, 64, device=DEV, dtype=DTYPE)
    # on CUDA the whole-sequence kernels run by default only at the on-chip widths that passed there (64 and 128,
    # not 32: never run on a GPU); under the interpreter at all; the decode step at all
    assert triton_parts.supports(q, 16)
    assert triton_parts.supports(q[:, 0], 16)
    assert triton_parts.supports(q[..., :48], 16)
    assert triton_parts.supports(q[..., :32], 16) == (not CUDA)
    assert triton_parts.supports(q[:, 0, :, :32], 16)
    assert triton_parts.supports(torch.zeros(1, 4, 2, 128, device=DEV, dtype=DTYPE), 16)
    assert triton_parts.supports(torch.zeros(1, 4, 2, 96, device=DEV, dtype=DTYPE), 16)
    assert not triton_parts.supports(q, 8)
    assert not triton_parts.supports(q[..., :30], 16)  # 4D = 120 has no tile of 16 hidden units
    assert not triton_parts.supports(torch.zeros(1, 4, 2, 192, device=DEV, dtype=DTYPE), 16)
    assert not triton_parts.supports(q.double(), 16)
    assert [triton_parts.f_tile(D) for D in (12, 24, 32, 64, 96, 128)] == [16, 32, 64, 64, 64, 64]
    ln = torch.ones(2, 30, device=DEV)
    x = q[..., :30]
    state = TTTMLPState.start(*(torch.zeros(1, 2, *s, device=DEV) for s in ((30, 120), (120,), (120, 30), (30,))))
    with pytest.raises(ValueError, match="Triton kernels do not support"):
        ttt_mlp(x, x, x, x[..., 0], ln, ln, state, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        ttt_mlp(x, x, x, x[..., 0], ln, ln, state, backend="cuda")
