"""`tttlm eval` writes eval.json like the other evaluation commands, and `tttlm report` gathers it."""

import json
import math

from tttlm.cli import main


def test_eval_writes_json_that_report_gathers(tmp_path, checkpoint, capsys):
    ttt, attn = checkpoint("ttt_linear"), checkpoint("transformer")
    out = tmp_path / "out"
    argv = ["eval", str(ttt), str(attn), "--eval-batches", "2", "--batch-size", "4", "--micro-batch-size", "3",
            "--device", "cpu", "--out-dir", str(out)]
    assert main(argv) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if "validation loss" in line]
    data = json.loads((out / "eval.json").read_text())
    assert data["kind"] == "eval" and data["non_finite"] == 0 and data["dtype"] == "float32"
    assert list(data["checkpoints"]) == ["ttt_linear-run/step-000010", "transformer-run/step-000010"]
    for line, (name, r) in zip(printed, data["checkpoints"].items(), strict=True):
        assert f"validation loss {r['val_loss']:.4f}" in line and name.split("/")[0] in line
        assert r["mixer"] == name.split("-")[0] and (r["seq_len"], r["batch_size"], r["eval_batches"]) == (64, 4, 2)
        assert r["val_tokens"] == 2 * 4 * 63  # whole documents in windows of 64: every token but the last a target
        assert math.isclose(r["val_ppl"], math.exp(r["val_loss"])) and 4 < r["val_loss"] < 8  # untrained: ~ln 300
    assert main(["report", str(out), "--out-dir", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "## Validation loss" in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and "-run/step-000010" in line]
    assert len(rows) == 2 and f"{data['checkpoints']['ttt_linear-run/step-000010']['val_loss']:.4g}" in rows[0]
