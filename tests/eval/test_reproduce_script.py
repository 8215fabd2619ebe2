"""docs/figures/reproduce.sh runs end to end (tiny settings, CPU) with today's spellings and writes the layout of
docs/figures and a report over it."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "figures" / "reproduce.sh"


def test_reproduce_script_writes_the_docs_layout(tmp_path, corpus):
    run = tmp_path / "run"
    env = dict(os.environ, RUN=str(run), CORPUS=str(corpus), VOCAB="300", MIXERS="ttt_linear",
               SIZE="tiny", SEQ="64", STEPS="4", BATCH="2", SAVE_EVERY="2", TRAIN_LIMIT="240", RECALL_LIMIT="240",
               CONTEXTS="128", LONG="256", LADDER="64 128", TEL_CONTEXT="64", OMP_NUM_THREADS="1",
               TTTLM=f"{sys.executable} -m tttlm",
               RECALL="--widths 16 --seq-len 16 --pairs 2 --lr 1e-2 --steps 2 --batch-size 4 --vocab-size 32 "
                      "--eval-examples 8 --device cpu",
               SPEED="--seq-len 16 --train-shapes 1x32 --new-tokens 2 --repeats 1 --warmup 1 --vocab-size 128 "
                     "--device cpu")
    out = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    logs = {p.name: p.read_text() for p in (run / "logs").glob("*.log")}
    assert out.returncode == 0 and "ended with status" not in out.stdout, (out.stdout, logs)
    for name, text in logs.items():
        assert "Traceback" not in text and "deprecated" not in text, (name, text)
    for f in ("lm/positions.json", "lm/ladder.json", "lm/long/positions.json", "recall/recall.json",
              "throughput/throughput.json", "lm/telemetry_ttt_linear_step-000004.json"):
        assert (run / f).is_file(), f
    report = (run / "report.md").read_text()
    for heading in ("Loss by token position", "Context ladder", "Inner-loop telemetry", "Associative recall",
                    "Throughput and latency"):
        assert f"## {heading}" in report
