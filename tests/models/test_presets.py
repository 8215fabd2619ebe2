"""Presets, their parameter counts, `tttlm info`, and the errors for bad names and dimensions."""

import pytest

import tttlm
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
    assert max(counts.values()) / min(counts.values()) <= 1.05, counts
    if NOMINAL[size]:
        assert 0.8 <= counts["transformer"] / NOMINAL[size] <= 1.1


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
        ("transformer-tiny", {"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ("ttt_mlp-tiny", {"ttt_backbone": "rnn"}, "ttt_backbone"),
        ("transformer-tiny", {"hidden_size": 60, "num_attention_heads": 4}, "even head dim"),
    ],
)
def test_clear_errors(name, overrides, match):
    with pytest.raises(ValueError, match=match):
        tttlm.build_model(name, **overrides)


def test_info_prints_counts_beside_nominal_sizes(capsys):
    assert main(["info", "--sizes", "125m", "1.3b"]) == 0
    out = capsys.readouterr().out
    for mixer in MIXERS:
        assert f"{mixer}-125m" in out and f"{mixer}-1.3b" in out
    line = next(x for x in out.splitlines() if x.startswith("transformer-125m"))
    assert "125M" in line and f"{count_parameters(preset_config('transformer-125m')):,}" in line
    assert main(["info", "--sizes", "huge"]) == 2
