"""The Mamba2 scan's Triton kernels against the token-by-token float64 spec: outputs, final states and the
gradients of every input, for rows with initial states, packed documents (each document's final state), and a
sequence split in two.

On CUDA in bf16 at the 125m preset's sizes; on CPU under TRITON_INTERPRET=1 (tests/conftest.py) in float64 with
small heads and chunks of 16 tokens. Inputs are rounded to the kernel dtype and the spec runs on those values.
"""

import pytest
import torch

from tttlm.ops.compare import rel_rmse
from tttlm.ops.ssd import ssd, ssd_ref

F64 = torch.float64
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else F64  # x, B and C, as the layer gives them
FLOAT = torch.float32 if CUDA else F64  # dt, A and the states
TOL = 1e-2 if CUDA else 1e-9  # relative RMSE
# (T, H, P, G, N, chunk): the 125m preset's heads on the GPU, small ones in the interpreter
SIZES = dict(H=24, P=64, G=1, N=128, chunk=64) if CUDA else dict(H=4, P=8, G=2, N=24, chunk=16)


@pytest.fixture(params=[False] if CUDA else [False, True], ids=lambda in_scan: "in_scan" if in_scan else "per_chunk")
def placement(request, monkeypatch):
    """Y and dx computed by one program per chunk from the kept states (the default), or in the passes over chunks
    (on CUDA, benchmarks/gpu_ssd.py --sweep gives that setting's error instead, saving its compile time)."""
    from tttlm.ops.ssd import triton_ssd

    monkeypatch.setattr(triton_ssd, "Y_IN_SCAN", request.param)
    monkeypatch.setattr(triton_ssd, "DX_IN_SCAN", request.param)


def make_case(Bt, T, seed, H, P, G, N, **_):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(Bt, T, H, P, generator=g, dtype=F64)
    dt = torch.rand(Bt, T, H, generator=g, dtype=F64) * 0.5
    A = -(torch.rand(H, generator=g, dtype=F64) * 2 + 0.1)
    B = torch.randn(Bt, T, G, N, generator=g, dtype=F64) / N**0.25
    C = torch.randn(Bt, T, G, N, generator=g, dtype=F64) / N**0.25
    h0 = torch.randn(Bt, H, P, N, generator=g, dtype=F64)
    x, B, C = (t.to(DTYPE).to(F64) for t in (x, B, C))  # the values the kernels read
    dt, A, h0 = (t.to(FLOAT).to(F64) for t in (dt, A, h0))
    return [x, dt, A, B, C, h0]


def run_both(inputs, cu=None, final=True, seed=0):
    """Kernel and spec on the same inputs; returns (outputs, gradients) of each under one random weighting."""
    with_h0 = cu is None
    ref_in = [t.to(DEV, copy=True).requires_grad_() for t in inputs]  # float64, on the GPU there
    dev_in = [t.to(DEV, DTYPE if i in (0, 3, 4) else FLOAT, copy=True).requires_grad_() for i, t in enumerate(inputs)]
    y_ref, s_ref = ssd_ref(*ref_in[:5], initial_state=ref_in[5] if with_h0 else None, cu_seqlens=cu)  # cu on CPU
    if cu is not None:  # a packed call's final states: each document's own
        bounds = cu.tolist()
        s_ref = torch.cat([ssd_ref(*(t if t.dim() == 1 else t[:, a:b] for t in ref_in[:5]))[1]
                           for a, b in zip(bounds, bounds[1:])])
    y, s = ssd(*dev_in[:5], chunk_size=SIZES["chunk"], initial_state=dev_in[5] if with_h0 else None,
               cu_seqlens=None if cu is None else cu.to(DEV), output_final_state=final, backend="triton")
    g = torch.Generator().manual_seed(seed + 1)
    wy = torch.randn(y_ref.shape, generator=g, dtype=F64).to(DTYPE).to(F64).to(DEV)  # representable in y's dtype
    ws = torch.randn(s_ref.shape, generator=g, dtype=F64).to(DEV)
    loss_ref = (y_ref * wy).sum() + ((s_ref * ws).sum() if s is not None else 0)
    loss = (y.to(F64) * wy).sum() + ((s.to(F64) * ws).sum() if s is not None else 0)
    loss_ref.backward()
    loss.backward()
    pairs = [(y, y_ref)] + ([(s, s_ref)] if s is not None else [])
    used = range(6) if with_h0 else range(5)
    return pairs, [(dev_in[i].grad, ref_in[i].grad) for i in used]


