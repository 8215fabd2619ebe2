"""What a user sets on `tttlm train` beyond the model: the run's length in tokens, the schedule, fine-tuning from a
checkpoint, a separate validation corpus, the log a scheduler captures, Weights & Biases, and `tttlm eval`
scoring the tokens the training validated on."""

import itertools
import json
import math
import re
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tttlm.cli import main
from tttlm.errors import UserError
from tttlm.train.checkpoint import load_pretrained
from tttlm.train.config import make_config, split_batch
from tttlm.train.metrics import read_metrics
from tttlm.train.optim import lr_factor
from tttlm.train.trainer import train


def cli(argv, capsys):
    """(exit status, stdout, stderr) of `tttlm ARGV` in this process."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_scores_the_tokens_of_training_s_last_validation(tmp_path, text_dir, cache_dir, runs, capsys):
    """No flags: the same corpus split, sequence length, batch (4 as micro-batches of 2) and number of batches."""
    s = runs.settings(text_dir, cache_dir, tmp_path / "run", steps=2, eval_every=2, save_every=2, eval_batches=3)
    result = train(make_config(s), log=lambda *_: None)
    code, out, _ = cli(["eval", tmp_path / "run", "--out-dir", tmp_path / "eval"], capsys)
    assert code == 0 and f"validation loss {result['val_loss']:.4f} nats/token" in out, out
    scored = json.loads((tmp_path / "eval" / "eval.json").read_text())["checkpoints"]["run/step-000002"]
    assert scored["val_tokens"] == result["val_tokens"] and scored["val_loss"] == pytest.approx(result["val_loss"],
                                                                                                abs=1e-6)
    assert (scored["batch_size"], scored["eval_batches"], scored["seq_len"]) == (4, 3, 32)
    code, out, _ = cli(["eval", tmp_path / "run", "--eval-batches", "1", "--micro-batch-size", "4"], capsys)
    fewer = float(out.split("validation loss ")[1].split()[0])
    assert code == 0 and fewer != pytest.approx(result["val_loss"], abs=1e-4)


def test_tokens_set_the_length_of_the_run(tmp_path, text_dir, cache_dir, runs, capsys):
    """--tokens 600 at 4 x 32 tokens per step: ceil(600 / 128) = 5 steps, over the config's steps."""
    s = runs.settings(text_dir, cache_dir, tmp_path / "run", steps=100, eval_every=5, save_every=5)
    code, out, err = cli(["train", "--config", runs.toml(tmp_path / "run.toml", s), "--tokens", "600"], capsys)
    assert code == 0, err
    assert max(r["step"] for r in read_metrics(tmp_path / "run")) == 5 and "600 tokens asked for" in out
    saved = load_pretrained(tmp_path / "run")[2]
    assert (saved["steps"], saved["tokens"]) == (5, 600)


def test_steps_and_tokens_precedence():
    assert make_config({"tokens": 1000, "batch_size": 4, "seq_len": 32}).steps == 8
    assert make_config({"tokens": 1000}, steps=3).steps == 3  # the flag wins over the file
    assert make_config({"steps": 3}, tokens=1000, batch_size=4, seq_len=32).steps == 8
    for both in ({"steps": 3, "tokens": 1000}, {}):
        with pytest.raises(UserError, match="steps or as tokens, not both"):
            make_config(both, **({} if both else {"steps": 3, "tokens": 1000}))


def test_warmup_stable_decay_schedule():
    """WSD: the warm-up, the peak until the last decay_fraction of the steps, then a line to min_lr_ratio."""
    cfg = make_config(steps=20, warmup_steps=4, schedule="wsd", decay_fraction=0.25, min_lr_ratio=0.1)
    want = {0: 0.25, 3: 1.0, 4: 1.0, 14: 1.0, 15: 1.0, 16: 1 - 0.9 / 5, 18: 1 - 2.7 / 5, 20: 0.1, 25: 0.1}
    for step, f in want.items():
        assert lr_factor(step, cfg) == pytest.approx(f, abs=1e-12), step
    short = make_config(steps=10, warmup_steps=8, schedule="wsd", decay_fraction=0.5)  # decay starts after warm-up
    assert [round(lr_factor(s, short), 6) for s in (7, 8, 9, 10)] == [1.0, 1.0, 0.55, 0.1]
    with pytest.raises(UserError, match="schedule must be one of cosine, wsd"):
        make_config(schedule="linear")


