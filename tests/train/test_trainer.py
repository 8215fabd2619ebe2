"""The trainer on a tiny TTT-Linear and a synthetic corpus: learning, checkpoints, exact resume after SIGKILL,
and 2 processes (gloo, DDP) equal to 1 with the same global batch."""

import signal
import time

import pytest
import torch

from tttlm.train.checkpoint import checkpoints, load_pretrained
from tttlm.train.config import make_config
from tttlm.train.metrics import read_metrics
from tttlm.train.trainer import train


def test_training_learns_saves_and_loads(tmp_path, text_dir, cache_dir, runs):
    cfg = make_config(runs.settings(text_dir, cache_dir, tmp_path / "run"))
    result = train(cfg, log=lambda *_: None)
    loss = runs.losses(tmp_path / "run")
    assert sorted(loss) == list(range(1, 9)) and loss[8] < loss[1] - 0.3
    assert result["val_loss"] < result["unigram_val_loss"] + 1.0
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["step-000006", "step-000008"]  # keep_last=2

    from transformers import AutoModelForCausalLM

    import tttlm.models  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "step-000008"))
    again, _, saved = load_pretrained(tmp_path / "run")
    assert saved["steps"] == 8
    for (n, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(Exception, match="already holds checkpoints"):
        train(cfg)


def test_eval_and_generate_commands_read_the_checkpoint(tmp_path, text_dir, cache_dir, capsys, runs):
    from tttlm.cli import main

    result = train(make_config(runs.settings(text_dir, cache_dir, tmp_path / "run", steps=2, eval_every=2)),
                   log=lambda *_: None)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--batch-size", "4", "--eval-batches", "2", "--cache-dir",
                 str(cache_dir)]) == 0
    out = capsys.readouterr().out
    printed = float(out.split("validation loss ")[1].split()[0])
    assert abs(printed - result["val_loss"]) < 1e-3, out
    assert main(["generate", str(tmp_path / "run"), "--prompt", "def value", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("def value")


def test_weight_decay_skips_norms_biases_and_inner_initial_weights():
    from tttlm.models import build_model
    from tttlm.train.optim import param_groups

    model = build_model("ttt_linear-tiny", vocab_size=300)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]}
    assert {"W0", "b0", "weight"} <= skipped and decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0
    assert all(p.dim() == 2 for p in decay["params"])
    assert not any(names[id(p)].endswith(("W0", "norm.weight")) for p in decay["params"])


def test_weight_decay_all_decays_every_parameter():
    """The TTT authors' set (weight_decay_all): one decayed group holding every parameter, inner ones included."""
    from tttlm.models import build_model
    from tttlm.train.optim import make_optimizer

    model = build_model("ttt_linear-tiny", vocab_size=300)
    n = len(list(model.parameters()))
    default, _ = make_optimizer(model, make_config(model="ttt_linear-tiny"))
    authors, _ = make_optimizer(model, make_config(model="ttt_linear-tiny", weight_decay_all=True))
    assert 0 < len(default.param_groups[0]["params"]) < n
    assert [len(g["params"]) for g in authors.param_groups] == [n, 0]
    assert authors.param_groups[0]["weight_decay"] == 0.1


