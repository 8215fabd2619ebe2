"""Every evaluation command on CPU on tiny checkpoints: JSON written and checked, figures written, numbers
finite; then the report gathering them."""

import math

import pytest

from tttlm.cli import main

from .conftest import load_json

FAST = ["ttt_linear", "mamba2"]  # every mixer runs in the other commands and in tests/models


@pytest.fixture(scope="module")
def runs(tmp_path_factory, checkpoint):
    """Runs every command once; returns {command: output directory}."""
    root = tmp_path_factory.mktemp("eval")
    ttt, mlp, mesa, attn = (checkpoint(m) for m in ("ttt_linear", "ttt_mlp", "mesa", "transformer"))
    commands = {
        "positions": ["positions", str(ttt), str(attn), "--seq-len", "64", "128", "--num-docs", "2"],
        "ladder": ["ladder", str(ttt), str(mesa), "--seq-len", "32", "64", "128", "--num-docs", "2",
                   "--micro-batch-size", "2"],
        "telemetry": ["telemetry", str(ttt), str(mlp), str(mesa), "--seq-len", "64",
                      "--tolerances", "1e-2", "1e-4"],
        **{
            f"recall-{m}": ["recall", "--widths", "32", "--seq-len", "32", "--pairs", "2", "4",
                            "--lr", "1e-3", "3e-3", "--steps", "2", "--batch-size", "4", "--vocab-size", "64",
                            "--eval-examples", "16", "--mixers", m]
            for m in FAST
        },
        "throughput": ["throughput", "--size", "tiny", "--seq-len", "16", "48", "--train-shapes", "1x32",
                       "2x16", "--new-tokens", "2", "--repeats", "1", "--warmup", "1", "--vocab-size", "128",
                       "--profile", "--mixers", *FAST],
    }  # fmt: skip
    out = {}
    for name, argv in commands.items():
        out[name] = root / name
        assert main([*argv, "--device", "cpu", "--out-dir", str(out[name])]) == 0, name
    out["recall"] = root / "recall"  # sweeps run apart (one per mixer), merged
    parts = [str(out.pop(f"recall-{m}")) for m in FAST]
    assert main(["recall", "--merge", *parts, "--out-dir", str(out["recall"])]) == 0
    return out


def _finite(xs):
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def _model_and_documents(path, length: int, num_docs: int):
    """The checkpoint's model, and the first `length` tokens of the first `num_docs` validation documents of its
    training corpus that hold that many, read as the library functions do."""
    from tttlm.eval.documents import load_documents
    from tttlm.train.checkpoint import load_pretrained

    model, _, settings = load_pretrained(path)
    ids = load_documents(settings["corpus"], path / "tokenizer.json", length, num_docs,
                         val_fraction=settings["val_fraction"], cache_dir=settings["cache_dir"])
    return model, ids


def test_positions(runs, checkpoint):
    """Each curve is `position_curve(token_losses(...))` of the checkpoint on the first 2 validation documents of
    each context length."""
    from tttlm.eval.positions import position_curve, token_losses

    data = load_json(runs["positions"] / "positions.json")
    assert data["kind"] == "positions" and set(data["contexts"]) == {"64", "128"}
    for L, entry in data["contexts"].items():
        assert entry["num_docs"] == 2 and len(entry["checkpoints"]) == 2
        for mixer in ("ttt_linear", "transformer"):
            curve = entry["checkpoints"][f"{mixer}-run/step-000010"]
            model, ids = _model_and_documents(checkpoint(mixer), int(L), 2)
            want = position_curve(token_losses(model, ids))
            bins = curve["bins"]
            assert bins[0][0] == 1 and bins[-1][1] == int(L) and bins == want["bins"]
            assert curve["loss"] == pytest.approx(want["loss"], rel=1e-6)
            assert (curve["mean"], curve["last_decile"]) == pytest.approx((want["mean"], want["last_decile"]), rel=1e-6)
            assert curve["trained_context"] == 64 and curve["num_docs"] == 2


