"""Decoding on static buffers (tttlm.models.decode) equals the eager cache path for every mixer, and prompts of
different lengths in one batch equal each prompt read alone.

On CPU the static path runs without a CUDA graph (decode="static": the graph path's logic, buffers updated in
place, every row at its own position), in float32; on CUDA the same tests also run with the graph
(decode="graph"), in float64 (the float32 Triton prefill multiplies in tf32, which would blur the comparisons
of packed and single prompts), and a bf16 test runs the GPU's own decode kernels under the graph.

The main tests run with the blocks compiled and not (`compiled`), against references computed uncompiled: on
CUDA with inductor (the default there), on the CPU with the "aot_eager" backend (Dynamo's tracing, graph breaks,
guards and in-place buffer writes without code generation; `test_compiled_step_with_inductor` generates code).
"""

import logging
import shutil

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.utils import counters

from tttlm import fast
from tttlm.layers import SeqInfo
from tttlm.models import MIXERS, TTTLMCache, build_model, decode
from tttlm.models.cache import LayerCache, StaticLayerCache
from tttlm.models.modeling import CACHE_FIELD, TTTLMBlock
from tttlm.ops import TTTLinearState

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPE = torch.float64 if CUDA else torch.float32
MODES = ["static", "graph"] if CUDA else ["static"]
TOL = 1e-4
# every mixer, plus the TTT Transformer backbone and Mesa's forget-gate cap
VARIANTS = [(m, {}) for m in MIXERS] + [("ttt_mlp", {"ttt_backbone": "transformer"}), ("mesa", {"mesa_gate_cap": True})]
# (compiled, ...) cases: every case plain, every mixer compiled (compiling is what costs the time on the CPU)
STEP_CASES = [(False, m, o) for m, o in VARIANTS] + [(True, m, {}) for m in MIXERS]
PROMPT_CASES = [(False, m, p) for m in MIXERS for p in ("left_padded", "cu_seqlens")] + [
    (True, m, "left_padded") for m in MIXERS
]


