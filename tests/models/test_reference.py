"""Whole models against the plain per-token reference (tests/layers/plain_lm.py) in float64: logits of whole rows,
packed rows (a document cut by a row boundary continues as a fresh sequence), decoding through the cache, and the
summed loss with its gradients."""

import pytest
import torch

from ..layers import plain_lm
from ..layers.plain_lm import VARIANTS, make_model

# float64, but the layers compute RoPE angles, gates and norms in float32 (tests/layers/test_layers_reference.py):
# through two blocks the outputs carry ~1e-6 relative errors, and Mesa's gradients ~1e-5
TOL, GRAD_TOL = 1e-5, 1e-4


def rel_err(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def tokens(*shape, seed=1):
    return torch.randint(0, 61, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request):
    return make_model(request.param, layers=2)


@torch.no_grad()
def test_logits_match_reference(model):
    ids = tokens(2, 20)
    want = torch.stack([plain_lm.lm_logits(model, row) for row in ids])
    assert rel_err(model(ids).logits, want) <= TOL


@torch.no_grad()
def test_packed_rows_match_reference(model):
    """Three documents of 9, 15 and 16 tokens laid end to end in two rows of 20, as the training loader cuts them:
    positions restart at every document start and at the second row's start, inside the second document, whose
    last 4 tokens are then a sequence of their own. The same as cu_seqlens on one row."""
    ids = tokens(40, seed=2)
    pieces = [(0, 9), (9, 20), (20, 24), (24, 40)]
    want = torch.cat([plain_lm.lm_logits(model, ids[a:b]) for a, b in pieces])
    pos = torch.cat([torch.arange(b - a) for a, b in pieces])
    got = model(ids.view(2, 20), position_ids=pos.view(2, 20)).logits.reshape(40, -1)
    assert rel_err(got, want) <= TOL
    # the same with the positions inside the documents (the second row starts at 11): a row start is a start
    inside = torch.cat([torch.arange(9), torch.arange(15), torch.arange(16)])
    got = model(ids.view(2, 20), position_ids=inside.view(2, 20)).logits.reshape(40, -1)
    assert rel_err(got, want) <= TOL
    cu = torch.tensor([0, 9, 20, 24, 40])
    assert rel_err(model(ids[None], cu_seqlens=cu).logits[0], want) <= TOL
    summed = sum(plain_lm.lm_loss(model, ids[a:b]) for a, b in pieces)
    loss = model(ids.view(2, 20), labels=ids.view(2, 20), position_ids=pos.view(2, 20), loss_reduction="sum").loss
    assert rel_err(loss, summed) <= TOL


@torch.no_grad()
def test_mesa_decoding_uses_the_solver_settings():
    """Decoding token by token stops each solve as reading the whole row does (mesa_cg_max_iter, and outside
    training mesa_cg_tol), and these settings do change the logits."""
    ids = tokens(2, 12, seed=3)
    exact = make_model("mesa", layers=2)(ids).logits
    for settings in ({"mesa_cg_max_iter": 3}, {"mesa_cg_tol": 0.05}):
        model = make_model("mesa", layers=2, **settings)
        full = model(ids).logits
        cache = model(ids[:, :4], use_cache=True).past_key_values
        steps = [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(4, 12)]
        assert rel_err(torch.cat(steps, dim=1), full[:, 4:]) <= TOL, settings
        assert rel_err(full, exact) > 1e-3, settings


@torch.no_grad()
def test_decoding_matches_reference(model):
    """A prefill of 5 tokens, a continuation of 13 (across TTT's mini-batch boundary at 16), then one token at a
    time: every position's logits as the reference reads the whole row."""
    ids = tokens(2, 24, seed=3)
    want = torch.stack([plain_lm.lm_logits(model, row) for row in ids])
    out = model(ids[:, :5], use_cache=True)
    cache, got = out.past_key_values, [out.logits]
    got.append(model(ids[:, 5:18], past_key_values=cache, use_cache=True).logits)
    for t in range(18, 24):
        got.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    assert rel_err(torch.cat(got, dim=1), want) <= TOL


def test_gradients_match_reference(model):
    """The gradient of every parameter, in training mode, of a weighted sum of the logits (random weights: the
    cross-entropy's gradient of an untrained model cancels over the vocabulary, and what is left of it is too
    small beside the float32 roundings of the layers to compare)."""
    model.train()
    try:
        ids = tokens(2, 18, seed=4)
        weights = torch.randn(2, 18, 61, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        params = dict(model.named_parameters())
        got = torch.autograd.grad((model(ids).logits * weights).sum(), list(params.values()))
        want_logits = torch.stack([plain_lm.lm_logits(model, row) for row in ids])
        want = torch.autograd.grad((want_logits * weights).sum(), list(params.values()))
        loss = model(ids, labels=ids).loss
    finally:
        model.eval()
    assert rel_err(loss, sum(plain_lm.lm_loss(model, row) for row in ids) / (2 * 17)) <= TOL  # mean over targets
    for name, g, w in zip(params, got, want):
        assert rel_err(g, w) <= GRAD_TOL, (name, rel_err(g, w))
