"""Presets, their parameter counts, `tttlm info`, initial values, and the errors for bad names and dimensions."""

import math

import pytest
import torch
import torch.nn.functional as F

import tttlm
import tttlm.models
from tttlm.cli import main
from tttlm.models import MIXERS, NOMINAL, SIZES, count_parameters, preset_config


def test_paper_configurations():
    for mixer in ("ttt_linear", "ttt_mlp", "transformer"):
        c = preset_config(f"{mixer}-125m")
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (
            768,
            12,
            12,
            2048,
        )
        assert c.vocab_size == 32000 and c.tie_word_embeddings
        c = preset_config(f"{mixer}-1.3b")
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (
            2048,
            24,
            32,
            5504,
        )
    assert preset_config("ttt_linear-350m").ttt_base_lr == 1.0
    mlp = preset_config("ttt_mlp-760m")
    assert (mlp.ttt_base_lr, mlp.ttt_base_lr_init, mlp.mini_batch_size, mlp.ttt_backbone) == (
        0.1,
        0.01,
        16,
        "mamba",
    )


@pytest.mark.parametrize("size", list(SIZES))
def test_mixers_agree_on_parameter_count(size):
    counts = {m: count_parameters(preset_config(f"{m}-{size}")) for m in MIXERS}
    matched = [c for m, c in counts.items() if m != "mamba"]
    assert max(matched) / min(matched) <= 1.05, counts
    # Mamba keeps its own paper's depths, a few percent above TTT-Linear as in the TTT paper's comparison
    assert 1.0 <= counts["mamba"] / counts["ttt_linear"] <= 1.05, counts
    if NOMINAL[size]:
        assert 0.8 <= counts["transformer"] / NOMINAL[size] <= 1.1


# `tttlm info`'s counts (docs/fidelity.md quotes the 125M ones): every projection, bias, convolution and inner
# weight of each mixer, counted once (tied embeddings)
PARAMETERS = {
    "tiny": {"ttt_linear": 2_160_104, "ttt_mlp": 2_174_952, "mesa": 2_152_944, "transformer": 2_154_816,
             "mamba2": 2_153_648, "mamba": 2_178_880},
    "125m": {"ttt_linear": 110_424_144, "ttt_mlp": 114_589_776, "mesa": 109_392_672, "transformer": 109_529_856,
             "mamba2": 109_582_944, "mamba": 115_096_320},
}


def test_parameter_counts():
    for size, counts in PARAMETERS.items():
        assert {m: count_parameters(preset_config(f"{m}-{size}")) for m in MIXERS} == counts, size
    assert count_parameters(preset_config("mesa-paper-125m")) == 109_725_072
    # per block, the Transformer backbone's q and k projections replace the Mamba backbone's shared one and its
    # output gate, and it has neither the two q/k convolutions (weights and biases) nor the pre-convolution (and its
    # RMSNorm); Mesa's output gate (C x C) can be turned off
    C, K = 64, 4
    mamba_only = 2 * (C * K + C) + (C * K + C + C)
    assert count_parameters(preset_config("ttt_linear-tiny", ttt_backbone="transformer")) == 2_160_104 - 2 * mamba_only
    assert count_parameters(preset_config("mesa-tiny", mesa_output_gate=False)) == 2_152_944 - 2 * C * C


def test_mamba_presets_are_the_mamba_papers_models():
    """The TTT paper's Mamba baseline: Mamba's 130M / 370M / 790M / 1.4B shapes (its vocabulary aside), mixer-only
    blocks, d_state 16, expand 2, dt rank ceil(C / 16)."""
    shapes = {"125m": (768, 24), "350m": (1024, 48), "760m": (1536, 48), "1.3b": (2048, 48)}
    for size, (width, layers) in shapes.items():
        c = preset_config(f"mamba-{size}")
        assert (c.hidden_size, c.num_hidden_layers, c.mamba_d_state, c.mamba_expand) == (width, layers, 16, 2)
        assert c.mamba_dt_rank is None and c.conv_kernel == 4 and c.tie_word_embeddings
    assert preset_config("mamba2-125m").mamba_d_state == 128
    model = tttlm.build_model("mamba-tiny", vocab_size=11)
    block = model.model.layers[0]
    assert block.mlp is None and block.mixer.dt_rank == 4 and block.mixer.A_log.shape == (128, 16)
    A = -block.mixer.A_log.exp()
    assert torch.allclose(A, -torch.arange(1.0, 17.0).expand(128, 16))  # S4D-real
    dt = torch.nn.functional.softplus(block.mixer.dt_bias)
    assert 1e-3 <= dt.min() and dt.max() <= 1e-1
    # the output projection's init shrinks with the depth: 1/sqrt(fan_in) / sqrt(layers)
    assert block.mixer.out_proj.weight.abs().max() <= 128**-0.5 / len(model.model.layers) ** 0.5
    assert "model.layers.0.mixer.A_log" in model.no_weight_decay_names()