@pytest.fixture
def compiled(request, monkeypatch):
    """Whether the code under test runs with its blocks compiled (see the module docstring); the references of
    the tests run under `fast.fast_paths(compile=False)`."""
    if request.param and not CUDA:
        monkeypatch.setattr(fast, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    with fast.fast_paths(compile=request.param):
        yield request.param
    torch._dynamo.reset()


def _plain():
    return fast.fast_paths(compile=False)


def _cache(model, mode):
    return TTTLMCache(model.config.num_hidden_layers, decode=mode)


def _left_padded(seqs, lengths):
    """The prompts seqs[b][:lengths[b]] left-padded with 0 into [B, max length], and their attention mask."""
    T = max(lengths)
    ids = torch.stack([F.pad(s[:n], (T - n, 0)) for s, n in zip(seqs, lengths)])
    mask = torch.stack([F.pad(torch.ones(n, dtype=torch.long), (T - n, 0)) for n in lengths])
    return ids, mask


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("compiled, mixer, overrides", STEP_CASES, indirect=["compiled"])
@torch.no_grad()
def test_static_steps_equal_eager(mixer, overrides, mode, compiled, tiny, tokens):
    """Prefill 9 tokens, then 31 single-token steps (TTT's mini-batch offset crosses 16 and 32). Compiled, the
    steps after the first two compile nothing more: positions and TTT's offsets are tensors, and a static cache's
    buffers keep their shapes."""
    model = tiny(mixer, **overrides).to(DEV, DTYPE)
    ids = tokens(2, 40).to(DEV)
    eager, static = _cache(model, "eager"), _cache(model, mode)
    with _plain():
        out = [model(ids[:, :9], use_cache=True, **{CACHE_FIELD: eager}).logits[:, -1:]]
        out += [model(ids[:, t : t + 1], **{CACHE_FIELD: eager}).logits for t in range(9, 40)]
    logits = {"eager": torch.cat(out, 1)}
    out = [model(ids[:, :9], use_cache=True, **{CACHE_FIELD: static}).logits[:, -1:]]
    out += [model(ids[:, t : t + 1], **{CACHE_FIELD: static}).logits for t in range(9, 11)]
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 5 if compiled else graphs == 0  # every block (4 graphs, see below) and the final norm
    with torch._dynamo.config.patch(error_on_recompile=True):
        out += [model(ids[:, t : t + 1], **{CACHE_FIELD: static}).logits for t in range(11, 40)]
    assert counters["stats"]["unique_graphs"] == graphs
    logits["static"] = torch.cat(out, 1)
    assert static.is_static and not eager.is_static
    assert static.positions.tolist() == [40, 40] and static.seen_tokens == eager.seen_tokens == 40
    assert (logits["static"] - logits["eager"]).abs().max().item() <= TOL
    if mode == "graph":
        assert static.decoder.graph is not None, "the step was not captured"


def _static_after_prefill(model, ids):
    """A static cache after reading ids[:, :-1] (uncompiled): the prefill and one step."""
    cache = _cache(model, "static")
    with _plain():
        model(ids[:, :-2], use_cache=True, **{CACHE_FIELD: cache})
        model(ids[:, -2:-1], **{CACHE_FIELD: cache})
    return cache


@pytest.mark.parametrize("mixer, overrides", VARIANTS[: len(MIXERS) + 1])
@torch.no_grad()
def test_compiled_step_breaks_only_at_the_op(mixer, overrides, tiny, tokens):
    """A block's step on a static cache compiles to four graphs: the block up to its mixer, the mixer up to its
    op, the rest of the mixer, the rest of the block. The only graph breaks are at the op, whose own kernels run
    between the graphs (`tttlm.fast.opaque`); anything else that stops the tracing (a host sync, a call Dynamo
    cannot follow) would add graphs, and kernels to every step."""
    model = tiny(mixer, **overrides).to(DEV, DTYPE)
    ids = tokens(2, 11).to(DEV)
    cache = _static_after_prefill(model, ids)
    x = model.model.embed_tokens(ids[:, -1:])
    info = SeqInfo(cache.positions[:, None].clone())
    torch._dynamo.reset()
    try:
        found = torch._dynamo.explain(TTTLMBlock._forward)(model.model.layers[0], x, info, cache.layers[0])
    finally:
        torch._dynamo.reset()
    reasons = [str(r.reason).splitlines()[0] for r in found.break_reasons]
    assert found.graph_count == 4 and all("torch.compiler.disable" in r for r in reasons), reasons


@pytest.mark.skipif(CUDA, reason="on CUDA the compiled tests above generate code")
@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor's CPU code needs a C++ compiler")
@pytest.mark.parametrize("mixer", ["transformer"])
@torch.no_grad()
def test_compiled_step_with_inductor(mixer, tiny, tokens):
    """The step compiled by inductor (the generated code CUDA runs, here for the CPU), in float64, equals the
    uncompiled step over 7 tokens, with the in-place writes of the static buffers: attention's keys and values at
    each row's position (an index_put_ that must write the buffers, not copies of them)."""
    model = tiny(mixer).double()
    ids = tokens(2, 17)
    caches = [_static_after_prefill(model, ids[:, :11]) for _ in range(2)]
    logits = []
    torch._dynamo.reset()
    try:
        for cache, on in zip(caches, (False, True), strict=True):
            with fast.fast_paths(compile=on):
                logits.append(torch.cat([model(ids[:, t : t + 1], **{CACHE_FIELD: cache}).logits
                                         for t in range(10, 17)], 1))
    finally:
        torch._dynamo.reset()
    assert (logits[1] - logits[0]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_mesa_runs_fixed_cg_steps(mode, tiny, tokens):
    """On static buffers Mesa ignores mesa_cg_tol (the host would have to decide when to stop): after the same
    prefill (which uses it), its steps equal the eager steps without a tolerance, not those with one."""
    ids = tokens(2, 20).to(DEV)
    logits = {}
    for name in ("fixed", "tol", "static"):
        model = tiny("mesa", mesa_cg_tol=0.5).to(DEV, DTYPE)
        cache = _cache(model, mode if name == "static" else "eager")
        model(ids[:, :9], use_cache=True, **{CACHE_FIELD: cache})
        if name == "fixed":
            for block in model.model.layers:
                block.mixer.cg_tol = None
        logits[name] = torch.cat([model(ids[:, t : t + 1], **{CACHE_FIELD: cache}).logits for t in range(9, 20)], 1)
    assert (logits["static"] - logits["fixed"]).abs().max().item() <= TOL
    assert (logits["static"] - logits["tol"]).abs().max().item() > 1e-2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("compiled, mixer, prefill", PROMPT_CASES, indirect=["compiled"])
@torch.no_grad()
def test_prompts_of_different_lengths(mixer, prefill, mode, compiled, tiny, tokens):
    """Four prompts of 7, 1, 14 and 20 tokens read in one call, then 14 steps of all rows together, equal each
    sequence read alone (TTT rows at different mini-batch offsets, crossing 16 and 32); compiled, the prefill
    of the packed prompts too."""
    model = tiny(mixer).to(DEV, DTYPE)
    lengths, steps = [7, 1, 14, 20], 14
    seqs = [tokens(1, n + steps, seed=i)[0].to(DEV) for i, n in enumerate(lengths)]
    cache = _cache(model, mode)
    mask = None
    if prefill == "left_padded":
        ids, mask = _left_padded(seqs, lengths)
        mask = mask.to(DEV)
        out = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **{CACHE_FIELD: cache})
    else:
        packed = torch.cat([s[:n] for s, n in zip(seqs, lengths)])[None]
        cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(DEV)
        out = model(packed, cu_seqlens=cu, use_cache=True, logits_to_keep=1, **{CACHE_FIELD: cache})
    got = [out.logits]
    for t in range(steps):
        new = torch.stack([s[n + t] for s, n in zip(seqs, lengths)])[:, None]
        if mask is not None:  # as generate() passes it: the prompts' mask, then ones
            mask = F.pad(mask, (0, 1), value=1)
        got.append(model(new, attention_mask=mask, **{CACHE_FIELD: cache}).logits)
    got = torch.cat(got, 1)  # [4, steps + 1, V]
    assert cache.positions.tolist() == [n + steps for n in lengths]
    for b, n in enumerate(lengths):
        with _plain():
            alone = model(seqs[b][None]).logits[0, n - 1 :]
        assert (got[b] - alone).abs().max().item() <= TOL, b


@pytest.mark.skipif(CUDA, reason="on CUDA the tests above run these kernels")
@pytest.mark.parametrize("mixer", ["transformer", "mamba2"])
@torch.no_grad()
def test_kernels_in_static_decode(mixer, tiny, tokens, monkeypatch):
    """tttlm's GPU paths as static decoding calls them, on the CPU under the Triton interpreter: the Mamba2 scan's
    kernels in a packed prefill (each prompt's final state) and attention's split-KV kernels over the static
    buffers at every step, against the PyTorch paths."""
    model = tiny(mixer, mamba_chunk_size=16)
    lengths, steps = [7, 1, 14, 20], 6
    seqs = [tokens(1, n + steps, seed=i)[0] for i, n in enumerate(lengths)]
    packed = torch.cat([s[:n] for s, n in zip(seqs, lengths)])[None]
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0))

    def run():
        cache = _cache(model, "static")
        got = [model(packed, cu_seqlens=cu, use_cache=True, logits_to_keep=1, **{CACHE_FIELD: cache}).logits]
        for t in range(steps):
            new = torch.stack([s[n + t] for s, n in zip(seqs, lengths)])[:, None]
            got.append(model(new, **{CACHE_FIELD: cache}).logits)
        return torch.cat(got, 1)

    want = run()
    from tttlm import fast
    from tttlm.ops import attention_cached_triton
    from tttlm.ops.ssd import triton_ssd

    monkeypatch.setattr(fast, "KERNEL_DEVICES", ("cuda", "cpu"))
    calls = []
    for module, name in ((triton_ssd, "ssd_triton"), (attention_cached_triton, "cached_attention_triton")):
        kernels = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _k=kernels, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    got = run()
    layers = model.config.num_hidden_layers
    expected = {"ssd_triton": layers} if mixer == "mamba2" else {"cached_attention_triton": layers * steps}
    assert {n: calls.count(n) for n in set(calls)} == expected
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("mixer, in_place", [("ttt_linear", False), ("ttt_mlp", False), ("mesa", True)])
@torch.no_grad()
def test_recurrent_steps_write_static_buffers(mixer, in_place, tiny, tokens, monkeypatch):
    """On a static cache Mesa's step writes the state buffers itself (inplace=True): every step hands the cache's
    setter its own state object back (nothing to copy); TTT's steps hand it new states, which it copies in (see
    TTTMixer.forward). Either way the steps equal the eager cache's. In float32, uncompiled, the prefill on PyTorch
    and the steps on their Triton kernels (on the CPU under the interpreter); 20 steps after 9 tokens cross TTT's
    mini-batch end."""
    if not CUDA:
        monkeypatch.setattr(fast, "KERNEL_DEVICES", ("cuda", "cpu"))
    setter = StaticLayerCache.state.fset
    same = []

    def recording(layer, new):
        same.append(new is layer.state)
        setter(layer, new)

    monkeypatch.setattr(StaticLayerCache, "state", property(StaticLayerCache.state.fget, recording))
    model = tiny(mixer, **({"mesa_cg_max_iter": 6} if mixer == "mesa" else {})).to(DEV)  # fewer steps interpreted
    ids = tokens(2, 29).to(DEV)
    logits = {}
    for mode in ("eager", "static"):
        cache = _cache(model, mode)
        with fast.fast_paths(compile=False, kernels=False):
            model(ids[:, :9], use_cache=True, **{CACHE_FIELD: cache})
        same.clear()
        with _plain():
            logits[mode] = torch.cat([model(ids[:, t : t + 1], **{CACHE_FIELD: cache}).logits
                                      for t in range(9, 29)], 1)
    assert len(same) == 20 * model.config.num_hidden_layers and set(same) == {in_place}
    assert (logits["static"] - logits["eager"]).abs().max().item() <= TOL


