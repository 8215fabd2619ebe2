"""The trainer on a tiny TTT-Linear and a synthetic corpus: learning, checkpoints, exact resume after SIGKILL,
and 2 processes (gloo, DDP) equal to 1 with the same global batch."""

import math
import shutil
import signal
import time

import pytest
import torch

from tttlm.data.tokenizer import EOS
from tttlm.train.checkpoint import checkpoints, load_pretrained
from tttlm.train.config import make_config
from tttlm.train.metrics import read_metrics
from tttlm.train.optim import lr_factor, warmup_progress
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
    again, tokenizer, saved = load_pretrained(tmp_path / "run")
    eos = tokenizer.token_to_id(EOS)  # the documents' separator starts and ends every generation
    assert model.config.eos_token_id == model.config.bos_token_id == eos
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
    """A 6-step run in one process: global batch 4 as 2 accumulation steps of 2 sequences, saved at steps 3 and 6."""
    tmp = tmp_path_factory.mktemp("one")
    s = runs.settings(text_dir, cache_dir, tmp / "run", steps=6, save_every=3, eval_every=6)
    runs.finish(runs.cli("--config", str(runs.toml(tmp / "one.toml", s))))
    return s


def two_process_run(tmp, one_process_run, runs, parallel):
    """one_process_run's settings run by 2 gloo processes (`parallel`: "ddp" or "fsdp") in tmp/two: its directory."""
    s = {**one_process_run, "out_dir": str(tmp / "two"), "parallel": parallel}
    runs.finish(runs.cli("--config", str(runs.toml(tmp / "two.toml", s)), nproc=2))
    return tmp / "two"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, one_process_run, runs):
    return two_process_run(tmp_path_factory.mktemp("ddp"), one_process_run, runs, "ddp")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_equal_one_with_the_same_global_batch(tmp_path, one_process_run, parallel, runs, request):
    two = request.getfixturevalue("ddp_run") if parallel == "ddp" else \
        two_process_run(tmp_path, one_process_run, runs, parallel)
    a, b = runs.losses(one_process_run["out_dir"]), runs.losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    assert a[6] < a[1]
    va = [r["val_loss"] for r in read_metrics(one_process_run["out_dir"]) if "val_loss" in r]
    vb = [r["val_loss"] for r in read_metrics(two) if "val_loss" in r]
    assert abs(va[-1] - vb[-1]) < 1e-5


def _resume_from(run, step: int, copy):
    """A copy of the run directory `run` at `copy`, its checkpoints after `step` deleted (as if it had stopped
    there)."""
    shutil.copytree(run, copy)
    for ckpt in checkpoints(copy):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    return copy


@pytest.mark.parametrize("saved_by, resumed_by", [(1, 2), (2, 1)])
def test_resume_with_another_number_of_processes(tmp_path, one_process_run, saved_by, resumed_by, runs, request):
    """The global batch, the loader's position and the optimizer's full state do not depend on the number of
    processes: a run saved by 1 process and resumed by 2 (DDP over gloo), or the other way, ends as the
    uninterrupted run of one process."""
    source = one_process_run["out_dir"] if saved_by == 1 else request.getfixturevalue("ddp_run")
    run = _resume_from(source, 3, tmp_path / "run")
    config = runs.toml(tmp_path / "run.toml", {**one_process_run, "out_dir": str(run)})
    out = runs.finish(runs.cli("--config", str(config), "--resume", nproc=resumed_by))
    assert f"resumed from {run / 'step-000003'} (step 3)" in out and f"{resumed_by} process(es)" in out
    a, b = runs.losses(one_process_run["out_dir"]), runs.losses(run)
    assert sorted(b) == list(range(1, 7))
    for step in range(4, 7):
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])


def test_resume_across_an_epoch_boundary(tmp_path, text_dir, cache_dir, runs):
    """Eight batches per epoch: the checkpoint of step 10 was saved in the second epoch (the loader's epoch 1, at
    its third batch); resuming it runs steps 11 and 12 on the second epoch's batches, to the bit."""
    s = runs.settings(text_dir, cache_dir, tmp_path / "full", seq_len=128, batch_size=16, micro_batch_size=8,
                      steps=12, save_every=5, keep_last=3, eval_every=12)
    train(make_config(s), log=lambda *_: None)
    saved = torch.load(tmp_path / "full" / "step-000010" / "trainer_state.pt", weights_only=False)
    assert saved["loader"] == {"epoch": 1, "index": 2, "seed": 0}
    run = _resume_from(tmp_path / "full", 10, tmp_path / "run")
    train(make_config({**s, "out_dir": str(run)}), resume=True, log=lambda *_: None)
    assert runs.losses(run) == runs.losses(tmp_path / "full")


