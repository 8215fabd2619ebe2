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


def mixer_of(variant: str, seed: int = 0):
    """(the mixer of a one-block model of the variant, the model's config)"""
    model = make_model(variant, seed=seed)
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