def test_mesa_paper_presets():
    """MesaNet's reference layer's choices at the paper sizes: head dim 128, no output gate, forget bias at zero;
    the SwiGLU width keeps the Transformer's parameter count."""
    for size in ("125m", "350m", "760m", "1.3b"):
        c = preset_config(f"mesa-paper-{size}")
        assert c.hidden_size // c.num_attention_heads == 128
        assert (c.mesa_output_gate, c.mesa_forget_bias_init, c.mesa_gate_cap) == (False, "zero", False)
        ratio = count_parameters(c) / count_parameters(preset_config(f"transformer-{size}"))
        assert abs(ratio - 1) <= 0.01, (size, ratio)
    assert preset_config("mesa-125m").mesa_output_gate  # the mesa presets keep theirs
    assert "mesa-paper-125m" in tttlm.models.preset_names()
    with pytest.raises(ValueError, match="no paper variant of mixer 'mamba'"):
        preset_config("mamba-paper-125m")
    with pytest.raises(ValueError, match="paper sizes"):
        preset_config("mesa-paper-tiny")


def test_mesa_options_change_the_layer(tiny, tokens):
    ids = tokens(1, 12)
    base = tiny("mesa")
    no_gate = tiny("mesa", mesa_output_gate=False, mesa_forget_bias_init="zero")
    mixer = no_gate.model.layers[0].mixer
    assert mixer.gate_proj is None and torch.equal(mixer.forget_proj.bias, torch.zeros(4))
    assert base.model.layers[0].mixer.forget_proj.bias.sigmoid().min() > 0.89
    gate = sum(p.numel() for p in base.model.layers[0].mixer.gate_proj.parameters())
    assert count_parameters(base.config) - count_parameters(no_gate.config) == gate * 2
    with torch.no_grad():
        assert torch.isfinite(no_gate(ids).logits).all()
    with pytest.raises(ValueError, match="mesa_forget_bias_init must be one of spread, zero, got 'ones'"):
        tttlm.build_model("mesa-tiny", mesa_forget_bias_init="ones")


def test_overrides_use_transformers_names():
    model = tttlm.build_model(
        "mesa-tiny",
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
        vocab_size=11,
    )
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.vocab_size) == (
        32,
        1,
        2,
        48,
        11,
    )
    assert len(model.model.layers) == 1 and model.lm_head.weight.shape == (11, 32)