def test_schedule_known_values():
    """A linear warm-up over warmup_steps, then a cosine from 1 to min_lr_ratio reached at step `steps`."""
    cfg = make_config(steps=14, warmup_steps=4, min_lr_ratio=0.1)
    cosine = {4: 1.0, 6: 0.1 + 0.45 * (1 + math.cos(0.2 * math.pi)), 9: 0.55, 14: 0.1, 30: 0.1}
    for step, want in {0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0, **cosine}.items():
        assert lr_factor(step, cfg) == pytest.approx(want, abs=1e-12), step
    assert [warmup_progress(s, cfg) for s in (0, 2, 3, 7)] == [0.25, 0.75, 1.0, 1.0]
    none = make_config(steps=10, warmup_steps=0, min_lr_ratio=0.0)
    assert [lr_factor(s, none) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    assert warmup_progress(0, none) == 1.0


@pytest.mark.parametrize("grad_clip", [0.05, 100.0])
def test_logged_learning_rates_and_clipped_gradients(tmp_path, text_dir, cache_dir, runs, grad_clip):
    """The metrics hold the learning rate each step used (lr 1e-2, warm-up 2 of 6 steps, floor 0.1) and the
    gradient norm before clipping; the gradient the optimizer took has norm min(grad_clip, that norm), read back
    from AdamW's first moments in the checkpoints of consecutive steps (m_s = 0.9 m_{s-1} + 0.1 g_s)."""
    s = runs.settings(text_dir, cache_dir, tmp_path / "run", steps=6, save_every=1, keep_last=6, eval_every=6,
                      grad_clip=grad_clip)
    train(make_config(s), log=lambda *_: None)
    records = {r["step"]: r for r in read_metrics(tmp_path / "run") if "loss" in r}
    used = [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 0.55, 0.1 + 0.45 * (1 + math.cos(0.75 * math.pi))]
    assert [records[s]["lr"] for s in range(1, 7)] == pytest.approx([1e-2 * f for f in used], rel=1e-9)
    moments = [{n: torch.zeros_like(m["exp_avg"]) for n, m in state.items()} for state in [
        torch.load(tmp_path / "run" / "step-000001" / "trainer_state.pt", weights_only=False)["optimizer"]["state"]]]
    for step in range(1, 7):
        state = torch.load(tmp_path / "run" / f"step-{step:06d}" / "trainer_state.pt", weights_only=False)
        moments.append({n: m["exp_avg"] for n, m in state["optimizer"]["state"].items()})
        taken = math.sqrt(sum(((moments[-1][n] - 0.9 * moments[-2][n]) / 0.1).pow(2).sum().item()
                              for n in moments[-1]))
        norm = records[step]["grad_norm"]
        assert taken == pytest.approx(min(grad_clip, norm), rel=1e-4), (step, taken, norm)
        assert norm > 0.05  # the small clip does clip every step


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
    """--activation-checkpointing is on in the run: the training forwards keep far fewer bytes for the backward
    (each block's input only), and the losses are the same to the bit."""
    from torch.autograd.graph import saved_tensors_hooks

    results, kept = {}, {}
    for flag in (False, True):
        s = runs.settings(text_dir, cache_dir, tmp_path / str(flag), steps=3, eval_every=3, save_every=3,
                          activation_checkpointing=flag, model_overrides={**runs.TINY, "num_hidden_layers": 2})
        kept[flag] = 0

        def pack(t, flag=flag):
            kept[flag] += t.numel() * t.element_size()
            return t

        with saved_tensors_hooks(pack, lambda t: t):
            train(make_config(s), log=lambda *_: None)
        results[flag] = runs.losses(tmp_path / str(flag))
    assert results[True] == results[False]
    assert kept[True] < kept[False] / 4, kept
