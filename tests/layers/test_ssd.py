"""The chunked state-space-duality algorithm and its one-token step against the float64 recurrence."""

import pytest
import torch

from tttlm.ops.ssd import ssd, ssd_ref, ssd_step


def _inputs(Bt=2, T=37, H=4, P=3, G=2, N=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(Bt, T, H, P, generator=g, dtype=dtype)
    dt = torch.rand(Bt, T, H, generator=g, dtype=dtype) * 0.8
    A = -(torch.rand(H, generator=g, dtype=dtype) * 2 + 0.1)
    B = torch.randn(Bt, T, G, N, generator=g, dtype=dtype)
    C = torch.randn(Bt, T, G, N, generator=g, dtype=dtype)
    h0 = torch.randn(Bt, H, P, N, generator=g, dtype=dtype)
    return x, dt, A, B, C, h0


@pytest.mark.parametrize("chunk_size", [1, 8, 16, 64])
def test_chunked_matches_recurrence(chunk_size):
    x, dt, A, B, C, h0 = _inputs()
    y, s = ssd(x, dt, A, B, C, chunk_size=chunk_size, initial_state=h0, output_final_state=True)
    y_ref, s_ref = ssd_ref(x, dt, A, B, C, initial_state=h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


def test_packed_documents_reset_state():
    x, dt, A, B, C, _ = _inputs(Bt=1, T=41)
    cu = torch.tensor([0, 5, 16, 17, 33, 41])
    y, finals = ssd(x, dt, A, B, C, chunk_size=8, cu_seqlens=cu, output_final_state=True)
    y_ref, _ = ssd_ref(x, dt, A, B, C, cu_seqlens=cu)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    # each document's own final state: documents inside a chunk, across chunks, of one token, ending at a chunk end
    assert finals.shape == (5, 4, 3, 5)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        _, s_ref = ssd_ref(x[:, a:b], dt[:, a:b], A, B[:, a:b], C[:, a:b])
        torch.testing.assert_close(finals[n], s_ref[0], rtol=1e-10, atol=1e-10)
    a, b = 17, 33  # one document alone gives the same outputs
    y_doc, _ = ssd(x[:, a:b], dt[:, a:b], A, B[:, a:b], C[:, a:b], chunk_size=8)
    torch.testing.assert_close(y[:, a:b], y_doc, rtol=1e-10, atol=1e-10)


def test_step_continues_chunked():
    x, dt, A, B, C, h0 = _inputs(T=30)
    y_full, s_full = ssd(x, dt, A, B, C, chunk_size=8, initial_state=h0, output_final_state=True)
    y, s = ssd(
        x[:, :19],
        dt[:, :19],
        A,
        B[:, :19],
        C[:, :19],
        chunk_size=8,
        initial_state=h0,
        output_final_state=True,
    )
    outs = [y]
    for t in range(19, 30):
        o, s = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], s)
        outs.append(o[:, None])
    torch.testing.assert_close(torch.cat(outs, 1), y_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_full, rtol=1e-10, atol=1e-10)


def test_float32_matches_float64():
    x, dt, A, B, C, h0 = _inputs(T=24)
    y, _ = ssd(*(t.float() for t in (x, dt, A, B, C)), chunk_size=8)
    assert y.dtype == torch.float32
    y_ref, _ = ssd_ref(x, dt, A, B, C)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk_size, packed", [(8, False), (16, False), (8, True)])
def test_gradients_match_recurrence(chunk_size, packed):
    """The gradients of every input (and of the initial state, and through the final state) of the chunked
    algorithm equal those of the token-by-token recurrence, in float64."""
    T = 37
    x, dt, A, B, C, h0 = _inputs(Bt=1 if packed else 2, T=T)
    cu = torch.tensor([0, 5, 16, 17, 30, 37]) if packed else None
    g = torch.Generator().manual_seed(5)
    w_y = torch.randn(x.shape, generator=g, dtype=torch.float64)
    w_s = torch.randn(h0.shape, generator=g, dtype=torch.float64)
    grads = []
    for fn in ("chunked", "ref"):
        args = [t.clone().requires_grad_() for t in (x, dt, A, B, C, h0)]
        if fn == "ref":
            y, s = ssd_ref(*args[:5], initial_state=None if packed else args[5], cu_seqlens=cu)
        else:
            y, s = ssd(*args[:5], chunk_size=chunk_size, initial_state=None if packed else args[5], cu_seqlens=cu,
                       output_final_state=not packed)
        loss = (y * w_y).sum() + (0 if packed else (s * w_s).sum())
        grads.append(torch.autograd.grad(loss, args[:5] if packed else args))
    for name, got, want in zip("x dt A B C h0".split(), *grads):
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)


def test_bad_shapes_raise():
    x, dt, A, B, C, h0 = _inputs()
    with pytest.raises(ValueError, match="dt"):
        ssd(x, dt[:, :-1], A, B, C)
    with pytest.raises(ValueError, match="groups"):
        ssd(x, dt, A, B[:, :, :1].expand(-1, -1, 3, -1), C[:, :, :1].expand(-1, -1, 3, -1))
    with pytest.raises(ValueError, match="initial_state"):
        ssd(x, dt, A, B, C, initial_state=h0[:1])
