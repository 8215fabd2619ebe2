"""Short convolution (state, resets), RoPE, the linear layer's decoding form, and the layers' op inputs."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tttlm.layers import Mamba2Mixer, SeqInfo, ShortConv, TTTMixer, rope, rope_tables
from tttlm.layers.common import FEW_ROWS, Linear
from tttlm.models import build_model, preset_config
from tttlm.models.modeling import TTTLMBlock
from tttlm.ops import mesa


def test_short_conv_matches_conv1d_and_continues_from_state():
    torch.manual_seed(0)
    conv = ShortConv(6, 4)
    conv.init_parameters(0.02)
    x = torch.randn(2, 11, 6)
    ref = torch.nn.functional.conv1d(x.transpose(1, 2), conv.weight[:, None], conv.bias, padding=3, groups=6)
    y, _ = conv(x, SeqInfo.contiguous(2, 11, 0, x.device).pos)
    torch.testing.assert_close(y, ref[..., :11].transpose(1, 2))
    y1, s = conv(x[:, :5], SeqInfo.contiguous(2, 5, 0, x.device).pos)
    y2, _ = conv(x[:, 5:], SeqInfo.contiguous(2, 6, 5, x.device).pos, s)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)


def test_short_conv_resets_at_document_starts():
    torch.manual_seed(0)
    conv = ShortConv(3, 4)
    conv.init_parameters(0.02)
    x = torch.randn(1, 10, 3)
    cu = torch.tensor([0, 2, 10])
    y, _ = conv(x, SeqInfo.packed(cu).pos)
    for a, b in ((0, 2), (2, 10)):
        alone, _ = conv(x[:, a:b], SeqInfo.contiguous(1, b - a, 0, x.device).pos)
        torch.testing.assert_close(y[:, a:b], alone)


def _compiled_linear(layer: Linear, x: torch.Tensor, grad: bool, autocast: bool = False):
    """layer(x) compiled (Dynamo's graph, run as traced), and whether that graph called F.linear."""
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    def run(x):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            return layer(x)

    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        y = torch.compile(run, backend=backend, fullgraph=True)(x)
    return y, any(n.target is F.linear or n.target is torch._C._nn.linear for g in graphs for n in g.graph.nodes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_as_a_reduction_when_decoding(dtype, bias):
    """Compiled, without gradients and at most FEW_ROWS rows, Linear sums products (no F.linear in the graph)
    and equals nn.Linear; with gradients or more rows it is nn.Linear's own call."""
    torch.manual_seed(0)
    layer = Linear(48, 40, bias=bias).to(dtype)
    x = torch.randn(FEW_ROWS, 1, 48, dtype=dtype)
    y, called = _compiled_linear(layer, x, grad=False)
    assert not called and y.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=tol, atol=tol)
    assert _compiled_linear(layer, x, grad=True)[1]
    assert _compiled_linear(layer, torch.randn(FEW_ROWS + 1, 1, 48, dtype=dtype), grad=False)[1]


def test_linear_as_a_reduction_keeps_autocasts_dtype():
    torch.manual_seed(0)
    layer = Linear(64, 32)
    x = torch.randn(1, 64)
    y, called = _compiled_linear(layer, x, grad=False, autocast=True)
    with torch.autocast("cpu", torch.bfloat16):
        ref = layer(x)
    assert not called and y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2)


def test_rope_preserves_norms_and_relative_positions():
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, 8, dtype=torch.float64).unbind(0)
    def at(x, p):
        return rope(x, rope_tables(torch.tensor([[p]]), 8))

    assert torch.allclose(at(q, 3).norm(), q.norm())
    dots = [(at(q, a + 5) * at(k, a)).sum() for a in (0, 7)]
    torch.testing.assert_close(dots[0], dots[1])
    farther = (at(q, 6) * at(k, 0)).sum()
    assert (farther - dots[0]).abs() > 1e-3  # the product does depend on the distance


