"""Training metrics: one JSON object per line in out_dir/metrics.jsonl, mirrored to TensorBoard (out_dir/tb) and,
when asked, to Weights & Biases (its files in out_dir/wandb)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file (a run directory or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Appends records {"step": ..., name: value, ...} on the main process; a no-op elsewhere.

    resume_step: when resuming, records after this step (written by the interrupted run after its last
    checkpoint) are dropped, so the file reads as one uninterrupted run; None starts a fresh file.
    wandb: the run's settings, to also log to a Weights & Biases run of project settings["wandb_project"] named
    after out_dir (a resumed run continues the same one: its id is kept in out_dir/wandb-run-id); None: no W&B.
    """

    def __init__(self, out_dir: str | Path, enabled: bool, tensorboard: bool, resume_step: int | None,
                 wandb: dict | None = None):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        if wandb is not None:
            self.wandb = _wandb_run(Path(out_dir), wandb, resume_step is not None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if resume_step is not None and r["step"] <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("tensorboard is not installed: metrics go to metrics.jsonl only (pip install tensorboard)")
            else:
                # TensorBoard hides the earlier files' events from purge_step on: the steps after the checkpoint
                purge = None if resume_step is None else resume_step + 1
                self.tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=purge)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run(out: Path, settings: dict, resume: bool):
    import wandb

    id_file = out / "wandb-run-id"
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else wandb.util.generate_id()
    id_file.write_text(run_id + "\n")
    return wandb.init(project=settings["wandb_project"], name=out.name, id=run_id, resume="allow",
                      dir=str(out), config=settings)
