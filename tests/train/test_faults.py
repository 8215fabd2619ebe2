"""Faults a training run meets and bad inputs, each inflicted for real where it can be (a cut or changed file, a
signal, a killed process, a file-size limit, a changed corpus) and checked for what the user sees and what is
kept. Each case is recorded as a row of docs/reliability.md's table (`reliability` in tests/conftest.py)."""

import os
import resource
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tttlm.cli import main
from tttlm.errors import PREEMPTED, CheckpointError
from tttlm.train.config import make_config
from tttlm.train.metrics import read_metrics
from tttlm.train.trainer import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_dir, cache_dir, runs):
    """An uninterrupted 8-step run in this process, every second step saved and all four kept: (settings, the
    run directory). Tests damage copies of it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    s = runs.settings(text_dir, cache_dir, out, keep_last=4)
    train(make_config(s), log=lambda *_: None)
    return s, out


def copy_run(trained, tmp_path, runs):
    """A copy of the trained run in tmp_path/run and its TOML config (as the user would resume it)."""
    s, out = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    return run, runs.toml(tmp_path / "run.toml", {**s, "out_dir": str(run)})


def cut(path: Path) -> None:
    """Cuts a file to half its size, as an interrupted copy or a full disk leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def change(path: Path) -> None:
    """Flips one byte in the middle of a file: the size stays, the content does not."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {  # name: (what the table says, what the test does to a checkpoint directory, the file named)
    "cut": ("model.safetensors cut in half", lambda d: cut(d / "model.safetensors"), "model.safetensors"),
    "missing": ("tokenizer.json deleted", lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json"),
    "changed": ("one byte of model.safetensors changed (same size)", lambda d: change(d / "model.safetensors"),
                "model.safetensors"),
}


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of `tttlm ARGV` run in this process."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", list(DAMAGE))
def test_every_command_names_the_damaged_file_of_a_checkpoint(tmp_path, trained, capsys, runs, reliability, case):
    what, inflict, name = DAMAGE[case]
    run, _ = copy_run(trained, tmp_path, runs)
    inflict(run / "step-000008")
    verify = ["--verify"] if case == "changed" else []  # sizes are always checked, hashes where asked
    commands = {
        "eval": ["eval", run, *verify],
        "generate": ["generate", run, "--prompt", "def", "--max-new-tokens", "4", *verify],
        "ladder": ["ladder", run, "--seq-len", "16", "--out-dir", tmp_path / "ladder", *verify],
        "positions": ["positions", run, "--seq-len", "16", "--out-dir", tmp_path / "positions", *verify],
    }
    for command, argv in commands.items():
        code, out, err = run_cli(argv, capsys)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (command, code, out, err)
        assert f"step-000008 is damaged: {name}" in err and "step-000006 is intact" in err, err
        reliability(f"tttlm {' '.join(map(str, argv))}", f"latest checkpoint: {what}", f"exit 2: {err}",
                    "the run directory untouched")

    from transformers import AutoModelForCausalLM

    import tttlm.models  # noqa: F401

    with pytest.raises(CheckpointError, match=f"step-000008 is damaged: {name}") as e:
        AutoModelForCausalLM.from_pretrained(run / "step-000008", verify_hashes=bool(verify))
    if case != "missing":  # transformers reads no tokenizer
        reliability(f"AutoModelForCausalLM.from_pretrained('run/step-000008'{', verify_hashes=True' * bool(verify)})",
                    f"checkpoint: {what}", f"CheckpointError: {e.value}", "the checkpoint untouched")
    if case == "changed":  # without --verify only the sizes are compared, and they match
        assert run_cli(["eval", run, "--eval-batches", "1"], capsys)[0] == 0


RESUME_DAMAGE = {**DAMAGE, "state": ("trainer_state.pt deleted", lambda d: (d / "trainer_state.pt").unlink(),
                                     "trainer_state.pt")}


@pytest.mark.parametrize("case", ["cut", "changed", "state"])
def test_resume_skips_a_damaged_checkpoint_and_continues_exactly(tmp_path, trained, capsys, runs, reliability,
                                                                   case):
    what, inflict, name = RESUME_DAMAGE[case]
    run, config = copy_run(trained, tmp_path, runs)
    inflict(run / "step-000008")
    before = runs.losses(run)
    code, out, err = run_cli(["train", "--config", config, "--resume"], capsys)
    assert code == 0, err
    said = [line for line in out.splitlines() if line.startswith(("skipped", "resumed"))]
    assert said[0].startswith(f"skipped {run / 'step-000008'}: {name}"), said
    assert said[0].endswith("moved it to step-000008.damaged")
    assert said[1] == f"resumed from {run / 'step-000006'} (step 6)"
    assert (run / "step-000008.damaged").is_dir() and (run / "step-000008" / "manifest.json").is_file()
    assert runs.losses(run) == before  # steps 7 and 8 again, to the bit
    reliability("tttlm train --config run.toml --resume", f"latest checkpoint: {what}",
                f"exit 0: {said[0]}; {said[1]}",
                "the newest intact checkpoint; the run ends as the uninterrupted one, to the bit")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_at_the_step_boundary_and_resume_continues_exactly(tmp_path, trained, capsys, monkeypatch,
                                                                            runs, reliability, sig):
    import tttlm.train.trainer as trainer

    s, reference = trained
    run = tmp_path / "run"
    config = runs.toml(tmp_path / "run.toml", {**s, "out_dir": str(run), "save_every": 3})
    evaluate = trainer.evaluate

    def evaluate_then_signal(*args, **kwargs):  # the signal arrives during the validation after step 4
        monkeypatch.setattr(trainer, "evaluate", evaluate)
        result = evaluate(*args, **kwargs)
        os.kill(os.getpid(), sig)
        return result

    monkeypatch.setattr(trainer, "evaluate", evaluate_then_signal)
    code, _, err = run_cli(["train", "--config", config], capsys)
    assert code == PREEMPTED and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"tttlm train: stopped by {sig.name} at step 4, saved in {run / 'step-000004'}"), err
    assert [p.name for p in sorted(run.glob("step-*"))] == ["step-000003", "step-000004"]
    assert run_cli(["train", "--config", config, "--resume"], capsys)[0] == 0
    assert runs.losses(run) == runs.losses(reference)  # to the bit
    reliability("tttlm train --config run.toml", f"{sig.name} during step 4 (of 8; saving every 3)",
                f"exit {code}: {err}", "step-000004 saved at the step boundary; --resume ends as the uninterrupted "
                "run, to the bit")


class InfiniteGradient(torch.autograd.Function):
    """The identity, whose gradient is infinite: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def poison(monkeypatch, steps, kind, accum=2):
    """Makes the loss (kind "loss": NaN) or its gradients (kind "gradient": infinite) of the training steps in
    `steps` (1-based) non-finite, as an overflow would."""
    from tttlm.models import TTTLMForCausalLM

    forward, calls = TTTLMForCausalLM.forward, [0]

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls[0] += 1
            if (calls[0] - 1) // accum + 1 in steps:
                out.loss = out.loss * float("nan") if kind == "loss" else InfiniteGradient.apply(out.loss)
        return out

    monkeypatch.setattr(TTTLMForCausalLM, "forward", poisoned)


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_a_non_finite_step_is_skipped_and_counted(tmp_path, text_dir, cache_dir, capsys, monkeypatch, runs,
                                                  reliability, kind):
    out = tmp_path / "run"
    poison(monkeypatch, {3}, kind)
    s = runs.settings(text_dir, cache_dir, out, steps=4, save_every=1, keep_last=4, log_every=2)
    code, printed, _ = run_cli(["train", "--config", runs.toml(tmp_path / "run.toml", s)], capsys)
    said = [line for line in printed.splitlines() if "non-finite" in line]
    assert code == 0 and said == ["step 3: skipped 1 step(s) with a non-finite loss or gradient (1 in all)"], said
    records = {r["step"]: r for r in read_metrics(out) if "loss" in r}
    assert {s: r["skipped_steps"] for s, r in records.items()} == {2: 0, 4: 1}
    weights = {s: load_file(out / f"step-{s:06d}" / "model.safetensors") for s in (2, 3, 4)}
    state = {s: torch.load(out / f"step-{s:06d}" / "trainer_state.pt", weights_only=False)["optimizer"]["state"]
             for s in (2, 3)}
    for name, w in weights[2].items():
        assert torch.equal(w, weights[3][name]), name  # step 3 changed no weight...
    for name, moments in state[2].items():
        for key, value in moments.items():
            assert torch.equal(value, state[3][name][key]), (name, key)  # ...nor AdamW's moments or step count
    assert any(not torch.equal(w, weights[4][n]) for n, w in weights[3].items())  # step 4 trained again
    assert all(torch.isfinite(w).all() for w in weights[4].values())
    reliability("tttlm train", f"a non-finite {kind} at step 3", f"exit 0; {said[0]}; metrics.jsonl: skipped_steps",
                "step 3 skipped: weights and AdamW state as after step 2; training goes on")


