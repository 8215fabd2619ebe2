"""Model presets "{mixer}-{size}" (and "mesa-paper-{size}") and `build_model`.

The paper sizes use the TTT authors' configurations (width x layers, heads, SwiGLU size; vocabulary 32000,
tied embeddings) for TTT-Linear, TTT-MLP and the Transformer++; Mamba2 and Mesa keep width, depth and heads
and get the SwiGLU size that brings their parameter count to the Transformer's at that size (Mamba2's mixer
and Mesa's output gate hold more parameters than attention). Mamba is the TTT paper's Mamba baseline: the
Mamba paper's own models at these widths (twice the layers, no MLP, d_state 16, expand 2), which hold about 4%
more parameters than TTT-Linear at each size, as in the TTT paper (its "1.3B" Mamba is Mamba-1.4B).
"mesa-paper-{size}" is Mesa with MesaNet's reference layer's choices: head dim 128, no output gate, forget-gate
biases at zero; its SwiGLU size is solved like Mesa's. "tiny" and "small" are for tests and short runs.
"""

from __future__ import annotations

import functools

import torch

from tttlm.models.config import MIXERS, TTTLMConfig

SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192),
    "small": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, intermediate_size=704),
    "125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048),
    "350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=2736),
    "760m": dict(hidden_size=1536, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, intermediate_size=5504),
}
NOMINAL = {"tiny": None, "small": None, "125m": 125e6, "350m": 350e6, "760m": 760e6, "1.3b": 1.3e9}
# Mamba2's SSM sizes (the Mamba-2 paper's d_state 128, head dim 64) shrink with the small presets
_MAMBA = {"tiny": dict(mamba_d_state=16, mamba_headdim=16), "small": dict(mamba_d_state=64, mamba_headdim=32)}
_MATCHED = ("mamba2", "mesa")  # mixers whose SwiGLU size is solved for the Transformer's parameter count
_ROUND = 16
# MesaNet's reference layer (flash-linear-attention's MesaNet, by the paper's authors): head dim 128, no output
# gate, the forget gate's bias left at zero by the generic init; see docs/fidelity.md
MESA_PAPER_HEAD_DIM = 128
PAPER_VARIANTS = {"mesa": dict(mesa_output_gate=False, mesa_forget_bias_init="zero")}
PAPER_SIZES = ("small", "125m", "350m", "760m", "1.3b")  # widths that hold whole heads of 128


def preset_names() -> list[str]:
    names = [f"{m}-{s}" for s in SIZES for m in MIXERS]
    return names + [f"{m}-paper-{s}" for m in PAPER_VARIANTS for s in PAPER_SIZES]


def _split(name: str) -> tuple[str, str, bool]:
    """(mixer, size, paper variant) of a preset name."""
    if not isinstance(name, str) or "-" not in name:
        raise ValueError(f"a preset name is '{{mixer}}-{{size}}', e.g. 'ttt_linear-125m'; got {name!r}")
    mixer, size = name.split("-", 1)
    if mixer not in MIXERS:
        raise ValueError(f"unknown mixer {mixer!r} in preset {name!r}; mixers: {', '.join(MIXERS)}")
    paper = size.startswith("paper-")
    if paper:
        size = size.removeprefix("paper-")
        if mixer not in PAPER_VARIANTS:
            raise ValueError(f"no paper variant of mixer {mixer!r} (preset {name!r}); "
                             f"'{{mixer}}-paper-{{size}}' exists for {', '.join(PAPER_VARIANTS)}")
        if size not in PAPER_SIZES:
            raise ValueError(f"unknown size {size!r} in preset {name!r}; paper sizes: {', '.join(PAPER_SIZES)}")
    elif size not in SIZES:
        raise ValueError(f"unknown size {size!r} in preset {name!r}; sizes: {', '.join(SIZES)}")
    return mixer, size, paper


def _base(mixer: str, size: str, paper: bool) -> dict:
    """The preset's config fields before the SwiGLU size is solved."""
    kw = dict(SIZES[size])
    if mixer == "mamba2":
        kw.update(_MAMBA.get(size, {}))
    if mixer == "mamba":  # Mamba's own models: twice the blocks, each the mixer alone
        kw["num_hidden_layers"] *= 2
    if paper:
        kw.update(PAPER_VARIANTS[mixer], num_attention_heads=kw["hidden_size"] // MESA_PAPER_HEAD_DIM)
    return kw


def count_parameters(config: TTTLMConfig) -> int:
    """Parameters of the model `config` describes (tied embeddings counted once), built on the meta device."""
    from tttlm.models.modeling import TTTLMForCausalLM

    with torch.device("meta"):
        model = TTTLMForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


@functools.cache
def _matched_intermediate(mixer: str, size: str, paper: bool) -> int:
    base = _base(mixer, size, paper)
    target = count_parameters(TTTLMConfig(mixer="transformer", **SIZES[size]))
    own = count_parameters(TTTLMConfig(mixer=mixer, **base))
    per_unit = 3 * base["hidden_size"] * base["num_hidden_layers"]  # SwiGLU: gate, up, down
    inter = base["intermediate_size"] + (target - own) / per_unit
    return max(_ROUND, int(round(inter / _ROUND)) * _ROUND)


def preset_config(name: str, **overrides) -> TTTLMConfig:
    """The TTTLMConfig of preset `name`, with overrides (config field names, e.g. hidden_size=512)."""
    mixer, size, paper = _split(name)
    fields = set(TTTLMConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown config field(s) {', '.join(unknown)}; e.g. hidden_size, num_hidden_layers, "
            f"num_attention_heads, intermediate_size, vocab_size"
        )
    if "mixer" in overrides:
        raise ValueError("the mixer comes from the preset name; choose another preset instead of overriding it")
    kw = _base(mixer, size, paper)
    if mixer in _MATCHED:
        kw["intermediate_size"] = _matched_intermediate(mixer, size, paper)
    kw.update(overrides)
    return TTTLMConfig(mixer=mixer, **kw)


def build_model(name: str, **overrides):
    """A TTTLMForCausalLM from preset "{mixer}-{size}" (mixers ttt_linear, ttt_mlp, mesa, transformer, mamba2,
    mamba; sizes tiny, small, 125m, 350m, 760m, 1.3b) or "mesa-paper-{size}" (small to 1.3b), randomly
    initialised. Overrides are config fields."""
    from tttlm.models.modeling import TTTLMForCausalLM

    return TTTLMForCausalLM(preset_config(name, **overrides))
