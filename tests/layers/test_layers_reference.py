"""Every mixer against its plain per-token reference (plain_lm.py) in float64: the forward over whole rows, a packed
row of documents, and the gradients of every parameter and of the input."""

import pytest
import torch

from tttlm.layers import SeqInfo

from . import plain_lm
from .plain_lm import VARIANTS, make_model

# float64, but the layers compute RoPE angles, gates, eta and norms in float32: ~1e-7 relative error in outputs,
# up to ~1e-6 in the gradients of the parameters that pass through them
TOL, GRAD_TOL = 1e-6, 1e-5


def rel_err(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def reference_rows(layer, cfg, x):
    """The reference on each row of x [B, T, C]."""
    return torch.stack([plain_lm.mixer(layer, row, cfg) for row in x])


def mixer_of(variant: str, **overrides):
    """(the mixer of a one-block model of the variant, the model's config)"""
    model = make_model(variant, **overrides)
    return model.model.layers[0].mixer, model.config


def inputs(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_reference(variant):
    layer, cfg = mixer_of(variant)
    x = inputs(2, 21, cfg.hidden_size)
    with torch.no_grad():
        got = layer(x, SeqInfo.contiguous(2, 21, 0, x.device))
        want = reference_rows(layer, cfg, x)
    assert rel_err(got, want) <= TOL, variant


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_row_matches_reference_per_document(variant):
    """Documents packed in one row (cu_seqlens) each start fresh: states, convolutions, positions, attention."""
    layer, cfg = mixer_of(variant)
    bounds = [0, 5, 22, 23, 34]
    x = inputs(1, bounds[-1], cfg.hidden_size, seed=2)
    with torch.no_grad():
        got = layer(x, SeqInfo.packed(torch.tensor(bounds)))
        want = torch.cat([reference_rows(layer, cfg, x[:, a:b]) for a, b in zip(bounds, bounds[1:])], dim=1)
    assert rel_err(got, want) <= TOL, variant


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients_match_reference(variant):
    """The gradient of a weighted sum of the outputs with respect to every parameter and to the input."""
    layer, cfg = mixer_of(variant)
    layer.train()
    T = 19
    x = inputs(2, T, cfg.hidden_size).requires_grad_()
    weights = inputs(2, T, cfg.hidden_size, seed=3)
    params = dict(layer.named_parameters())
    got = torch.autograd.grad((layer(x, SeqInfo.contiguous(2, T, 0, x.device)) * weights).sum(),
                              [x, *params.values()])
    want = torch.autograd.grad((reference_rows(layer, cfg, x) * weights).sum(), [x, *params.values()])
    for name, g, w in zip(["input", *params], got, want):
        assert w.abs().max() > 0, name  # every parameter reaches the output
        assert rel_err(g, w) <= GRAD_TOL, (variant, name, rel_err(g, w))


def test_mesa_solver_settings():
    """mesa_cg_max_iter limits every solve; mesa_cg_tol stops them early outside training only (the paper's
    inference setting): each output is that of CG with those limits, and only 30 steps in training give the exact
    solve's."""
    x = inputs(2, 21, 64)
    info = SeqInfo.contiguous(2, 21, 0, x.device)
    for max_iter, tol, training in ((3, None, True), (30, 0.05, False), (30, 0.05, True)):
        layer, cfg = mixer_of("mesa", mesa_cg_max_iter=max_iter, mesa_cg_tol=tol)
        layer.train(training)
        with torch.no_grad():
            got = layer(x, info)
            exact = reference_rows(layer, cfg, x)
            solve = plain_lm.cg_solve(max_iter, None if training else tol)
            want = torch.stack([plain_lm.mesa(layer, row, cfg, solve) for row in x])
        assert rel_err(got, want) <= TOL, (max_iter, tol, training)
        assert (rel_err(got, exact) <= TOL) == (max_iter == 30 and training), (max_iter, tol, training)
