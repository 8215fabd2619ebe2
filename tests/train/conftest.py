import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tttlm.train.metrics import read_metrics

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
        "mini_batch_size": 8}


@pytest.fixture(scope="module")
def text_dir(shared_text_dir):
    # the training tests only read the corpus, so one copy per module saves tokenizing it for every test
    return shared_text_dir


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A token cache shared by the tests of a module (the corpus is tokenized once)."""
    return tmp_path_factory.mktemp("cache")


def settings(corpus, cache, out, **kw):
    """The settings of a tiny TTT-Linear run on the CPU: 8 steps of 4 x 32 tokens, saving every 2."""
    s = dict(model="ttt_linear-tiny", model_overrides=TINY, corpus=str(corpus), vocab_size=300, val_fraction=0.2,
             cache_dir=str(cache), seq_len=32, batch_size=4, micro_batch_size=2, steps=8, lr=1e-2, warmup_steps=2,
             log_every=1, eval_every=4, eval_batches=2, save_every=2, keep_last=2, tensorboard=False,
             progress=False, out_dir=str(out), device="cpu")
    s.update(kw)
    return s


def toml(path, s):
    """Writes the settings s as a TOML config file at path; returns path."""
    lines = []
    for k, v in s.items():
        if k != "model_overrides":
            lines.append(f"{k} = {v!r}".replace("True", "true").replace("False", "false").replace("'", '"'))
    lines.append("[model_overrides]")
    lines += [f"{k} = {v}" for k, v in s["model_overrides"].items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(*args, nproc=1, **popen):
    """`tttlm train ARGS` in a subprocess (under torchrun with nproc > 1), its output in proc.stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    pre = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 \
        else [sys.executable]
    return subprocess.Popen([*pre, "-m", "tttlm", "train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc):
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    return out


def losses(out_dir):
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}


@pytest.fixture(scope="session")
def runs():
    """The helpers of the trainer tests: settings, toml, cli, finish, losses (see each one's docstring)."""
    return SimpleNamespace(TINY=TINY, settings=settings, toml=toml, cli=cli, finish=finish, losses=losses)
