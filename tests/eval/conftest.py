"""Tiny checkpoints laid out as `tttlm train` writes them (config, weights, tokenizer.json, train.json),
untrained, over a small text corpus whose validation split holds documents of several hundred tokens."""

import json
import random

import pytest
import torch

import tttlm

WORDS = (
    "the inner loop reads each token and takes a gradient step on its own weights while the outer loop "
    "learns the keys values queries and learning rates mesa solves a regularised least squares problem"
).split()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A directory of 16 plain-text documents of 700 words each."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(16):
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(700)) + "\n")
    return root


@pytest.fixture(scope="session")
def tokenizer(corpus):
    from tttlm.data.tokenizer import train_tokenizer

    return train_tokenizer((p.read_text() for p in sorted(corpus.iterdir())), vocab_size=300)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, corpus, tokenizer):
    """checkpoint(mixer) -> the step directory of a tiny randomly initialised model of that mixer."""
    from tttlm.data.tokenizer import save_tokenizer

    root = tmp_path_factory.mktemp("runs")
    cache = tmp_path_factory.mktemp("cache")
    made = {}

    def make(mixer: str):
        if mixer not in made:
            torch.manual_seed(0)
            model = tttlm.build_model(f"{mixer}-tiny", vocab_size=tokenizer.get_vocab_size())
            path = root / f"{mixer}-run" / "step-000010"
            model.save_pretrained(path)
            save_tokenizer(tokenizer, path)
            train = {"model": f"{mixer}-tiny", "corpus": str(corpus), "val_fraction": 0.5,
                     "text_field": "text", "cache_dir": str(cache), "seq_len": 64}  # fmt: skip
            (path / "train.json").write_text(json.dumps(train))
            made[mixer] = path
        return made[mixer]

    return make


def load_json(path):
    data = json.loads(path.read_text())
    assert data["non_finite"] == 0, "a result holds NaN or inf"
    assert (path.parent / data["figure"]).stat().st_size > 1000, "the figure is missing or empty"
    return data