def test_schedule_from_the_command_line(tmp_path, text_dir, cache_dir, runs, capsys):
    """A run's logged learning rates hold the peak through the stable phase with --schedule wsd, where the cosine
    has long started to fall."""
    s = runs.settings(text_dir, cache_dir, tmp_path / "wsd", steps=10, warmup_steps=2, eval_every=10, save_every=10,
                      decay_fraction=0.3)
    lrs = {}
    for schedule in ("wsd", "cosine"):
        out = tmp_path / schedule
        config = runs.toml(tmp_path / f"{schedule}.toml", {**s, "out_dir": str(out)})
        assert cli(["train", "--config", config, "--schedule", schedule], capsys)[0] == 0
        lrs[schedule] = {r["step"]: r["lr"] for r in read_metrics(out) if "lr" in r}
    assert all(lrs["wsd"][step] == pytest.approx(s["lr"]) for step in range(2, 8))
    assert lrs["cosine"][6] < 0.8 * s["lr"] and lrs["wsd"][10] < 0.75 * s["lr"]


def test_init_from_fine_tunes_a_checkpoint(tmp_path, text_dir, cache_dir, runs, capsys):
    """--init-from starts a new run (step 1, a new optimizer) from the checkpoint's weights, architecture and
    tokenizer: one step at lr 1e-9 leaves the weights where the checkpoint had them."""
    base = runs.settings(text_dir, cache_dir, tmp_path / "base", steps=3, eval_every=3, save_every=3)
    train(make_config(base), log=lambda *_: None)
    tune = {**base, "out_dir": str(tmp_path / "tune"), "steps": 1, "lr": 1e-9, "warmup_steps": 0, "weight_decay": 0.0,
            "vocab_size": 999}  # the checkpoint's tokenizer wins over a vocabulary to train one
    code, out, err = cli(["train", "--config", runs.toml(tmp_path / "tune.toml", tune), "--init-from",
                          tmp_path / "base"], capsys)
    assert code == 0, err
    assert f"weights from {tmp_path / 'base' / 'step-000003'}" in out
    before = load_file(tmp_path / "base" / "step-000003" / "model.safetensors")
    after = load_file(tmp_path / "tune" / "step-000001" / "model.safetensors")
    assert before.keys() == after.keys()
    assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-6
    fresh = train(make_config({**base, "out_dir": str(tmp_path / "fresh"), "steps": 1, "lr": 1e-9, "eval_every": 1,
                               "save_every": 1}), log=lambda *_: None)
    new = load_file(tmp_path / "fresh" / "step-000001" / "model.safetensors")
    assert max((before[k] - new[k]).abs().max().item() for k in before) > 1e-2, fresh
    saved = json.loads((tmp_path / "tune" / "step-000001" / "train.json").read_text())
    assert saved["init_from"] == str(tmp_path / "base" / "step-000003") and saved["model"] == base["model"]
    assert (tmp_path / "tune" / "step-000001" / "tokenizer.json").read_text() == \
        (tmp_path / "base" / "step-000003" / "tokenizer.json").read_text()
    state = torch.load(tmp_path / "tune" / "step-000001" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 1
    code, _, err = cli(["train", "--config", runs.toml(tmp_path / "tune.toml", tune), "--init-from",
                        tmp_path / "base", "--out-dir", tmp_path / "other", "--set", "num_hidden_layers=3"], capsys)
    assert code == 2 and "keeps its architecture" in err


def test_a_separate_validation_corpus(tmp_path, text_dir, cache_dir, runs, capsys):
    """--val-corpus: every document of the corpus trains, every one of the validation corpus validates; eval and
    positions default to it."""
    val = tmp_path / "val"
    val.mkdir()
    for i in range(3):
        (val / f"v{i}.py").write_text("\n".join(f"def g{i}_{j}(y):\n    return y - {j}" for j in range(60)) + "\n")
    s = runs.settings(text_dir, cache_dir, tmp_path / "run", steps=2, eval_every=2, save_every=2,
                      val_corpus=str(val), eval_batches=2)
    result = train(make_config(s), log=lambda *_: None)
    code, out, _ = cli(["data", "--corpus", text_dir, "--val-corpus", val, "--vocab-size", 300,
                        "--cache-dir", cache_dir], capsys)
    docs = sum(1 for p in text_dir.rglob("*") if p.is_file())
    assert code == 0 and f"validation corpus {val}: 3 file(s)" in out
    assert re.search(rf"train +{docs} documents", out) and re.search(r"val +3 documents", out), out
    code, out, _ = cli(["eval", tmp_path / "run"], capsys)
    assert code == 0 and f"validation loss {result['val_loss']:.4f}" in out and f"tokens of {val}" in out


def test_plain_log_lines_off_a_terminal(tmp_path, text_dir, cache_dir, runs, capsys, monkeypatch):
    """Stdout and stderr are not terminals here (pytest captures them): no progress bar, no carriage return; a
    line every --log-every steps with the model FLOPs utilisation (a peak stands in for the GPU's) and every
    validation; --no-progress changes nothing there."""
    import tttlm.eval.throughput as throughput

    monkeypatch.setattr(throughput, "peak_matmul_flops", lambda device: 1e9)
    s = runs.settings(text_dir, cache_dir, tmp_path / "run", steps=4, log_every=2, eval_every=2, save_every=4,
                      progress=True, warmup_steps=1)
    config = runs.toml(tmp_path / "run.toml", s)
    code, out, err = cli(["train", "--config", config], capsys)
    assert code == 0 and "\r" not in out + err, (out, err)
    lines = [line for line in out.splitlines() if re.match(r"step \d+(/4)?: (loss|validation loss) ", line)]
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 2", "step 4/4", "step 4"], out
    assert lines[0].startswith("step 2/4: loss ") and ", MFU " in lines[0] and "tokens/s" in lines[0]
    assert lines[1].startswith("step 2: validation loss ")
    records = [r for r in read_metrics(tmp_path / "run") if "mfu" in r]
    n_params = sum(p.numel() for p in load_pretrained(tmp_path / "run")[0].parameters())
    assert len(records) == 2 and all(r["mfu"] == pytest.approx(r["tokens_per_s"] * 6 * n_params / 1e9)
                                     for r in records)
    config = runs.toml(tmp_path / "quiet.toml", {**s, "out_dir": str(tmp_path / "quiet")})
    _, quiet, _ = cli(["train", "--config", config, "--no-progress"], capsys)
    quiet_lines = [line for line in quiet.splitlines() if re.match(r"step \d+(/4)?: (loss|validation loss) ", line)]
    assert [line.split(":")[0] for line in quiet_lines] == ["step 2/4", "step 2", "step 4/4", "step 4"], quiet


@pytest.mark.parametrize("progress", [True, False])
def test_on_a_terminal(tmp_path, text_dir, cache_dir, runs, capsys, monkeypatch, progress):
    """On a terminal a progress bar, and the validations above it; --no-progress: the plain lines there too."""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    s = runs.settings(text_dir, cache_dir, tmp_path / "run", steps=4, log_every=2, eval_every=2, save_every=4,
                      progress=progress)
    code, out, err = cli(["train", "--config", runs.toml(tmp_path / "run.toml", s)], capsys)
    assert code == 0 and ("\r" in err) == progress
    assert out.count(": validation loss ") == 2 and (out.count("/4: loss ") == 2) != progress, out


def test_a_warm_up_as_long_as_the_run_is_warned_about(tmp_path, text_dir, cache_dir, runs, capsys):
    s = runs.settings(text_dir, cache_dir, tmp_path / "run", steps=4, warmup_steps=4, eval_every=4, save_every=4)
    code, out, _ = cli(["train", "--config", runs.toml(tmp_path / "run.toml", s)], capsys)
    assert code == 0 and "warning: warmup_steps (4) >= steps (4): the learning rate never reaches its peak" in out
    assert not make_config(steps=5, warmup_steps=4).warnings()


class FakeWandb:
    """Stands in for the wandb package where it is not installed: records init and log calls."""

    def __init__(self):
        self.runs = []
        self.util = SimpleNamespace(generate_id=lambda: f"id{len(self.runs)}")

    def init(self, **kwargs):
        run = SimpleNamespace(kwargs=kwargs, logged=[], finished=False)
        run.log = lambda data, step: run.logged.append((step, data))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run


def test_weights_and_biases_gets_every_record(tmp_path, text_dir, cache_dir, runs, capsys, monkeypatch):
    """--wandb: every metrics.jsonl record goes to W&B too, at its step; a resumed run continues the same W&B run.
    The real package in offline mode where installed, else a stand-in."""
    try:
        import wandb  # noqa: F401

        monkeypatch.setenv("WANDB_MODE", "offline")
        fake = None
    except ImportError:
        fake = FakeWandb()
        monkeypatch.setitem(sys.modules, "wandb", fake)
    s = runs.settings(text_dir, cache_dir, tmp_path / "run", steps=2, eval_every=2, save_every=2, wandb=True,
                      wandb_project="tests")
    config = runs.toml(tmp_path / "run.toml", s)
    assert cli(["train", "--config", config], capsys)[0] == 0
    assert (tmp_path / "run" / "wandb").is_dir() or fake is not None
    if fake is None:
        return
    run = fake.runs[0]
    assert run.kwargs["project"] == "tests" and run.kwargs["name"] == "run" and run.finished
    records = read_metrics(tmp_path / "run")
    assert [step for step, _ in run.logged] == [r["step"] for r in records]
    for (_, logged), record in zip(run.logged, records, strict=True):
        assert logged == {k: v for k, v in record.items() if k != "step"}
    assert cli(["train", "--config", config, "--steps", "3", "--resume"], capsys)[0] == 0
    assert fake.runs[1].kwargs["id"] == run.kwargs["id"] and [s for s, _ in fake.runs[1].logged] == [3, 3]
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    code, _, err = cli(["train", "--config", config, "--out-dir", tmp_path / "none"], capsys)
    assert code == 2 and "pip install wandb" in err


@pytest.mark.parametrize("batch, micro, processes, want", [(64, 16, 1, (16, 4)), (64, 16, 8, (8, 1)),
                                                            (24, 16, 1, (12, 2)), (256, 4, 8, (4, 8)),
                                                            (16, None, 2, (8, 1)), (6, 4, 1, (3, 2))])
def test_split_batch(batch, micro, processes, want):
    assert split_batch(batch, micro, processes) == want
    got_micro, accum = want
    assert got_micro * accum * processes == batch and got_micro <= (micro or math.inf)


def test_logged_throughput_counts_the_training_steps_since_the_last_log(tmp_path, text_dir, cache_dir, runs,
                                                                        monkeypatch):
    """tokens/s = the tokens of the steps since the last log over those steps' seconds, read from a clock that
    advances 1 s per reading: every step takes 1 s, so 4 x 32 tokens per step make 128 tokens/s at any log
    interval."""
    from tttlm.train import trainer

    clock = itertools.count()
    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    s = runs.settings(text_dir, cache_dir, tmp_path / "run", steps=6, log_every=2, eval_every=6, save_every=6)
    train(make_config(s), log=lambda *_: None)
    assert [r["tokens_per_s"] for r in read_metrics(tmp_path / "run") if "tokens_per_s" in r] == [128.0] * 3


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path, text_dir, cache_dir, runs):
    """A run that logged steps 3 and 4 but died before saving step 4, resumed from step 2: TensorBoard shows each
    step once (the resumed run's event file purges the steps after its checkpoint), as metrics.jsonl does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    s = runs.settings(text_dir, cache_dir, tmp_path / "run", steps=4, save_every=2, eval_every=4, tensorboard=True)
    train(make_config(s), log=lambda *_: None)
    shutil.rmtree(tmp_path / "run" / "step-000004")
    train(make_config(s), resume=True, log=lambda *_: None)
    shown = EventAccumulator(str(tmp_path / "run" / "tb"))
    shown.Reload()
    assert [e.step for e in shown.Scalars("loss")] == [1, 2, 3, 4]
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize("name, value", [("steps", 0), ("seq_len", 2.5), ("keep_last", True), ("micro_batch_size", -1)])
def test_settings_out_of_range_are_named(tmp_path, text_dir, cache_dir, runs, name, value):
    s = runs.settings(text_dir, cache_dir, tmp_path / "run", **{name: value})
    with pytest.raises(UserError, match=re.escape(f"{name} must be a positive integer, got {value!r}")):
        make_config(s).check()


def test_split_batch_refuses_an_uneven_split():
    with pytest.raises(UserError, match="batch size 12 must be a multiple of the number of processes \\(8\\)"):
        split_batch(12, 4, 8)
