"""`tttlm experiment`: one file, one run, trained and evaluated in one command; tiny models on a text fixture."""

import json
from pathlib import Path

import pytest

from tttlm.cli import main
from tttlm.errors import UserError
from tttlm.eval.experiment import command_args, load_spec, run_experiment


def _write(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def files(tmp_path, corpus):
    """Experiment files over the fixture corpus: a shared base, a run with every evaluation, a second point of
    its learning-rate sweep, and a transformer whose lr comes from that sweep."""
    d = tmp_path / "configs"
    d.mkdir()
    _write(d / "base.toml", f"""
model = "ttt_linear-tiny"
corpus = "{corpus}"
val_fraction = 0.5
vocab_size = 300
cache_dir = "{tmp_path / 'cache'}"
seq_len = 32
batch_size = 4
steps = 4
warmup_steps = 1
device = "cpu"
log_every = 1
eval_every = 2
eval_batches = 1
progress = false
[validation]
max_sequences = 4
[model_overrides]
num_hidden_layers = 1
""")
    _write(d / "tiny-lr1e-2.toml", """
base = "base.toml"
lr = 1e-2
[positions]
seq_len = [32, 128]
num_docs = 2
[ladder]
seq_len = [16, 64]
num_docs = 2
[telemetry]
seq_len = 32
num_docs = 1
""")
    _write(d / "tiny-lr1e-4.toml", 'base = "base.toml"\nlr = 1e-4\n')
    _write(d / "tiny-transformer.toml", """
base = "base.toml"
model = "transformer-tiny"
seq_len = 64
batch_size = 2
lr_from = ["tiny-lr1e-2", "tiny-lr1e-4"]
[telemetry]
seq_len = 32
""")
    return d


def test_one_command_trains_evaluates_and_writes_small_json(files, tmp_path, capsys):
    out, work = tmp_path / "results", tmp_path / "work"
    assert main(["experiment", str(files / "tiny-lr1e-2.toml"), "--out-dir", str(out), "--work-dir", str(work)]) == 0
    run = out / "tiny-lr1e-2"
    r = json.loads((run / "experiment.json").read_text())
    assert r["status"] == "ok" and r["non_finite"] == 0
    assert r["command"] == f"tttlm experiment {files / 'tiny-lr1e-2.toml'} --out-dir {out}"
    assert r["train"]["lr"] == 1e-2 and r["train"]["steps"] == 4 and r["model"]["mixer"] == "ttt_linear"
    assert r["model"]["parameters"] > r["model"]["non_embedding_parameters"] > 0
    t = r["training"]
    assert t["steps"] == 4 and t["tokens"] == 4 * 4 * 32 and t["tokens_per_s"] > 0
    assert [c["step"] for c in t["curve"]] == [1, 2, 3, 4] and [c["step"] for c in t["val_curve"]] == [2, 4]
    v = r["validation"]
    assert v["seq_len"] == 32 and v["sequences"] == 4 and 0 < v["loss"] < 10 and v["tokens"] > 100
    assert set(r["evaluations"]) == {"positions", "ladder", "telemetry"}
    assert r["evaluations"]["ladder"]["command"] == (
        f"tttlm ladder CHECKPOINT --seq-len 16 64 --num-docs 2 --out-dir {run}")
    assert all(e["status"] == "ok" for e in r["evaluations"].values())
    positions = json.loads((run / "positions.json").read_text())
    assert set(positions["contexts"]) == {"32", "128"}
    assert (run / "ladder.json").is_file() and list(run.glob("telemetry_*.json"))
    manifest = json.loads((out / "corpus" / r["data"]["manifest"]).read_text())
    assert manifest["fingerprint"] == r["data"]["fingerprint"] and manifest["documents"] == 16
    assert not list(out.rglob("*.safetensors")) and not (work / "tiny-lr1e-2").exists()  # no checkpoint kept
    assert "validation loss at 32" in capsys.readouterr().out
    assert main(["experiment", "--summary", str(out)]) == 0
    summary = (out / "summary.md").read_text()
    assert "| **tiny-lr1e-2** | ttt_linear |" in summary and f"`{r['command']}`" in summary
    assert "## Inner-loop telemetry" in summary and (out / "summary-positions.png").stat().st_size > 1000
    assert main(["experiment", str(files / "tiny-lr1e-2.toml"), "--out-dir", str(out), "--work-dir", str(work)]) == 2
    assert "already holds the results" in capsys.readouterr().err


def test_lr_from_takes_the_best_run_of_a_sweep(files, tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    late = ["experiment", str(files / "tiny-transformer.toml"), "--out-dir", str(out), "--work-dir", str(work)]
    with pytest.raises(UserError, match="run these first.*tiny-lr1e-4"):
        run_experiment(files / "tiny-transformer.toml", out, work)
    for name in ("tiny-lr1e-2", "tiny-lr1e-4"):
        _write(files / f"{name}.toml", (files / f"{name}.toml").read_text().split("[positions]")[0])
        assert main(["experiment", str(files / f"{name}.toml"), "--out-dir", str(out), "--work-dir", str(work)]) == 0
    losses = {n: json.loads((out / n / "experiment.json").read_text())["validation"]["loss"]
              for n in ("tiny-lr1e-2", "tiny-lr1e-4")}
    best = min(losses, key=losses.get)
    assert main(late) == 0
    r = json.loads((out / "tiny-transformer" / "experiment.json").read_text())
    assert r["train"]["lr_chosen_from"] == best and r["train"]["lr"] == {"tiny-lr1e-2": 1e-2, "tiny-lr1e-4": 1e-4}[best]
    assert r["train"]["seq_len"] == 64 and r["validation"]["seq_len"] == 64
    assert r["evaluations"] == {}  # no telemetry for a model without an inner loop


def test_a_diverging_run_is_recorded(files, tmp_path):
    # diverging steps are skipped (weights kept) until max_nonfinite_steps in a row stop the run
    _write(files / "bad.toml", 'base = "base.toml"\nlr = 1e6\nmax_nonfinite_steps = 2\n')
    out = tmp_path / "results"
    assert main(["experiment", str(files / "bad.toml"), "--out-dir", str(out), "--work-dir", str(tmp_path / "w")]) == 1
    r = json.loads((out / "bad" / "experiment.json").read_text())
    assert r["status"] == "failed" and "lower --lr" in r["error"] and r["validation"] is None
    assert main(["experiment", str(files / "bad.toml"), str(files / "tiny-lr1e-4.toml"), "--probe", "3", "--out-dir",
                 str(out), "--work-dir", str(tmp_path / "w")]) == 1
    rows = json.loads((out / "probe.json").read_text())["runs"]
    assert "lower --lr" in rows[0]["error"] and rows[1]["tokens_per_s"] > 0


def test_recall_runs_one_process_per_mixer_and_merges(tmp_path):
    cfg = _write(tmp_path / "mqar.toml", """
kind = "recall"
time_limit_s = 240
[recall]
mixers = ["transformer", "mamba2"]
widths = [16]
seq_len = [16]
pairs = [2]
lr = [1e-2]
steps = 2
batch_size = 4
vocab_size = 32
eval_examples = 8
layers = 1
device = "cpu"
""")
    out = tmp_path / "results"
    assert main(["experiment", str(cfg), "--out-dir", str(out), "--work-dir", str(tmp_path / "w")]) == 0
    r = json.loads((out / "mqar" / "experiment.json").read_text())
    assert r["status"] == "ok" and set(r["evaluations"]) == {"recall-transformer", "recall-mamba2", "merge"}
    assert r["evaluations"]["recall-mamba2"]["command"].startswith("tttlm recall --mixers mamba2 --widths 16")
    merged = json.loads((out / "mqar" / "recall.json").read_text())
    assert sorted(b["mixer"] for b in merged["best"]) == ["mamba2", "transformer"] and merged["complete"]
    assert sorted(p.name for p in (out / "mqar").iterdir()) == ["experiment.json", "recall.json", "recall.png"]
    assert main(["experiment", "--summary", str(out)]) == 0
    assert "| transformer | " in (out / "summary.md").read_text() and (out / "summary-recall.png").is_file()


def test_probe_projects_the_full_run(files, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["experiment", str(files / "tiny-lr1e-4.toml"), "--probe", "2", "--out-dir", str(out), "--work-dir",
                 str(tmp_path / "w")]) == 0
    row = json.loads((out / "probe.json").read_text())["runs"][0]
    assert row["name"] == "tiny-lr1e-4" and row["tokens_per_s"] > 0
    assert row["train_minutes"] == pytest.approx(4 * 4 * 32 / row["tokens_per_s"] / 60)
    assert "tiny-lr1e-4" in capsys.readouterr().out


def test_spec_files_merge_and_reject_unknown_settings(files, tmp_path):
    spec = load_spec(files / "tiny-transformer.toml")
    assert spec["name"] == "tiny-transformer" and spec["model"] == "transformer-tiny" and spec["vocab_size"] == 300
    assert spec["telemetry"] == {"seq_len": 32} and spec["validation"] == {"max_sequences": 4}
    assert spec["model_overrides"] == {"num_hidden_layers": 1}
    _write(files / "typo.toml", 'base = "base.toml"\nlearning_rate = 1e-3\n')
    with pytest.raises(UserError, match="unknown setting.*learning_rate"):
        load_spec(files / "typo.toml")
    _write(files / "loop.toml", 'base = "loop.toml"\n')
    with pytest.raises(UserError, match="include itself"):
        load_spec(files / "loop.toml")
    assert command_args({"num_docs": 2, "seq_len": [32, 64], "flag": True, "off": False, "lr": 1e-4}) == [
        "--num-docs", "2", "--seq-len", "32", "64", "--flag", "--lr", "0.0001"]


CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "experiments"


def _runs(kind: str) -> list[dict]:
    return [load_spec(f) for f in sorted(CONFIGS.glob("*.toml")) if not f.name.startswith("base-")
            and load_spec(f)["kind"] == kind]


def test_committed_lm_runs_compare_like_with_like():
    """Same data, seed, optimiser, budget and evaluations for every run; the same tokens per step at 2k and
    8k; the same lr grid for every mixer; parameter counts within 5% of each other (the five within 0.2%)."""
    from tttlm.eval.experiment import train_config
    from tttlm.models.presets import count_parameters, preset_config

    runs = _runs("lm")
    own = {"name", "file", "model", "model_overrides", "lr", "lr_from", "seq_len", "batch_size", "micro_batch_size"}
    shared = [{k: v for k, v in r.items() if k not in own} for r in runs]
    assert all(s == shared[0] for s in shared) and shared[0]["corpus"] == "python"
    assert shared[0]["positions"]["seq_len"][-1] >= 32768 and 1e-4 in shared[0]["telemetry"]["tolerances"]
    configs = [train_config(r) for r in runs]
    assert {c.batch_size * c.seq_len for c in configs} == {65536} and {c.seq_len for c in configs} == {2048, 8192}
    mixers = {c.model.split("-")[0] for c in configs}
    assert mixers == {"transformer", "mamba2", "ttt_linear", "ttt_mlp", "mesa", "mamba"}
    grids = {m: sorted(r["lr"] for r in runs if r["model"].startswith(m + "-") and "lr" in r) for m in mixers}
    assert all(g == grids["transformer"] and len(g) >= 3 for g in grids.values())
    for r in runs:
        if "lr_from" in r:
            sweep = {x["name"] for x in runs if x["model"] == r["model"] and x["seq_len"] == 2048}
            assert set(r["lr_from"]) == sweep, r["name"]
    counts = {c.model: count_parameters(preset_config(c.model, vocab_size=c.vocab_size, **c.model_overrides))
              for c in configs}
    assert max(counts.values()) / min(counts.values()) < 1.05, counts
    five = [n for m, n in counts.items() if not m.startswith("mamba-")]
    assert max(five) / min(five) < 1.002, counts
    for m, n in counts.items():  # the counts the README and the configs' comments state
        assert f"{n:,d}" in (CONFIGS / "README.md").read_text(), m


def test_committed_mqar_sweep_is_zoology_like():
    runs = _runs("recall")
    assert runs
    widths = sorted(w for r in runs for w in r["recall"]["widths"])
    assert widths[0] >= 64 and widths[-1] <= 256 and len(widths) >= 3
    for r in runs:
        rc = r["recall"]
        assert min(rc["seq_len"]) >= 256 and 16 <= min(rc["pairs"]) and max(rc["pairs"]) <= 64
        assert len(rc["lr"]) >= 3 and rc["steps"] >= 1000 and set(rc["mixers"]) >= {"transformer", "mamba2"}