def test_stream_windows_and_weight_decay_all_from_the_command_line(tmp_path, text_dir, cache_dir, runs):
    """--stream-windows trains and validates on windows without document resets: every token but a window's last
    is a target (the default run has fewer, a document start in a window has none before it)."""
    from tttlm.cli import main

    s = runs.settings(text_dir, cache_dir, tmp_path / "run", steps=2, eval_every=2, save_every=2, seq_len=128)
    runs.toml(tmp_path / "run.toml", s)
    assert main(["train", "--config", str(tmp_path / "run.toml"), "--stream-windows", "--weight-decay-all"]) == 0
    saved = load_pretrained(tmp_path / "run")[2]
    assert saved["stream_windows"] and saved["weight_decay_all"]
    val = [r for r in read_metrics(tmp_path / "run") if "val_tokens" in r][-1]
    assert val["val_tokens"] == s["eval_batches"] * s["batch_size"] * (s["seq_len"] - 1)
    reset = train(make_config(runs.settings(text_dir, cache_dir, tmp_path / "reset", steps=1, eval_every=1,
                                            seq_len=128)), log=lambda *_: None)
    assert reset["val_tokens"] < val["val_tokens"]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, text_dir, cache_dir, runs):
    s = runs.settings(text_dir, cache_dir, tmp_path / "full", steps=16, save_every=4, eval_every=8)
    full = runs.toml(tmp_path / "full.toml", s)
    runs.finish(runs.cli("--config", str(full)))
    killed = runs.toml(tmp_path / "killed.toml", {**s, "out_dir": str(tmp_path / "killed")})
    proc = runs.cli("--config", str(killed))
    deadline = time.time() + 180
    while not (tmp_path / "killed" / "step-000004").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "step-000016").exists()  # it really died mid-run
    runs.finish(runs.cli("--config", str(killed), "--resume"))
    a, b = runs.losses(tmp_path / "full"), runs.losses(tmp_path / "killed")
    assert sorted(b) == list(range(1, 17))
    assert a == b  # bitwise: weights, optimizer, scheduler, data position and RNG all restored
    va = [r["val_loss"] for r in read_metrics(tmp_path / "full") if "val_loss" in r]
    vb = [r["val_loss"] for r in read_metrics(tmp_path / "killed") if "val_loss" in r]
    assert va == vb and len(va) == 2


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, text_dir, cache_dir, runs):
    """A 6-step run in one process: global batch 4 as 2 accumulation steps of 2 sequences."""
    tmp = tmp_path_factory.mktemp("one")
    s = runs.settings(text_dir, cache_dir, tmp / "run", steps=6, save_every=6, eval_every=6)
    runs.finish(runs.cli("--config", str(runs.toml(tmp / "one.toml", s))))
    return s


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_equal_one_with_the_same_global_batch(tmp_path, one_process_run, parallel, runs):
    s = {**one_process_run, "out_dir": str(tmp_path / "two"), "parallel": parallel}
    runs.finish(runs.cli("--config", str(runs.toml(tmp_path / "two.toml", s)), nproc=2))
    a, b = runs.losses(one_process_run["out_dir"]), runs.losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    assert a[6] < a[1]
    va = [r["val_loss"] for r in read_metrics(one_process_run["out_dir"]) if "val_loss" in r]
    vb = [r["val_loss"] for r in read_metrics(tmp_path / "two") if "val_loss" in r]
    assert abs(va[-1] - vb[-1]) < 1e-5


def test_inner_learning_rate_warms_up_with_the_outer_one(tmp_path, text_dir, cache_dir, monkeypatch, runs):
    from tttlm.models import TTTLMForCausalLM

    seen = []
    original = TTTLMForCausalLM.set_inner_lr_warmup
    monkeypatch.setattr(TTTLMForCausalLM, "set_inner_lr_warmup",
                        lambda self, p: seen.append(round(p, 6)) or original(self, p))
    s = runs.settings(text_dir, cache_dir, tmp_path / "run", model="ttt_mlp-tiny", steps=4, warmup_steps=3,
                 eval_every=4, save_every=4)
    train(make_config(s), log=lambda *_: None)
    assert seen == [round(1 / 3, 6), round(2 / 3, 6), 1.0, 1.0]


def test_activation_checkpointing_changes_memory_not_results(tmp_path, text_dir, cache_dir, runs):
    results = {}
    for flag in (False, True):
        s = runs.settings(text_dir, cache_dir, tmp_path / str(flag), steps=3, eval_every=3, save_every=3,
                          activation_checkpointing=flag, model_overrides={**runs.TINY, "num_hidden_layers": 2})
        train(make_config(s), log=lambda *_: None)
        results[flag] = runs.losses(tmp_path / str(flag))
    assert results[True] == results[False]