def test_static_op_state_is_contiguous():
    """A static layer's op state is contiguous whatever the layout it came in (the steps write it in place), its
    rows selected too."""
    layer = LayerCache()
    layer.state = TTTLinearState.start(torch.randn(2, 3, 4, 4).mT, torch.randn(3, 2, 4).transpose(0, 1))
    static = StaticLayerCache(layer, 8)
    assert all(t.is_contiguous() for t in static.tensors())
    assert all(torch.equal(a, b) for a, b in zip(static.tensors(), layer.tensors(), strict=True))
    static.batch_select_indices(torch.tensor([1]))
    assert all(t.is_contiguous() and t.shape[0] == 1 for t in static.tensors())


@pytest.mark.parametrize("mixer", MIXERS)
@torch.no_grad()
def test_generate_left_padded_prompts(mixer, tiny, tokens):
    """generate() on left-padded prompts of different lengths gives each prompt's own greedy continuation."""
    model = tiny(mixer).to(DEV, DTYPE)
    lengths = [5, 9, 2]
    seqs = [tokens(1, n, seed=10 + i)[0].to(DEV) for i, n in enumerate(lengths)]
    ids, mask = _left_padded(seqs, lengths)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    batch = model.generate(ids, attention_mask=mask.to(DEV), **kw)
    for b, s in enumerate(seqs):
        assert torch.equal(batch[b, ids.shape[1] :], model.generate(s[None], **kw)[0, len(s) :]), b