@pytest.mark.parametrize("theta", [10000.0, 100.0])
def test_rope_rotates_each_pair_by_position_times_its_frequency(theta):
    """Dims i and i + D/2 form a pair turned by the angle pos * theta^(-2i/D); position 0 turns nothing."""
    D = 8
    x = torch.randn(1, 2, 3, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([[0, 3]])
    y = rope(x, rope_tables(pos, D, theta))
    torch.testing.assert_close(y[:, 0], x[:, 0])
    for i in range(D // 2):
        angle = torch.tensor(3 * theta ** (-2 * i / D), dtype=torch.float64)
        a, b = x[:, 1, :, i], x[:, 1, :, i + D // 2]
        torch.testing.assert_close(y[:, 1, :, i], a * angle.cos() - b * angle.sin(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(y[:, 1, :, i + D // 2], b * angle.cos() + a * angle.sin(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mixer", ["ttt_linear", "ttt_mlp", "mesa"])
def test_op_inputs_reproduce_the_layer(mixer):
    torch.manual_seed(0)
    layer = build_model(f"{mixer}-tiny", vocab_size=32).model.layers[0].mixer
    assert layer.op_inputs(torch.randn(1, 4, layer.o_proj.in_features))["q"].shape == (1, 4, 4, 16)
    x = torch.randn(2, 21, layer.o_proj.in_features)
    B, T, C = x.shape
    o, _ = (mesa if mixer == "mesa" else layer.op)(**layer.op_inputs(x))
    if mixer == "mesa":
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.eps) * layer.o_norm_weight
        want = layer.o_proj(o.reshape(B, T, C) * F.silu(layer.gate_proj(x)))
    else:
        want = layer.o_proj(layer.post_norm(o.reshape(B, T, C)) * F.gelu(layer.g_proj(x), approximate="tanh"))
    torch.testing.assert_close(layer(x, SeqInfo.contiguous(B, T, 0, x.device)), want)


def test_model_collects_every_layers_op_inputs():
    model = build_model("ttt_mlp-tiny", vocab_size=32).eval()
    ids = torch.randint(0, 32, (1, 12))
    captured = []
    hook = model.model.layers[1].mixer.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    model(ids)
    hook.remove()
    per_layer = model.mixer_op_inputs(ids)
    assert len(per_layer) == 2 and per_layer[1]["eta"].shape == (1, 12, 4)
    want = model.model.layers[1].mixer.op_inputs(captured[0])
    for name in ("q", "k", "v", "eta", "token_scale"):
        torch.testing.assert_close(per_layer[1][name], want[name])
    assert build_model("transformer-tiny", vocab_size=32).mixer_op_inputs(ids) == [None, None]


@pytest.mark.parametrize("mixer", ["ttt_linear", "mesa"])
def test_op_inputs_of_a_packed_row(mixer):
    """op_inputs with cu_seqlens gives the op what each document alone would: the op's output on the packed row
    is the documents' outputs side by side."""
    torch.manual_seed(0)
    layer = build_model(f"{mixer}-tiny", vocab_size=32).model.layers[0].mixer
    op = mesa if mixer == "mesa" else layer.op
    bounds = [0, 7, 20, 33]
    x = torch.randn(1, 33, 64)
    inputs = layer.op_inputs(x, torch.tensor(bounds))
    assert torch.equal(inputs["cu_seqlens"], torch.tensor(bounds))
    packed, _ = op(**inputs)
    alone = torch.cat([op(**layer.op_inputs(x[:, a:b]))[0] for a, b in zip(bounds, bounds[1:])], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_bad_layer_arguments_raise():
    with pytest.raises(ValueError, match=r"inner must be one of \['linear', 'mlp'\], got 'rnn'"):
        TTTMixer(preset_config("ttt_linear-tiny"), "rnn")
    with pytest.raises(ValueError, match="conv kernel_size must be >= 1, got 0"):
        ShortConv(8, 0)
    # a config changed after it was checked: the mixer checks what it divides
    for field, value, match in (
        ("mamba_headdim", 48, r"mamba_headdim = 48 must divide mamba_expand \* hidden_size = 128"),
        ("mamba_ngroups", 3, "mamba_ngroups = 3 must divide the number of SSM heads 8"),
    ):
        cfg = preset_config("mamba2-tiny")
        setattr(cfg, field, value)
        with pytest.raises(ValueError, match=match):
            Mamba2Mixer(cfg)
    conv = ShortConv(3, 1)  # width 1: a per-channel scale and bias, no state
    conv.init_parameters(0.02)
    x = torch.randn(2, 5, 3)
    y, state = conv(x, SeqInfo.contiguous(2, 5, 0, x.device).pos)
    torch.testing.assert_close(y, x * conv.weight[:, 0] + conv.bias)
    assert state.shape == (2, 0, 3)


@pytest.mark.parametrize("mixer", ["transformer", "ttt_linear"])
def test_rope_tables_built_once_per_batch_are_each_layers(mixer, monkeypatch):
    """The model builds RoPE's tables once per batch (`SeqInfo.rope`, TTT's positions modulo its mini-batch) and
    every layer uses them: the logits equal those of layers that build their own, in plain and packed batches."""
    torch.manual_seed(0)
    model = build_model(f"{mixer}-tiny", vocab_size=64).eval()
    ids = torch.randint(0, 64, (2, 40))
    cu = torch.tensor([0, 7, 30, 80])
    seen = []
    built = type(model.model.layers[0].mixer).rope_tables

    def counted(self, pos):
        seen.append(pos.shape)
        return built(self, pos)

    monkeypatch.setattr(type(model.model.layers[0].mixer), "rope_tables", counted)
    with torch.no_grad():
        shared = [model(ids).logits, model(ids.reshape(1, 80), cu_seqlens=cu).logits]
        assert len(seen) == 2  # once per call, not once per layer
        original = TTTLMBlock._forward

        def own_tables(self, h, info, cache=None):  # each block as if the model had built no tables
            return original(self, h, dataclasses.replace(info, rope=None), cache)

        monkeypatch.setattr(TTTLMBlock, "_forward", own_tables)
        own = [model(ids).logits, model(ids.reshape(1, 80), cu_seqlens=cu).logits]
    assert len(seen) == 2 + 2 * (1 + len(model.model.layers))  # the model's (unused), then every layer's
    for a, b in zip(shared, own, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
