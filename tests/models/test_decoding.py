"""Decoding with the cache equals the full forward; generate() with and without the cache agree."""

import pytest
import torch

from tttlm.models import TTTLMCache
from tttlm.models.modeling import CACHE_FIELD

MIXERS = ["ttt_linear", "ttt_mlp", "mesa", "transformer", "mamba2", "mamba"]
RECURRENT = ["ttt_linear", "ttt_mlp", "mesa", "mamba2", "mamba"]
# every mixer, plus the TTT Transformer backbone and Mesa's forget-gate cap
VARIANTS = [(m, {}) for m in MIXERS] + [
    ("ttt_mlp", {"ttt_backbone": "transformer"}),
    ("mesa", {"mesa_gate_cap": True}),
]


def _decode(model, ids, prefill, chunk=0):
    """Logits of ids read as a prefill, an optional multi-token continuation, then one token at a time;
    also the cache size after each single-token step."""
    out = model(ids[:, :prefill], use_cache=True)
    cache, logits, sizes = out.past_key_values, [out.logits], []
    t = prefill
    if chunk:
        logits.append(model(ids[:, t : t + chunk], past_key_values=cache, use_cache=True).logits)
        t += chunk
    for i in range(t, ids.shape[1]):
        logits.append(model(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits)
        sizes.append(cache.nbytes())
    assert cache.get_seq_length() == ids.shape[1]
    return torch.cat(logits, dim=1), sizes


@pytest.mark.parametrize("mixer, overrides", VARIANTS)
@torch.no_grad()
def test_cached_steps_equal_full_forward(mixer, overrides, tiny, tokens):
    model = tiny(mixer, **overrides)
    ids = tokens(2, 40)
    full = model(ids).logits
    for prefill, chunk in ((23, 0), (10, 13), (1, 0)):
        inc, sizes = _decode(model, ids, prefill, chunk)
        assert (inc - full).abs().max().item() <= 1e-4, (prefill, chunk)
    if mixer in RECURRENT:
        assert len(set(sizes)) == 1, "a recurrent cache must not grow with the context"
    else:
        assert sizes[-1] > sizes[0]
    # the mixer carries information along the sequence: the last logits depend on the first token
    other = ids.clone()
    other[:, 0] = (other[:, 0] + 1) % 97
    assert (model(other).logits[:, -1] - full[:, -1]).abs().max().item() > 1e-3


@pytest.mark.parametrize("mixer", MIXERS)
def test_generate_with_and_without_cache(mixer, tiny, tokens):
    model = tiny(mixer)
    prompt = tokens(2, 9)
    kw = dict(max_new_tokens=24, pad_token_id=0)
    greedy = model.generate(prompt, do_sample=False, **kw)
    assert greedy.shape == (2, 33) and torch.equal(greedy[:, :9], prompt)
    assert torch.equal(greedy, model.generate(prompt, do_sample=False, use_cache=False, **kw))
    beams = dict(num_beams=3, max_new_tokens=8, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **beams), model.generate(prompt, use_cache=False, **beams))
    torch.manual_seed(5)
    sampled = model.generate(prompt, do_sample=True, top_k=0, **kw)
    torch.manual_seed(5)
    assert torch.equal(sampled, model.generate(prompt, do_sample=True, top_k=0, use_cache=False, **kw))


def test_cache_reorders_rows(tiny, tokens):
    model = tiny("ttt_linear")
    ids = tokens(3, 20)
    with torch.no_grad():
        cache = model(ids[:, :19], use_cache=True).past_key_values
        cache.reorder_cache(torch.tensor([2, 0, 1]))
        last = model(ids[[2, 0, 1], 19:], past_key_values=cache).logits
        full = model(ids[[2, 0, 1]]).logits[:, -1:]
    assert (last - full).abs().max().item() <= 1e-4


def test_cache_under_either_name(tiny, tokens):
    """forward takes the decoding cache as past_key_values or as cache (transformers 5.24's name), and returns it
    in the installed transformers' output field."""
    model = tiny("ttt_linear")
    ids = tokens(2, 20)
    with torch.no_grad():
        caches = [TTTLMCache(model.config.num_hidden_layers) for _ in range(2)]
        out = model(ids[:, :19], cache=caches[0], use_cache=True)
        assert getattr(out, CACHE_FIELD) is caches[0]
        model(ids[:, :19], past_key_values=caches[1], use_cache=True)
        by_name = [model(ids[:, 19:], **{name: c}).logits for name, c in zip(("cache", "past_key_values"), caches)]
    assert torch.equal(*by_name)
    assert (by_name[0] - model(ids).logits[:, -1:]).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="not both"):
        model(ids, cache=caches[0], past_key_values=caches[1])


def test_bad_inputs_raise(tiny, tokens):
    model = tiny("transformer")
    ids = tokens(2, 6)
    with pytest.raises(ValueError, match="left padding"):
        model(ids, attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0], [1] * 6]))
    with pytest.raises(ValueError, match="left padding"):
        model(ids, attention_mask=torch.tensor([[0, 1, 0, 1, 1, 1], [1] * 6]))
    left_padded = torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6])
    with pytest.raises(ValueError, match="labels"):
        model(ids, attention_mask=left_padded, labels=ids)
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, attention_mask=left_padded, position_ids=torch.arange(6).expand(2, 6))
    with pytest.raises(ValueError, match="TTTLMCache"):
        model(ids, past_key_values=object())
    cache = model(ids[:1, :2], use_cache=True).past_key_values
    with pytest.raises(ValueError, match="continue a decoding cache"):
        model(ids[:1], cu_seqlens=torch.tensor([0, 2, 6]), past_key_values=cache)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids[:1], position_ids=torch.tensor([[0, 1, 0, 1, 2, 3]]), use_cache=True)
    with pytest.raises(ValueError, match="does not support label"):
        model(ids, label=ids)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids, cu_seqlens=torch.tensor([0, 6]))