def _beam_search_matches(model, tokens) -> None:
    """Beam search over two left-padded prompts of 9 and 4 tokens on a static cache equals beam search re-reading
    the whole rows at every step (use_cache=False)."""
    lengths = [9, 4]
    ids, mask = _left_padded([tokens(1, n, seed=20 + i)[0] for i, n in enumerate(lengths)], lengths)
    ids, mask = ids.to(DEV), mask.to(DEV)
    kw = dict(num_beams=3, max_new_tokens=8, pad_token_id=0, attention_mask=mask)
    cache = _cache(model, MODES[-1])
    beams = model.generate(ids, **{CACHE_FIELD: cache}, **kw)
    with _plain():
        assert cache.is_static and torch.equal(beams, model.generate(ids, use_cache=False, **kw))


@pytest.mark.parametrize("compiled, mixer", [(False, "ttt_linear"), (False, "transformer"), (True, "transformer")],
                         indirect=["compiled"])
def test_beam_search_on_static_cache(mixer, compiled, tiny, tokens):
    """Beam search reorders the static buffers' rows in place (the captured graph keeps its buffers)."""
    _beam_search_matches(tiny(mixer).to(DEV, DTYPE), tokens)


@pytest.mark.skipif(CUDA, reason="on CUDA the test above runs these paths")
def test_kernels_in_beam_search(tiny, tokens, monkeypatch):
    """The transformer's beam search as CUDA runs it, on the CPU in float64: the split-KV kernels (under the Triton
    interpreter) at every step, and the use_cache=False forwards of the left-padded rows given FlexAttention's
    document mask, which float64 must not reach (its compiled kernels have no float64)."""
    from tttlm import fast
    from tttlm.ops import attention, attention_cached_triton

    monkeypatch.setattr(fast, "KERNEL_DEVICES", ("cuda", "cpu"))
    calls = []
    for module, name in ((attention_cached_triton, "cached_attention_triton"), (attention, "document_mask")):
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=fn, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    model = tiny("transformer").double()
    _beam_search_matches(model, tokens)
    steps = 7  # after the prefill's token; the use_cache=False side reads all 8 times
    expected = {"cached_attention_triton": model.config.num_hidden_layers * steps, "document_mask": steps + 1}
    assert {n: calls.count(n) for n in set(calls)} == expected