@pytest.mark.parametrize(
    "name, overrides, match",
    [
        ("lstm-125m", {}, "unknown mixer 'lstm'"),
        ("ttt_linear-7b", {}, "unknown size '7b'"),
        ("ttt_linear", {}, "mixer.*size"),
        (
            "ttt_linear-tiny",
            {"num_attention_heads": 5},
            "num_attention_heads = 5 must divide hidden_size = 64",
        ),
        ("ttt_linear-tiny", {"hidden_layers": 3}, "unknown config field"),
        ("ttt_linear-tiny", {"mixer": "mesa"}, "mixer comes from the preset"),
        ("mamba2-tiny", {"mamba_headdim": 48}, "mamba_headdim = 48 must divide"),
        ("mamba2-tiny", {"mamba_ngroups": 3}, "mamba_ngroups = 3 must divide the number of SSM heads 8"),
        ("mamba-tiny", {"mamba_dt_rank": 0}, "mamba_dt_rank must be None or a positive integer, got 0"),
        ("transformer-tiny", {"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ("ttt_mlp-tiny", {"ttt_backbone": "rnn"}, "ttt_backbone"),
        ("transformer-tiny", {"hidden_size": 60, "num_attention_heads": 4}, "even head dim"),
    ],
)
def test_clear_errors(name, overrides, match):
    with pytest.raises(ValueError, match=match):
        tttlm.build_model(name, **overrides)


def test_smallest_allowed_values_build():
    """The lower ends of the checked ranges are accepted: a Mamba dt rank of 1, Mamba-2 heads of dim 1."""
    assert tttlm.build_model("mamba-tiny", mamba_dt_rank=1).model.layers[0].mixer.dt_proj.weight.shape[1] == 1
    assert tttlm.build_model("mamba2-tiny", mamba_headdim=1).model.layers[0].mixer.nheads == 128


def test_info_prints_counts_beside_nominal_sizes(capsys):
    assert main(["info", "--sizes", "125m", "1.3b"]) == 0
    out = capsys.readouterr().out
    for mixer in MIXERS:
        assert f"{mixer}-125m" in out and f"{mixer}-1.3b" in out
    line = next(x for x in out.splitlines() if x.startswith("transformer-125m"))
    assert "125M" in line and f"{count_parameters(preset_config('transformer-125m')):,}" in line
    assert main(["info", "--sizes", "huge"]) == 2


def test_initial_values_follow_the_papers():
    """TTT: inner weights normal(initializer_range), its biases, LayerNorm bias and token-scale offset zero, its
    LayerNorm weight one, its convolutions as torch's; Mesa: lambda = 1 and forget gates 1 - logspace(-1, -3)
    across heads (or 0.5 with "zero"); Mamba2: step sizes log-uniform over [1e-3, 0.1], decay rates uniform over
    [1, 16]; Mamba: delta's projection uniform in +-R^-1/2, the step sizes as Mamba2's (1024 draws each, so the
    ranges are covered)."""
    torch.manual_seed(0)
    ttt = tttlm.build_model("ttt_mlp-tiny", vocab_size=11, initializer_range=0.05).model.layers[0].mixer
    for W in (ttt.W1, ttt.W2):
        assert abs(W.std().item() - 0.05) < 0.005 and abs(W.mean().item()) < 0.005
    assert all(torch.equal(b, torch.zeros_like(b)) for b in (ttt.b1, ttt.b2, ttt.ln_bias, ttt.token_scale_offset))
    assert torch.equal(ttt.ln_weight, torch.ones_like(ttt.ln_weight))
    for t in (ttt.conv_q.weight, ttt.conv_q.bias):  # torch's Conv1d init: uniform in +-1/sqrt(width 4)
        assert t.abs().max() <= 0.5 and t.min() < -0.4 and t.max() > 0.4
    mesa = tttlm.build_model("mesa-tiny", vocab_size=11).model.layers[0].mixer
    assert torch.equal(mesa.lamb(), torch.ones(4, 16))
    torch.testing.assert_close(mesa.forget_proj.bias.sigmoid(), 1 - torch.logspace(-1, -3, 4))
    zero = tttlm.build_model("mesa-tiny", vocab_size=11, mesa_forget_bias_init="zero").model.layers[0].mixer
    assert torch.equal(zero.forget_proj.bias, torch.zeros(4))
    torch.manual_seed(0)
    mamba2 = tttlm.build_model("mamba2-tiny", vocab_size=11, hidden_size=512, num_attention_heads=8,
                               mamba_headdim=1, mamba_d_state=2).model.layers[0].mixer
    mamba = tttlm.build_model("mamba-tiny", vocab_size=11, hidden_size=512, num_attention_heads=8,
                              mamba_d_state=2).model.layers[0].mixer
    for dt in (F.softplus(mamba2.dt_bias), F.softplus(mamba.dt_bias)):
        assert dt.numel() == 1024 and 1e-3 * 0.999 <= dt.min() < 1.2e-3 and 0.08 < dt.max() <= 0.1 * 1.001
        assert 0.4 < (dt.log() < math.log(1e-2)).float().mean() < 0.6  # log-uniform: half below the middle
    A = mamba2.A_log.exp()
    assert 1 <= A.min() < 1.1 and 15.9 < A.max() <= 16 and 0.4 < (A < 8.5).float().mean() < 0.6
    bound = mamba.dt_rank**-0.5
    w = mamba.dt_proj.weight
    assert w.abs().max() <= bound and w.min() < -0.99 * bound and w.max() > 0.99 * bound