def test_non_finite_steps_in_a_row_stop_the_run(tmp_path, text_dir, cache_dir, capsys, monkeypatch, runs,
                                                reliability):
    """Steps 3-5 go wrong; the counts are read every second step (log_every, save_every), so at step 6 the run
    of 3 is over but still found."""
    s = runs.settings(text_dir, cache_dir, tmp_path / "run", max_nonfinite_steps=3, log_every=2)
    poison(monkeypatch, {3, 4, 5}, "loss")
    code, _, err = run_cli(["train", "--config", runs.toml(tmp_path / "run.toml", s)], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("tttlm train: error: stopped at step 6: 3 steps in a row had a non-finite loss or "
                          "gradient and were skipped (max_nonfinite_steps=3)"), err
    assert [p.name for p in sorted((tmp_path / "run").glob("step-*"))] == ["step-000002", "step-000004"]
    good, saved = (load_file(tmp_path / "run" / f"step-{n:06d}" / "model.safetensors") for n in (2, 4))
    assert all(torch.equal(w, saved[n]) for n, w in good.items())
    reliability("tttlm train --max-nonfinite-steps 3", "a NaN loss at steps 3, 4 and 5", f"exit {code}: {err}",
                "step-000002; step-000004 (saved within the run of skipped steps) holds the same weights")


def test_an_unwritable_output_directory_is_refused_before_any_work(tmp_path, text_dir, cache_dir, capsys, runs,
                                                                   reliability):
    (tmp_path / "file").write_text("")
    s = runs.settings(text_dir, cache_dir, tmp_path / "file" / "run")
    code, out, err = run_cli(["train", "--config", runs.toml(tmp_path / "run.toml", s)], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"tttlm train: error: cannot write to the output directory {tmp_path / 'file' / 'run'}"), err
    reliability("tttlm train --out-dir file/run", "an output directory that cannot be written (under a file)",
                f"exit 2: {err}", "nothing was started")


def test_a_full_disk_ends_in_one_line_and_keeps_every_checkpoint(tmp_path, text_dir, cache_dir, runs, reliability):
    """A file-size limit (RLIMIT_FSIZE) fails the writes of the large files as a full disk does, in the process
    of the main rank only: the other one learns it and stops too instead of waiting."""
    run = tmp_path / "run"
    s = runs.settings(text_dir, cache_dir, run, steps=4)
    train(make_config(s), log=lambda *_: None)
    files = {p: p.read_bytes() for p in run.glob("step-*/*")}
    large = {"model.safetensors", "trainer_state.pt"}
    limit = max(len(v) for p, v in files.items() if p.name not in large) + 4096
    assert limit < min(len(v) for p, v in files.items() if p.name in large)

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails rather than kills
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    config = runs.toml(tmp_path / "run.toml", {**s, "steps": 8})
    proc = runs.cli("--config", str(config), "--resume", nproc=2, preexec_fn=limit_file_size)
    out, _ = proc.communicate(timeout=240)
    lines = [line for line in out.splitlines() if line.startswith("tttlm train:")]
    assert proc.returncode != 0 and len(lines) == 2, out  # one line from each process
    assert all(line == lines[0] for line in lines), lines
    assert lines[0].startswith(f"tttlm train: error: cannot write {run / '.tmp-step-000006' / 'model.safetensors'}: "
                               f"File too large; the checkpoints in {run} are intact, the newest step-000004"), lines
    assert {p: p.read_bytes() for p in run.glob("step-*/*")} == files and not list(run.glob(".tmp*"))
    reliability("torchrun --nproc-per-node 2 -m tttlm train --config run.toml --resume",
                "the disk fills while step-000006 is written (a file-size limit)", f"exit 1 (each process): {lines[0]}",
                "step-000002 and step-000004 byte for byte; no partial checkpoint")


def test_resuming_on_a_changed_corpus_or_tokenizer_is_refused(tmp_path, shared_text_dir, cache_dir, capsys, runs,
                                                              reliability):
    corpus = shutil.copytree(shared_text_dir, tmp_path / "corpus")
    s = runs.settings(corpus, cache_dir, tmp_path / "run", steps=4)
    config = runs.toml(tmp_path / "run.toml", s)
    assert run_cli(["train", "--config", config], capsys)[0] == 0
    (corpus / "doc05.txt").write_text((corpus / "doc05.txt").read_text() + "def added\n")
    (corpus / "doc30.txt").write_text("import new\n")
    (corpus / "doc02.txt").unlink()
    kept = {p: p.read_bytes() for p in (tmp_path / "run").glob("step-*/*")}
    code, out, err = run_cli(["train", "--config", config, "--resume", "--steps", 8], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"tttlm train: error: cannot resume from {tmp_path / 'run' / 'step-000004'}: the corpus "
                          f"{str(corpus)!r} changed since the run started: 1 file(s) added (doc30.txt); 1 file(s) "
                          f"removed (doc02.txt); 1 file(s) changed (doc05.txt: "), err
    reliability("tttlm train --config run.toml --resume", "corpus files added, removed and changed since the run "
                "started", f"exit 2: {err}", "the run directory untouched")

    tokenizer = tmp_path / "tokenizer.json"
    shutil.copy(tmp_path / "run" / "step-000004" / "tokenizer.json", tokenizer)
    s = runs.settings(shared_text_dir, cache_dir, tmp_path / "run2", steps=4, tokenizer=str(tokenizer))
    config = runs.toml(tmp_path / "run2.toml", s)
    assert run_cli(["train", "--config", config], capsys)[0] == 0
    from tttlm.data.tokenizer import train_tokenizer

    train_tokenizer((p.read_text() for p in sorted(shared_text_dir.iterdir())), vocab_size=280).save(str(tokenizer))
    code, out, err = run_cli(["train", "--config", config, "--resume", "--steps", 8], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err == (f"tttlm train: error: cannot resume from {tmp_path / 'run2' / 'step-000004'}: the tokenizer "
                   f"{tokenizer} changed since the run started (300 -> 280 tokens)\n"), err
    assert {p: p.read_bytes() for p in (tmp_path / "run").glob("step-*/*")} == kept
    reliability("tttlm train --tokenizer tokenizer.json --resume", "tokenizer.json replaced since the run started",
                f"exit 2: {err}", "the run directory untouched")


@pytest.mark.parametrize("key, value", [("seq_len", 64), ("seed", 3), ("model_overrides", {"mini_batch_size": 4})],
                         ids=["seq_len", "seed", "model_overrides"])
def test_resuming_with_changed_settings_is_refused(tmp_path, trained, capsys, runs, reliability, key, value):
    """A setting that fixes the model, the data or their order cannot change on resume: the refusal names the
    setting with both values, and the run directory is left as it was."""
    run, _ = copy_run(trained, tmp_path, runs)
    s = {**trained[0], "out_dir": str(run), "steps": 12}
    before = getattr(make_config(trained[0]), key)
    s[key] = {**before, **value} if isinstance(value, dict) else value
    kept = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, out, err = run_cli(["train", "--config", runs.toml(tmp_path / "changed.toml", s), "--resume"], capsys)
    assert code == 2 and "resumed" not in out, (code, out)
    assert err == (f"tttlm train: error: cannot resume from {run / 'step-000008'}: {key}={before!r} there, but "
                   f"{key}={s[key]!r} now\n"), err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == kept
    reliability("tttlm train --config run.toml --resume", f"{key} changed since the run started",
                f"exit 2: {err}", "the run directory untouched")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, text_dir, cache_dir, runs):
    """An uninterrupted 12-step run of 2 gloo processes: its settings."""
    tmp = tmp_path_factory.mktemp("two")
    s = runs.settings(text_dir, cache_dir, tmp / "run", steps=12, eval_every=6)
    runs.finish(runs.cli("--config", str(runs.toml(tmp / "run.toml", s)), nproc=2))
    return s


def worker_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of the processes torchrun (pid `parent`) started."""
    found = {}
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                env = dict(v.split("=", 1) for v in (d / "environ").read_text().split("\0") if "=" in v)
                found[int(env["RANK"])] = int(d.name)
        except (OSError, KeyError):  # a process that ended meanwhile
            continue
    return found


def start_and_wait_for(runs, config, checkpoint: Path):
    """torchrun with 2 processes on config, once it has saved checkpoint."""
    proc = runs.cli("--config", str(config), nproc=2)
    deadline = time.time() + 180
    while not checkpoint.exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.02)
    return proc


def test_a_killed_process_stops_the_others_and_resume_continues_exactly(tmp_path, two_process_run, runs,
                                                                        reliability):
    run = tmp_path / "run"
    config = runs.toml(tmp_path / "run.toml", {**two_process_run, "out_dir": str(run)})
    proc = start_and_wait_for(runs, config, run / "step-000004")
    os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
    killed = time.time()
    out, _ = proc.communicate(timeout=120)
    waited = time.time() - killed
    assert proc.returncode != 0 and waited < 30, (waited, out)
    lines = [line for line in out.splitlines() if line.startswith("tttlm train:")]
    assert len(lines) == 1 and lines[0].startswith("tttlm train: error: process 0 of 2 lost another process of the "
                                                   "run after step "), out
    assert f"the checkpoints in {run} are intact" in lines[0] and not (run / "step-000012").exists()
    runs.finish(runs.cli("--config", str(config), "--resume", nproc=2))
    assert runs.losses(run) == runs.losses(two_process_run["out_dir"])  # to the bit
    reliability("torchrun --nproc-per-node 2 -m tttlm train --config run.toml", "process 1 killed (SIGKILL) after "
                "step-000004 was saved", f"process 0, in under 30 s: {lines[0]}; torchrun: its report of the "
                f"killed process, exit {proc.returncode}",
                "every checkpoint; --resume ends as the uninterrupted run, to the bit")


def test_sigterm_to_torchrun_saves_and_resume_continues_exactly(tmp_path, two_process_run, runs, reliability):
    run = tmp_path / "run"
    config = runs.toml(tmp_path / "run.toml", {**two_process_run, "out_dir": str(run)})
    proc = start_and_wait_for(runs, config, run / "step-000002")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    lines = [line for line in out.splitlines() if line.startswith("tttlm train:")]
    assert proc.returncode != 0 and len(lines) == 2, out
    step = int(lines[0].split(" at step ")[1].split(",")[0])
    assert 2 <= step < 12 and all(f"stopped by SIGTERM at step {step}, saved in " in line for line in lines), lines
    assert (run / f"step-{step:06d}" / "manifest.json").is_file()
    runs.finish(runs.cli("--config", str(config), "--resume", nproc=2))
    assert runs.losses(run) == runs.losses(two_process_run["out_dir"])  # to the bit
    reliability("torchrun --nproc-per-node 2 -m tttlm train --config run.toml", "SIGTERM to torchrun (which passes "
                "it on) after step-000002 was saved", f"each process: {lines[0]}; torchrun: its SignalException, "
                f"exit {proc.returncode}",
                "a checkpoint at the step boundary; --resume ends as the uninterrupted run, to the bit")