NAMES = ["x", "dt", "A", "B", "C", "initial_state"]


def check(pairs, grads):
    for got, want in pairs:
        assert torch.isfinite(got).all()
        assert rel_rmse(got, want) < TOL, rel_rmse(got, want)
    for name, (got, want) in zip(NAMES, grads):
        assert got is not None and torch.isfinite(got).all(), name
        assert rel_rmse(got, want) < TOL, (name, rel_rmse(got, want))


@pytest.mark.parametrize("T", [2 * SIZES["chunk"] + 5, SIZES["chunk"]] if not CUDA else [2048, 1000])
def test_rows_with_initial_and_final_states(T, placement):
    pairs, grads = run_both(make_case(2, T, seed=T, **SIZES))
    check(pairs, grads)


def test_packed_documents(placement):
    L = SIZES["chunk"]
    # documents starting at a chunk start, inside a chunk, of one token, and one longer than two chunks
    lengths = [L, 3, 1, 2 * L + 5, L - 4, 7] if not CUDA else [2048, 17, 1, 3000, 900, 2226]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    pairs, grads = run_both(make_case(1, int(cu[-1]), seed=1, **SIZES), cu=cu)
    check(pairs, grads)


@pytest.mark.parametrize("packed", [False, True])
def test_state_split_over_programs(monkeypatch, packed, placement):
    """Each head's state split over several programs, by rows in the passes over chunks and by columns in B's and
    C's gradients, the last of each partly past P or N (on CUDA: the 125m heads in 4 and 8 parts); the per-chunk
    kernels' chunks split over programs with a partial last one."""
    from tttlm.ops.ssd import triton_ssd

    monkeypatch.setattr(triton_ssd, "SCAN_ROWS", 16)
    monkeypatch.setattr(triton_ssd, "DBC_COLUMNS", 16)
    monkeypatch.setattr(triton_ssd, "CHUNK_STEP", 2)  # 3 chunks: the second program of the per-chunk kernels has 1
    sizes = SIZES if CUDA else dict(SIZES, P=40, N=40)
    L = sizes["chunk"]
    cu = torch.tensor([0, L + 3, 2 * L + 5]) if packed else None
    pairs, grads = run_both(make_case(1 if packed else 2, 2 * L + 5, seed=7, **sizes), cu=cu)
    check(pairs, grads)


def test_split_continues_from_the_state():
    x, dt, A, B, C, h0 = (t.to(DEV, DTYPE if i in (0, 3, 4) else FLOAT)
                          for i, t in enumerate(make_case(1, 3 * SIZES["chunk"] + 3, seed=5, **SIZES)))
    kw = dict(chunk_size=SIZES["chunk"], output_final_state=True, backend="triton")
    y, s = ssd(x, dt, A, B, C, initial_state=h0, **kw)
    cut = SIZES["chunk"] + 7
    y1, s1 = ssd(x[:, :cut], dt[:, :cut], A, B[:, :cut], C[:, :cut], initial_state=h0, **kw)
    y2, s2 = ssd(x[:, cut:], dt[:, cut:], A, B[:, cut:], C[:, cut:], initial_state=s1, **kw)
    assert rel_rmse(torch.cat([y1, y2], 1), y) < TOL
    assert rel_rmse(s2, s) < TOL


def test_default_backend_is_torch_off_cuda():
    x, dt, A, B, C, _ = make_case(1, 20, seed=0, H=2, P=4, G=1, N=4)
    y, _ = ssd(x, dt, A, B, C, chunk_size=16)  # float64 on the CPU: PyTorch, exact
    torch.testing.assert_close(y, ssd_ref(x, dt, A, B, C)[0], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="chunk_size=8"):
        ssd(x, dt, A, B, C, chunk_size=8, backend="triton")
