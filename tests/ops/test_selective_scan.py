"""Mamba's selective scan: the chunked PyTorch path and the Triton kernels against the float64 token-by-token
spec (outputs, final states, every gradient), packed sequences against separate ones, a split sequence and the
one-token step against one call.

The kernels run on CUDA in bf16 at the 125m model's width, and on the CPU under TRITON_INTERPRET=1
(tests/conftest.py) in float32 at small widths. Kernel inputs are rounded to the kernel dtype first and the
reference runs on those same values in float64.
"""

import pytest
import torch

from tttlm.ops.compare import rel_rmse
from tttlm.ops.selective_scan import selective_scan, selective_scan_step, triton_scan
from tttlm.ops.selective_scan.reference import selective_scan_ref

F64 = torch.float64
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
TOL = 5e-3 if CUDA else 1e-5  # relative RMSE


def make_inputs(B, T, E, N, cu=None, *, seed=0, dtype=F64, h0=True, D=True, bias=True):
    """u, delta, A, B, C, D and the keywords (delta_bias, softplus, initial_state, cu_seqlens), as the Mamba layer
    makes them: delta of order 1 after softplus, A = -[decays between 0.1 and 4]."""
    g = torch.Generator().manual_seed(seed)
    S = B if cu is None else len(cu) - 1
    t = {
        "u": torch.randn(B, T, E, generator=g, dtype=F64),
        "delta": torch.randn(B, T, E, generator=g, dtype=F64),
        "A": -(0.1 + 4 * torch.rand(E, N, generator=g, dtype=F64)),
        "B": torch.randn(B, T, N, generator=g, dtype=F64),
        "C": torch.randn(B, T, N, generator=g, dtype=F64),
        "D": torch.randn(E, generator=g, dtype=F64) if D else None,
        "delta_bias": 0.5 * torch.randn(E, generator=g, dtype=F64) if bias else None,
        "initial_state": torch.randn(S, E, N, generator=g, dtype=F64) if h0 else None,
    }
    # rounded to the kernel dtype (the state and the float32 parameters to float32) so both paths see one input
    for k, v in t.items():
        if v is not None:
            rounded = dtype if k in ("u", "delta", "B", "C") else torch.float32
            t[k] = v.to(rounded).to(F64) if dtype != F64 else v
    t["cu_seqlens"] = None if cu is None else torch.tensor(cu)
    return t


def call(fn, t, **kw):
    args = [t[k] for k in ("u", "delta", "A", "B", "C", "D")]
    keywords = {k: t[k] for k in ("delta_bias", "initial_state", "cu_seqlens")}
    return fn(*args, delta_softplus=True, **keywords, **kw)


def on_device(t: dict, requires_grad: bool = False) -> dict:
    out = {}
    for k, v in t.items():
        if v is None or k == "cu_seqlens":
            out[k] = v
            continue
        v = v.to(DEV, DTYPE if k in ("u", "delta", "B", "C") else torch.float32)
        out[k] = v.requires_grad_() if requires_grad else v
    return out


def leaves(t: dict) -> dict:
    return {k: v for k, v in t.items() if isinstance(v, torch.Tensor) and v.requires_grad}


SHAPES = [  # B, T, E, N, cu_seqlens
    (2, 37, 6, 4, None),
    (1, 45, 10, 8, [0, 5, 28, 45]),
    (1, 40, 3, 3, [0, 16, 17, 40]),  # a one-token sequence and one ending on a tile boundary
]
if CUDA:
    SHAPES += [  # the 125m width; packed; N not a power of two; enough sequences for 16 channels per program
        (2, 300, 1536, 16, None), (1, 700, 384, 16, [0, 1, 100, 433, 700]), (4, 64, 200, 12, None),
        (24, 40, 256, 16, None),
    ]