@pytest.mark.parametrize("mixer", ["ttt_linear", "transformer"])
@torch.no_grad()
def test_static_cache_reorders_rows(mixer, tiny, tokens):
    """reorder_cache moves every buffer's rows and the rows' positions, in place."""
    model = tiny(mixer).to(DEV, DTYPE)
    lengths = [5, 11, 8]
    seqs = [tokens(1, n + 1, seed=30 + i)[0].to(DEV) for i, n in enumerate(lengths)]
    ids, mask = _left_padded(seqs, lengths)
    cache = _cache(model, MODES[-1])
    model(ids, attention_mask=mask.to(DEV), use_cache=True, **{CACHE_FIELD: cache})
    new = torch.stack([s[n] for s, n in zip(seqs, lengths)])[:, None]
    model(new, **{CACHE_FIELD: cache})  # makes the cache static (and captures the graph on CUDA)
    buffers = [t.data_ptr() for layer in cache.layers for t in layer.tensors()] + [cache.positions.data_ptr()]
    order = [2, 0, 1]
    cache.reorder_cache(torch.tensor(order, device=DEV))
    assert buffers == [t.data_ptr() for layer in cache.layers for t in layer.tensors()] + [cache.positions.data_ptr()]
    nxt = torch.stack([seqs[b][lengths[b]] for b in order])[:, None]
    got = model(nxt, **{CACHE_FIELD: cache}).logits
    for row, b in enumerate(order):
        alone = model(torch.cat([seqs[b], seqs[b][-1:]])[None]).logits[0, -1]
        assert (got[row, 0] - alone).abs().max().item() <= TOL, row


