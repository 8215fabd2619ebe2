"""Training: every tiny mixer memorises a text (gradients reach every parameter, inner-loop ones included);
the chunked loss equals the plain one; gradient checkpointing changes nothing; the trainer's hooks."""

import pytest
import torch
import torch.nn.functional as F

from tttlm.layers import TTTMixer

MIXERS = ["ttt_linear", "ttt_mlp", "mesa", "transformer", "mamba2", "mamba"]


@pytest.mark.parametrize("mixer", MIXERS)
def test_tiny_model_overfits_one_text(mixer, tiny, tokens):
    model = tiny(mixer, vocab_size=64, initializer_range=0.02).train()
    text = tokens(1, 256) % 64
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(150):
        loss = model(text, labels=text).loss
        opt.zero_grad()
        loss.backward()
        if step == 0:
            no_grad = [n for n, p in model.named_parameters() if p.grad is None or not bool((p.grad != 0).any())]
            assert no_grad == [], f"parameters without gradient: {no_grad}"
        opt.step()
        if loss.item() < 0.1:
            break
    assert loss.item() < 0.1, f"{mixer}: loss {loss.item():.3f} after {step + 1} steps"


def test_chunked_loss_equals_full_cross_entropy(tiny, tokens):
    model = tiny("mamba2", loss_chunk_size=7)
    ids = tokens(2, 30)
    labels = ids.clone()
    labels[0, 5:9] = -100
    logits = model(ids).logits
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(model(ids, labels=labels).loss, want)
    per_token = model(ids, labels=labels, loss_reduction="none").loss
    assert per_token.shape == (2, 30) and per_token[0, 4:8].eq(0).all() and per_token[:, -1].eq(0).all()
    torch.testing.assert_close(per_token.sum() / (labels[:, 1:] != -100).sum(), want)


@pytest.mark.parametrize("mixer", ["ttt_linear", "transformer"])
def test_gradient_checkpointing_changes_nothing(mixer, tiny, tokens):
    ids = tokens(2, 24)
    grads = []
    for checkpointing in (False, True):
        model = tiny(mixer).train()
        if checkpointing:
            model.checkpoint_activations()
            assert model.checkpointing_activations
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b)


def test_inner_lr_warmup(tiny):
    model = tiny("ttt_mlp")
    x = torch.randn(1, 8, model.config.hidden_size)
    layer = next(m for m in model.modules() if isinstance(m, TTTMixer))
    full = layer.op_inputs(x)["eta"]
    assert model.set_inner_lr_warmup(0.0) == pytest.approx(0.01)
    torch.testing.assert_close(layer.op_inputs(x)["eta"], full * 0.1)
    assert model.set_inner_lr_warmup(0.5) == pytest.approx(0.055)
    assert model.set_inner_lr_warmup(2.0) == pytest.approx(0.1)
    torch.testing.assert_close(layer.op_inputs(x)["eta"], full)


def test_no_weight_decay_names(tiny):
    names = tiny("ttt_linear").no_weight_decay_names()
    for suffix in (
        "mixer.W0",
        "mixer.b0",
        "mixer.ln_weight",
        "mixer.token_scale_offset",
        "mixer_norm.weight",
        "mixer.lr_proj.bias",
        "mixer.post_norm.weight",
    ):
        assert f"model.layers.0.{suffix}" in names
    assert "model.layers.0.mixer.v_proj.weight" not in names and "model.embed_tokens.weight" not in names
    assert "model.layers.1.mixer.lamb_param" in tiny("mesa").no_weight_decay_names()
    assert "model.layers.0.mixer.A_log" in tiny("mamba2").no_weight_decay_names()


@pytest.mark.parametrize("mixer", MIXERS)
def test_bfloat16_autocast_and_cast(mixer, tiny, tokens):
    ids = tokens(2, 20)
    model = tiny(mixer).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        logits = model(ids).logits
        cache = model(ids[:, :19], use_cache=True).past_key_values
        step = model(ids[:, 19:], past_key_values=cache).logits
    assert logits.dtype == torch.bfloat16 and (step[:, -1] - logits[:, -1]).abs().max().item() < 0.1
