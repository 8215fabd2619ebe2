"""The compiled model equals the plain one, on the CPU with torch.compile's "aot_eager" backend (Dynamo's
tracing, the graph breaks around the ops' own kernels and AOT autograd, without code generation): losses and
gradients of plain and packed batches, compiled decoding after a compiled forward (on a dynamic and on a static
cache), and one compilation shared by every block. The generated GPU code is checked against the plain model by
benchmarks/gpu_fast_paths.py."""

import pytest
import torch
from torch._dynamo.utils import counters

from tttlm import fast
from tttlm.models import TTTLMCache

MIXERS = ["ttt_linear", "mesa", "transformer", "mamba2", "mamba"]  # TTT-MLP's layer is TTT-Linear's with another op


@pytest.fixture
def compiled_on_cpu(monkeypatch):
    monkeypatch.setattr(fast, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    with fast.fast_paths(compile=True):
        yield
    torch._dynamo.reset()


def _loss_and_grads(model, ids, **kw):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids, **kw).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mixer", MIXERS)
def test_compiled_model_equals_plain_model(mixer, tiny, tokens, monkeypatch):
    model = tiny(mixer).train()
    ids = tokens(2, 40)
    pos = torch.cat([torch.arange(n) for n in (7, 13, 2, 18, 20, 20)]).view(2, 40)  # packed documents
    plain = [_loss_and_grads(model, ids), _loss_and_grads(model, ids, position_ids=pos)]
    full = model.eval()(ids).logits.detach()
    monkeypatch.setattr(fast, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    try:
        with fast.fast_paths(compile=True):
            model.train()
            got = [_loss_and_grads(model, ids), _loss_and_grads(model, ids, position_ids=pos)]
            assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
            model.eval()
            with torch.no_grad():  # decoding (dynamic or static cache) is compiled too
                assert (model(ids).logits - full).abs().max().item() <= 1e-5
                graphs = counters["stats"]["unique_graphs"]
                for mode in ("eager", "static"):
                    cache = TTTLMCache(model.config.num_hidden_layers, decode=mode)
                    steps = [model(ids[:, :30], use_cache=True, past_key_values=cache).logits]
                    steps += [model(ids[:, i : i + 1], past_key_values=cache).logits for i in range(30, 40)]
                    assert cache.is_static == (mode == "static")
                    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-4, mode
                assert counters["stats"]["unique_graphs"] > graphs, "decoding compiled nothing"
    finally:
        torch._dynamo.reset()
    for (loss, grads), (want_loss, want_grads) in zip(got, plain, strict=True):
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(g, want_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_kernels_in_the_model_equal_plain_model(tiny, tokens, monkeypatch):
    """tttlm's GPU paths as the model calls them (the Mamba2 scan's kernels on packed documents, the fused
    loss), run on the CPU by the Triton interpreter, against the plain model."""
    model = tiny("mamba2", mamba_chunk_size=16).train()
    ids = tokens(2, 40)
    pos = torch.cat([torch.arange(n) for n in (7, 13, 2, 18, 20, 20)]).view(2, 40)
    want_loss, want = _loss_and_grads(model, ids, position_ids=pos)
    monkeypatch.setattr(fast, "KERNEL_DEVICES", ("cuda", "cpu"))
    from tttlm.ops.ssd import triton_ssd

    calls, kernels = [], triton_ssd.ssd_triton
    monkeypatch.setattr(triton_ssd, "ssd_triton", lambda *a, **k: calls.append(1) or kernels(*a, **k))
    loss, grads = _loss_and_grads(model, ids, position_ids=pos)
    assert len(calls) == model.config.num_hidden_layers, "the scan's kernels did not run"
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_blocks_share_one_compilation(tiny, tokens, compiled_on_cpu):
    ids = tokens(2, 24)
    tiny("transformer", num_hidden_layers=2).train()(ids, labels=ids).loss.backward()
    graphs = counters["stats"]["unique_graphs"]
    # another model of the same kind, deeper: every block reuses the code compiled for the first one
    tiny("transformer", num_hidden_layers=3, seed=1).train()(ids, labels=ids).loss.backward()
    assert counters["stats"]["unique_graphs"] == graphs
    # every kind of block shares that code: dynamo must keep more than its default 8 versions of it
    assert torch._dynamo.config.cache_size_limit >= fast.RECOMPILE_LIMIT


def test_setting(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("TTTLM_COMPILE", raising=False)
    assert not fast.compile_enabled(cpu) and fast.compile_enabled(cuda)
    monkeypatch.setenv("TTTLM_COMPILE", "0")
    assert not fast.compile_enabled(cuda)
    with fast.fast_paths(compile=True):
        assert fast.compile_enabled(cpu)
    assert not fast.compile_enabled(cpu)
    monkeypatch.setenv("TTTLM_COMPILE", "yes")
    with pytest.raises(ValueError, match="TTTLM_COMPILE"):
        fast.compile_enabled(cpu)
    with pytest.raises(ValueError, match="compile must be"):
        fast.configure(compile="on")
    assert not fast.kernels_enabled(cpu)
    with fast.fast_paths(kernels=False):
        assert not fast.kernels_enabled(cuda)
