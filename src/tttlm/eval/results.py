"""Result files of the evaluation commands: one JSON per measurement, beside its PNG figure.

Every JSON holds "kind" (the command that wrote it), "figure" (the PNG's file name, in the same folder),
"environment" (device, torch version, date) and the measurement's own fields. Non-finite numbers are written
as null (JSON has no NaN) and counted in "non_finite", so a reader never meets NaN silently.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
from pathlib import Path

import torch


def environment(device: torch.device) -> dict:
    """Where a measurement ran: device name, torch version, UTC time."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _sanitize(obj, counter: list[int]):
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        counter[0] += 1
        return None
    if isinstance(obj, dict):
        return {str(k): _sanitize(v, counter) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v, counter) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _sanitize(obj.tolist(), counter)
    return obj


def write_result(out_dir: str | Path, name: str, kind: str, data: dict, figure=None) -> Path:
    """Writes out_dir/name.json (and out_dir/name.png from the matplotlib `figure`, closed afterwards).

    Returns the JSON path. Non-finite floats become null and their count goes to data["non_finite"].
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counter = [0]
    body = _sanitize(dict(data), counter)
    record = {
        "kind": kind,
        "figure": f"{name}.png" if figure is not None else None,
        **body,
        "non_finite": counter[0],
    }
    if figure is not None:
        save_figure(figure, out / f"{name}.png")
    path = out / f"{name}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def save_figure(figure, path: str | Path) -> None:
    """Writes the matplotlib figure as a PNG at path, then closes it."""
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def _current_layout(record: dict) -> dict:
    """A result written by an earlier version in today's layout: telemetry's "context" is "seq_len"; throughput's
    one training shape ("train_batch" x "train_seq_len", "train_tokens_per_s") is one of "train_shapes"."""
    if record["kind"] == "telemetry" and "seq_len" not in record:
        record["seq_len"] = record.get("context")
    settings = record.get("settings", {})
    if record["kind"] == "throughput" and "train_shapes" not in settings:
        shape = f"{settings['train_batch']}x{settings['train_seq_len']}"
        settings.update(train_shapes=[shape], compile=settings.get("compile"))
        for m in record["mixers"].values():
            m.setdefault("train", {shape: {"tokens_per_s": m.get("train_tokens_per_s"), "mfu": None}})
    return record


def read_results(run_dir: str | Path) -> list[dict]:
    """Every result JSON (with a "kind") directly in run_dir, sorted by file name, in today's layout (results of
    earlier versions converted); each gets "_path"."""
    found = []
    for p in sorted(Path(run_dir).glob("*.json")):
        try:
            record = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict) and "kind" in record:
            record["_path"] = str(p)
            found.append(_current_layout(record))
    return found
