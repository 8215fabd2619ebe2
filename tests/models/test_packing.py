"""Packed batches equal their documents run one by one: nothing leaks across a document boundary."""

import pytest
import torch

MIXERS = ["ttt_linear", "ttt_mlp", "mesa", "transformer", "mamba2", "mamba"]
VARIANTS = [(m, {}) for m in MIXERS] + [("ttt_linear", {"ttt_backbone": "transformer"})]
LENGTHS = [7, 13, 2, 18]  # two rows of 20 tokens when packed by position ids


@pytest.mark.parametrize("mixer, overrides", VARIANTS)
@torch.no_grad()
def test_packed_row_equals_separate_documents(mixer, overrides, tiny, tokens):
    model = tiny(mixer, **overrides)
    docs = [tokens(1, n, seed=i) for i, n in enumerate(LENGTHS)]
    alone = torch.cat([model(d).logits for d in docs], dim=1)
    row = torch.cat(docs, dim=1)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    packed = model(row, cu_seqlens=cu).logits
    assert (packed - alone).abs().max().item() <= 1e-4
    # the same documents as position ids restarting at 0, two rows of 20 tokens
    pos = torch.cat([torch.arange(n) for n in LENGTHS]).view(2, 20)
    by_pos = model(row.view(2, 20), position_ids=pos).logits
    assert (by_pos.reshape(1, 40, -1) - alone).abs().max().item() <= 1e-4
    # and the loss never predicts across a boundary
    packed_loss = model(row, labels=row, cu_seqlens=cu, loss_reduction="sum").loss
    alone_loss = sum(model(d, labels=d, loss_reduction="sum").loss for d in docs)
    torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-5, atol=1e-4)
    # a plain forward of the same row does mix the documents (the test above could fail)
    assert (model(row).logits - alone).abs().max().item() > 1e-3


@torch.no_grad()
def test_a_row_of_one_document(tiny, tokens):
    """cu_seqlens = [0, T] (one document, as a packing loader gives for a row that one long document fills) is
    the plain row."""
    model = tiny("ttt_linear")
    row = tokens(1, 20)
    got = model(row, labels=row, cu_seqlens=torch.tensor([0, 20]))
    want = model(row, labels=row)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