@pytest.mark.parametrize("B,T,E,N,cu", SHAPES[:3])
@pytest.mark.parametrize("chunk_size", [8, 64])
def test_chunked_matches_reference(B, T, E, N, cu, chunk_size):
    t = make_inputs(B, T, E, N, cu)
    y_ref, f_ref = call(selective_scan_ref, t)
    y, f = call(selective_scan, t, output_final_state=True, backend="torch")
    assert rel_rmse(y, y_ref) < 1e-12 and rel_rmse(f, f_ref) < 1e-12
    from tttlm.ops.selective_scan.chunked import selective_scan_chunked

    y, f = call(selective_scan_chunked, t, output_final_state=True, chunk_size=chunk_size)
    assert rel_rmse(y, y_ref) < 1e-12 and rel_rmse(f, f_ref) < 1e-12


def test_chunked_gradients_match_reference():
    t = make_inputs(1, 30, 4, 3, [0, 11, 30])
    grads = []
    for fn, kw in ((selective_scan_ref, {}), (selective_scan, {"output_final_state": True, "backend": "torch"})):
        x = {k: (v.clone().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
             for k, v in t.items()}
        y, f = call(fn, x, **kw)
        w = torch.Generator().manual_seed(3)
        (y * torch.randn(y.shape, generator=w, dtype=F64)).sum().add((f * torch.randn(f.shape, generator=w,
                                                                                        dtype=F64)).sum()).backward()
        grads.append({k: v.grad for k, v in leaves(x).items()})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 8
    for k in grads[0]:
        assert rel_rmse(grads[1][k], grads[0][k]) < 1e-12, k


def check_kernel(B, T, E, N, cu, *, h0=True, state_grad=True, D=True, bias=True, tol=TOL):
    """The kernels' y, final state and the gradients of every input (the final state's gradient included when
    state_grad) against the float64 spec's autograd."""
    t = make_inputs(B, T, E, N, cu, dtype=DTYPE, h0=h0, D=D, bias=bias)
    ref = {k: (v.clone().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
           for k, v in t.items()}
    y_ref, f_ref = call(selective_scan_ref, ref)
    g = torch.Generator().manual_seed(7)
    wy = torch.randn(y_ref.shape, generator=g, dtype=F64).to(DTYPE).to(F64)  # dy as the kernel receives it
    wf = torch.randn(f_ref.shape, generator=g, dtype=F64) if state_grad else torch.zeros_like(f_ref)
    ((y_ref * wy).sum() + (f_ref * wf).sum()).backward()

    dev = on_device(t, requires_grad=True)
    y, f = call(selective_scan, dev, output_final_state=True, backend="triton")
    assert y.dtype == DTYPE and f.dtype == torch.float32
    errors = {"y": rel_rmse(y, y_ref), "final": rel_rmse(f, f_ref)}
    loss = (y.to(F64).cpu() * wy).sum()
    if state_grad:
        loss = loss + (f.to(F64).cpu() * wf).sum()
    loss.backward()
    for k, v in leaves(dev).items():
        errors["d" + k] = rel_rmse(v.grad, ref[k].grad)
    assert len(errors) == 2 + 5 + h0 + D + bias
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, f"relative RMSE above {tol}: {bad} (all: {errors})"


@pytest.mark.parametrize("B,T,E,N,cu", SHAPES)
def test_kernel_matches_reference(B, T, E, N, cu):
    check_kernel(B, T, E, N, cu)


def test_kernel_without_optional_inputs():
    """No initial state, no final state's gradient, no D, no delta bias (each its own kernel variant)."""
    check_kernel(2, 21, 5, 4, None, h0=False, state_grad=False, D=False, bias=False)


def test_kernel_with_narrow_channel_blocks(monkeypatch):
    """8 channels per program, which the GPU takes for one long sequence; several channel blocks per sequence."""
    monkeypatch.setattr(triton_scan, "channel_block", lambda sequences, E, device: 8)
    check_kernel(1, 33, 20, 5, [0, 9, 33])


def test_packed_equals_separate_sequences():
    """One call on packed sequences equals one call per sequence (outputs and final states), on each backend."""
    cu = [0, 7, 19, 20, 45]
    t = make_inputs(1, 45, 6, 4, cu, dtype=DTYPE)
    backends = ["torch", "triton"]
    for backend in backends:
        dev = on_device(t)
        y, f = call(selective_scan, dev, output_final_state=True, backend=backend)
        for s in range(len(cu) - 1):
            part = dict(dev, cu_seqlens=None, initial_state=dev["initial_state"][s : s + 1])
            for k in ("u", "delta", "B", "C"):
                part[k] = dev[k][:, cu[s] : cu[s + 1]]
            ys, fs = call(selective_scan, part, output_final_state=True, backend=backend)
            assert rel_rmse(ys, y[:, cu[s] : cu[s + 1]]) <= TOL / 10 and rel_rmse(fs, f[s : s + 1]) <= TOL / 10


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_split_then_continue_and_step_equal_one_call(backend):
    """A sequence read in two calls (the second from the first's final state), then token by token with the step,
    equals one call."""
    t = on_device(make_inputs(2, 40, 6, 4, None, dtype=DTYPE))
    y, f = call(selective_scan, t, output_final_state=True, backend=backend)

    def part(lo, hi, state):
        p = dict(t, initial_state=state)
        for k in ("u", "delta", "B", "C"):
            p[k] = t[k][:, lo:hi]
        return p

    y1, f1 = call(selective_scan, part(0, 17, t["initial_state"]), output_final_state=True, backend=backend)
    y2, f2 = call(selective_scan, part(17, 30, f1), output_final_state=True, backend=backend)
    steps, state = [], f2
    for i in range(30, 40):
        y_t, state = selective_scan_step(t["u"][:, i], t["delta"][:, i], t["A"], t["B"][:, i], t["C"][:, i], t["D"],
                                         delta_bias=t["delta_bias"], delta_softplus=True, state=state)
        steps.append(y_t[:, None])
    assert rel_rmse(torch.cat([y1, y2, *steps], dim=1), y) <= TOL and rel_rmse(state, f) <= TOL / 10


def test_step_from_zero_state_and_float64():
    t = make_inputs(3, 1, 5, 4, None, h0=False)
    y_ref, f_ref = call(selective_scan_ref, t)
    y, f = selective_scan_step(t["u"][:, 0], t["delta"][:, 0], t["A"], t["B"][:, 0], t["C"][:, 0], t["D"],
                               delta_bias=t["delta_bias"], delta_softplus=True)
    assert y.dtype == F64 and rel_rmse(y, y_ref[:, 0]) < 1e-14 and rel_rmse(f, f_ref) < 1e-14


def test_gradients_reach_every_input_of_a_layer_sized_call():
    """The backend the op picks by itself (PyTorch here, Triton on CUDA) returns finite gradients for every input
    with the layer's shapes (no initial state, no final state)."""
    t = on_device(make_inputs(2, 24, 8, 4, None, h0=False), requires_grad=True)
    y, f = call(selective_scan, t)
    assert f is None
    y.float().pow(2).sum().backward()
    for k, v in leaves(t).items():
        assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0, k


@pytest.mark.parametrize(
    "change, match",
    [
        ({"u": torch.zeros(2, 5)}, r"u must have shape \[B,T,E\]"),
        ({"delta": torch.zeros(2, 5, 3, 1)}, r"delta must have shape \[B,T,E\]"),
        ({"A": torch.zeros(3, 4)}, r"A must have shape \[E,N\] = \[4,N\]"),
        ({"B": torch.zeros(2, 5, 2)}, r"B must have shape \[B,T,N\] = \[2,5,3\]"),
        ({"D": torch.zeros(3)}, r"D must have shape \[E\] = \[4\]"),
        ({"initial_state": torch.zeros(1, 4, 3)}, r"initial_state must have shape \[2,E,N\]"),
        ({"cu_seqlens": torch.tensor([0, 5])}, r"one packed row \(B == 1\)"),
        ({"u": torch.zeros(2, 5, 4, dtype=torch.int64)}, "u must be float16, bfloat16, float32 or float64"),
    ],
)
def test_bad_inputs_name_the_argument(change, match):
    t = {"u": torch.zeros(2, 5, 4), "delta": torch.zeros(2, 5, 4), "A": -torch.ones(4, 3), "B": torch.zeros(2, 5, 3),
         "C": torch.zeros(2, 5, 3), "D": None, "delta_bias": None, "initial_state": None, "cu_seqlens": None}
    t.update(change)
    with pytest.raises(ValueError, match=match):
        call(selective_scan, t)