@torch.no_grad()
def test_attention_buffers_grow(tiny, tokens, monkeypatch):
    """Attention's static buffers grow (and the step is captured again) when the positions run out."""
    monkeypatch.setattr(decode, "CAPACITY_STEP", 4)
    model = tiny("transformer").to(DEV, DTYPE)
    ids = tokens(2, 40).to(DEV)
    cache = _cache(model, MODES[-1])
    model(ids[:, :9], use_cache=True, **{CACHE_FIELD: cache})
    logits, capacities = [], set()
    for t in range(9, 40):
        logits.append(model(ids[:, t : t + 1], **{CACHE_FIELD: cache}).logits)
        capacities.add(cache.capacity)
    assert len(capacities) > 2 and min(capacities) < 20
    assert (torch.cat(logits, 1) - model(ids).logits[:, 9:]).abs().max().item() <= TOL


@torch.no_grad()
def test_fallbacks_are_logged(tiny, tokens, caplog):
    model = tiny("mamba2")
    ids = tokens(2, 12)
    cache = _cache(model, "graph")
    model(ids[:, :9], use_cache=True, **{CACHE_FIELD: cache})
    with caplog.at_level(logging.DEBUG, logger="tttlm"):
        model(ids[:, 9:10], **{CACHE_FIELD: cache})
        model(ids[:, 10:12], **{CACHE_FIELD: cache})
    assert "decoding without a CUDA graph: the model is on cpu" in caplog.text
    assert cache.is_static and cache.decoder is None
    with pytest.raises(ValueError, match="torch.no_grad"), torch.enable_grad():
        model(ids[:, :1], **{CACHE_FIELD: cache})
    with pytest.raises(ValueError, match="rows"):
        model(ids[:1, :1], **{CACHE_FIELD: cache})
    with pytest.raises(ValueError, match="decode must be one of"):
        TTTLMCache(2, decode="fast")


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mixer", MIXERS)
@torch.no_grad()
def test_graph_bf16_small_model(mixer):
    """The "small" preset in bf16 on the GPU's own kernels, teacher-forced for 40 steps after a 100-token prompt,
    through the graph (compiled blocks, unless TTTLM_COMPILE=0) and through the uncompiled eager path: each
    against the same model's float32 eager logits, the graph no further from them than 1.5 times the eager bf16
    path's distance (or 2e-2). Both are bf16 roundings of one model, so the bound is relative: a random Mesa model
    is several times more sensitive to bf16 rounding than the others (eager bf16 vs float32: 5.9% against 0.9-1.3%
    on the CPU), and its two bf16 paths differ by more than the others' do for that reason alone. Then every
    token of greedy generate() through the graph is the eager full forward's argmax, up to bf16 near-ties."""
    torch.manual_seed(0)
    model = build_model(f"{mixer}-small").to("cuda").eval()
    model.model.norm.weight.data.mul_(20)  # peaked logits: fewer near-ties in a random model's greedy choices
    ids = torch.randint(0, model.config.vocab_size, (3, 140), device="cuda")

    def logits(mode):
        cache = _cache(model, mode)
        with fast.fast_paths(compile=False) if mode == "eager" else fast.fast_paths():
            out = [model(ids[:, :100], use_cache=True, logits_to_keep=1, **{CACHE_FIELD: cache}).logits]
            out += [model(ids[:, t : t + 1], **{CACHE_FIELD: cache}).logits for t in range(100, 140)]
        if mode == "graph":
            assert cache.decoder.graph is not None, "the step was not captured"
        return torch.cat(out, 1).float()

    with fast.fast_paths(kernels=False):
        reference = logits("eager")
    model.to(torch.bfloat16)
    err = {mode: ((logits(mode) - reference).norm() / reference.norm()).item() for mode in ("eager", "graph")}
    assert err["graph"] <= max(1.5 * err["eager"], 2e-2), err
    cache = _cache(model, "auto")
    out = model.generate(ids[:, :100], max_new_tokens=32, do_sample=False, pad_token_id=0, **{CACHE_FIELD: cache})
    assert cache.decoder.graph is not None
    full = model(out[:, :-1]).logits[:, 99:].float()  # predicts out[:, 100:]
    chosen = full.gather(-1, out[:, 100:, None])[..., 0]
    assert (full.amax(-1) - chosen).max().item() <= 2e-2 * full.abs().max().item()