def test_ladder(runs, checkpoint):
    """Each length's loss is the mean next-token loss of the first L tokens of the same 2 documents (those that
    hold the longest length), read from their start."""
    from tttlm.eval.positions import token_losses

    data = load_json(runs["ladder"] / "ladder.json")
    for mixer in ("ttt_linear", "mesa"):
        entry = data["checkpoints"][f"{mixer}-run/step-000010"]
        assert set(entry["lengths"]) == {"32", "64", "128"} and entry["trained_context"] == 64
        model, ids = _model_and_documents(checkpoint(mixer), 128, 2)
        for L, r in entry["lengths"].items():
            want = token_losses(model, ids[:, : int(L)]).double().mean().item()
            assert r["loss"] == pytest.approx(want, rel=1e-6), (mixer, L)
            assert math.isclose(r["perplexity"], math.exp(r["loss"]), rel_tol=1e-9)
            assert r["tokens"] == 2 * (int(L) - 1)


def test_telemetry(runs):
    for name, mixer in (("ttt_linear", "ttt_linear"), ("ttt_mlp", "ttt_mlp"), ("mesa", "mesa")):
        data = load_json(runs["telemetry"] / f"telemetry_{name}-run_step-000010.json")
        assert data["mixer"] == mixer and len(data["layers"]) == 2
        for layer in data["layers"]:
            if mixer == "mesa":
                its = {s["tolerance"]: s["iterations"] for s in layer["solves"]}
                assert its[None] == 30 and 1 <= its[1e-2] <= its[1e-4] <= 30
                for s in layer["solves"]:
                    assert s["non_finite_output"] == 0
                    if s["tolerance"] is not None and s["iterations"] < 30:
                        assert s["residual_max"] <= s["tolerance"]
                continue
            assert layer["position"] == [16, 32, 48, 64]
            for key in ("loss_init", "loss_before", "loss_after", "grad_norm", "update_norm"):
                assert len(layer[key]) == 4 and _finite(layer[key]) and min(layer[key]) > 0
            assert layer["loss_init"][0] == layer["loss_before"][0]
            assert sum(layer["non_finite"].values()) == 0 and layer["first_non_finite_minibatch"] is None
            assert layer["max_abs_diff_vs_op"] < 1e-4


def test_recall(runs):
    data = load_json(runs["recall"] / "recall.json")
    assert data["complete"] and len(data["merged_from"]) == len(FAST)
    assert len(data["runs"]) == len(FAST) * 2 * 2
    assert {(b["mixer"], b["pairs"]) for b in data["best"]} == {(m, p) for m in FAST for p in (2, 4)}
    for b in data["best"]:
        same = [r["accuracy"] for r in data["runs"] if (r["mixer"], r["pairs"]) == (b["mixer"], b["pairs"])]
        assert b["accuracy"] == max(same) and 0.0 <= b["accuracy"] <= 1.0


def test_throughput(runs):
    """The command measures each mixer's tiny preset at the vocabulary asked for (the timings' arithmetic is
    tests/eval/test_functions.py's)."""
    from tttlm.models import count_parameters, preset_config

    data = load_json(runs["throughput"] / "throughput.json")
    assert set(data["mixers"]) == set(FAST)
    assert data["settings"] == {"size": "tiny", "train_shapes": ["1x32", "2x16"], "contexts": [16, 48],
                                "new_tokens": 2, "repeats": 1, "warmup": 1, "dtype": "float32", "compile": False,
                                "decode": "eager"}  # on CUDA "graph"
    for mixer, m in data["mixers"].items():
        assert m["params"] == count_parameters(preset_config(f"{mixer}-tiny", vocab_size=128))
        assert set(m["train"]) == {"1x32", "2x16"}
        for r in m["train"].values():
            assert r["tokens_per_s"] > 0 and r["flops_per_token"] > 6 * m["params"] - 1 and r["mfu"] is None
            assert r["profile"][-1]["name"] == "(all)" and len(r["profile"]) > 1
        assert _finite(m["prefill_s"].values()) and _finite(m["decode_ms_per_token"].values())
        assert set(m["prefill_s"]) == {"16", "48"} and min(m["decode_ms_per_token"].values()) > 0


def test_report(runs, tmp_path):
    out = tmp_path / "docs" / "report.md"
    assert main(["report", *map(str, runs.values()), "--out-dir", str(out.parent)]) == 0
    text = out.read_text()
    for heading in ("Loss by token position", "Context ladder", "Inner-loop telemetry", "Associative recall",
                    "Throughput and latency"):  # fmt: skip
        assert f"## {heading}" in text
    links = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert len(links) == 7  # positions, ladder, 3 telemetry, recall, throughput
    assert all((out.parent / link).is_file() for link in links)


def test_report_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out-dir", str(tmp_path)]) == 2
    assert "no result JSON" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing"), "--out-dir", str(tmp_path)]) == 2
