"""Every shipped config reads as a TrainConfig whose model preset exists; configs/paper/ holds the TTT paper's 125M
recipe for each mixer, whose global batch splits evenly over 1, 2, 4 and 8 processes at its micro-batch."""

from pathlib import Path

import pytest

from tttlm.models import MIXERS, preset_config
from tttlm.train.config import make_config, read_toml
from tttlm.train.optim import lr_factor

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_reads(path):
    cfg = make_config(read_toml(path))
    preset_config(cfg.model, **cfg.model_overrides)
    if path.parent.name == "paper":
        micro = cfg.micro_batch_size or cfg.batch_size
        for processes in (1, 2, 4, 8):
            assert cfg.batch_size % (micro * processes) == 0, (path.name, processes)


def test_paper_recipes():
    """One 125M recipe per mixer: 0.5M tokens per step of 2048, 4800 steps, 3e-3 with 480 warm-up steps and a
    cosine to 1e-5, windows of the token stream; decay on every parameter for the TTT paper's own models."""
    paper = {p.stem: make_config(read_toml(p)) for p in CONFIGS if p.parent.name == "paper"}
    assert {preset_config(c.model).mixer for c in paper.values()} == set(MIXERS)
    for name, c in paper.items():
        assert (c.seq_len * c.batch_size, c.steps, c.lr, c.warmup_steps, c.weight_decay) == (2048 * 256, 4800,
                                                                                             3e-3, 480, 0.1)
        assert c.stream_windows and (c.beta1, c.beta2, c.grad_clip) == (0.9, 0.95, 1.0)
        assert abs(c.lr * lr_factor(c.steps - 1, c) - 1e-5) < 1e-9 and lr_factor(479, c) == 1.0
        assert c.weight_decay_all == (name in ("ttt_linear-125m", "ttt_mlp-125m", "transformer-125m")), name
    assert paper["mesa-125m"].model == "mesa-paper-125m"
