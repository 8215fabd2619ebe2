"""Every shipped config reads as a TrainConfig whose model preset exists and runs unchanged on 1, 2, 4 or 8
processes (its global batch split into micro-batches of at most its micro_batch_size, checked without launching
anything); configs/paper/ holds the TTT paper's 125M recipe for each mixer."""

from pathlib import Path

import pytest

from tttlm.eval.experiment import load_spec, train_config
from tttlm.models import MIXERS, preset_config
from tttlm.train.config import make_config, read_toml, split_batch
from tttlm.train.optim import lr_factor

ROOT = Path(__file__).resolve().parents[2] / "configs"
# configs/experiments/ holds `tttlm experiment` files, not training configs: tests/eval/test_experiment.py reads them
CONFIGS = sorted(p for p in ROOT.rglob("*.toml") if p.parent.name != "experiments")
EXPERIMENTS = sorted(p for p in (ROOT / "experiments").glob("lm-*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_reads(path):
    cfg = make_config(read_toml(path))
    preset_config(cfg.model, **cfg.model_overrides)


@pytest.mark.parametrize("path", CONFIGS + EXPERIMENTS, ids=lambda p: f"{p.parent.name}/{p.name}")
@pytest.mark.parametrize("processes", [1, 2, 4, 8])
def test_config_splits_over_processes(path, processes):
    """The trainer's own split (split_batch): the same global batch on every process count, each forward pass at
    most micro_batch_size sequences."""
    cfg = train_config(load_spec(path)) if path.parent.name == "experiments" else make_config(read_toml(path))
    micro, accum = split_batch(cfg.batch_size, cfg.micro_batch_size, processes)
    assert micro * accum * processes == cfg.batch_size
    assert micro <= (cfg.micro_batch_size or cfg.batch_size)


def test_gpu_configs_keep_their_micro_batch_where_it_fits():
    """configs/gpu-*: 64 sequences, micro-batches of 16: 4 accumulation steps on 1 GPU, 1 on 4, 8 rows each on 8."""
    for path in ROOT.glob("gpu-*.toml"):
        cfg = make_config(read_toml(path))
        assert [split_batch(cfg.batch_size, cfg.micro_batch_size, n) for n in (1, 2, 4, 8)] == [
            (16, 4), (16, 2), (16, 1), (8, 1)], path.name


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
