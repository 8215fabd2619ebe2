"""The tables and figures of docs/results.md, from what `tttlm experiment` wrote under one results folder
(OUT/<run>/experiment.json and the evaluations' JSON beside it). `tttlm experiment --summary OUT` writes
OUT/summary.md and the figures it shows (summary-*.png); nothing here is measured again.

Language-model runs are grouped by training context; within one, the run of each mixer with the lowest
validation loss (the best of its learning-rate sweep) stands for the mixer in the figures and in the
position, ladder and telemetry tables.
"""

from __future__ import annotations

import json
from pathlib import Path

from tttlm.eval.report import _num, _table


def read_runs(root: str | Path) -> list[dict]:
    """Every OUT/<run>/experiment.json under root, sorted by name; each gets "_dir"."""
    runs = []
    for f in sorted(Path(root).glob("*/experiment.json")):
        r = json.loads(f.read_text())
        r["_dir"] = f.parent
        runs.append(r)
    return runs


def _loss(r: dict) -> float | None:
    return (r.get("validation") or {}).get("loss")


def best_runs(runs: list[dict]) -> list[dict]:
    """Of the language-model runs, the one with the lowest validation loss per (training context, mixer)."""
    best: dict[tuple, dict] = {}
    for r in runs:
        if r["experiment"] != "lm" or _loss(r) is None:
            continue
        key = (r["train"]["seq_len"], r["model"]["mixer"])
        if key not in best or _loss(r) < _loss(best[key]):
            best[key] = r
    return [best[k] for k in sorted(best)]


def _json(r: dict, pattern: str) -> dict | None:
    found = sorted(r["_dir"].glob(pattern))
    return json.loads(found[0].read_text()) if found else None


def _lm_table(runs: list[dict], best: list[dict]) -> list[str]:
    header = ["run", "mixer", "params (M)", "lr", "tokens (M)", "val loss @2k", "ppl", "train tok/s", "train min",
              "status", "command"]
    rows = []
    for r in runs:
        t, v = r["training"], r.get("validation") or {}
        name = f"**{r['name']}**" if r in best else r["name"]
        lr = _num(r["train"]["lr"], 2) + (f" (best of {r['train']['lr_chosen_from']}'s sweep)"
                                          if r["train"].get("lr_chosen_from") else "")
        rows.append([name, r["model"]["mixer"], f"{r['model']['parameters'] / 1e6:.2f}", lr,
                     _num(t["tokens"] and t["tokens"] / 1e6, 4), _num(v.get("loss")), _num(v.get("perplexity")),
                     _num(t["tokens_per_s"] and round(t["tokens_per_s"])), f"{t['seconds'] / 60:.1f}", r["status"],
                     f"`{r['command']}`"])
    return _table(header, rows)


def _positions(best: list[dict]) -> tuple[list[str], dict]:
    contexts: dict[int, dict] = {}
    rows = []
    for r in best:
        p = _json(r, "positions.json")
        if p is None:
            continue
        cells = {}
        for L, entry in p["contexts"].items():
            for curve in entry["checkpoints"].values():
                contexts.setdefault(int(L), {"num_docs": entry["num_docs"], "checkpoints": {}})
                contexts[int(L)]["checkpoints"][r["name"]] = curve
                cells[int(L)] = (curve["mean"], curve["last_decile"], entry["num_docs"])
        rows.append((r["name"], r["train"]["seq_len"], cells))
    lengths = sorted(contexts)
    header = ["run", "trained at"] + [f"{h} @{L}" for L in lengths for h in ("mean", "last tenth")]
    table = [[n, ctx] + [_num(c.get(L, (None,) * 3)[i]) for L in lengths for i in (0, 1)] for n, ctx, c in rows]
    docs = ", ".join(f"{contexts[L]['num_docs']} of {L}" for L in lengths)
    return [f"Held-out documents per context: {docs}.", ""] + _table(header, table), dict(sorted(contexts.items()))


def _ladder(best: list[dict]) -> list[str]:
    rows, lengths = [], set()
    for r in best:
        d = _json(r, "ladder.json")
        if d is None:
            continue
        for c in d["checkpoints"].values():
            ppl = {int(L): v["perplexity"] for L, v in c["lengths"].items()}
            lengths |= set(ppl)
            rows.append((r["name"], r["train"]["seq_len"], c["num_docs"], ppl))
    lengths = sorted(lengths)
    return _table(["run", "trained at", "docs", *[f"ppl@{L}" for L in lengths]],
                  [[n, ctx, k, *[_num(p.get(L)) for L in lengths]] for n, ctx, k, p in rows])


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _telemetry(best: list[dict]) -> list[str]:
    ttt, mesa = [], []
    for r in best:
        d = _json(r, "telemetry_*.json")
        if d is None:
            continue
        for layer in d["layers"]:
            if layer["mixer"] == "mesa":
                its = {s["tolerance"]: s["iterations"] for s in layer["solves"]}
                mesa.append([r["name"], layer["layer"], *[_num(its.get(t)) for t in (1e-3, 1e-4, 1e-5)]])
                continue
            pairs = [(b, a) for b, a in zip(layer["loss_before"], layer["loss_after"], strict=True)
                     if a is not None and b is not None]
            lowered = sum(a < b for b, a in pairs) / len(pairs) if pairs else None
            ttt.append([r["name"], layer["layer"], _num(_mean(layer["loss_init"])), _num(_mean(layer["loss_before"])),
                        _num(_mean(layer["loss_after"])), _num(lowered and round(100 * lowered, 1)),
                        sum(layer["non_finite"].values())])
    out = []
    if ttt:
        out += ["TTT layers: the inner loss (mean over mini-batches) under W_0, before and after each mini-batch's "
                "update, and the share of mini-batches whose update lowered their own loss:", ""]
        out += _table(["run", "layer", "loss W_0", "before", "after", "% lowered", "non-finite"], ttt)
    if mesa:
        out += ["Mesa layers: CG iterations to reach each relative residual (the worst over the call's tokens):", ""]
        out += _table(["run", "layer", "1e-3", "1e-4", "1e-5"], mesa)
    return out


def _recall(runs: list[dict]) -> tuple[list[str], list[dict], float | None]:
    """The table of the best MQAR accuracies, those runs, and the accuracy of chance (of the first sweep)."""
    best, complete, chance = [], True, None
    for r in runs:
        if r["experiment"] == "recall" and (d := _json(r, "recall.json")) is not None:
            best += d["best"]
            complete &= bool(d.get("complete", True))
            chance = chance if chance is not None else d.get("chance")
    if not best:
        return [], [], None
    cols = sorted({(b["width"], b["seq_len"], b["pairs"]) for b in best})
    acc = {(b["mixer"], b["width"], b["seq_len"], b["pairs"]): b for b in best}
    mixers = list(dict.fromkeys(b["mixer"] for b in best))
    rows = [[m, *[_num(acc[(m, *c)]["accuracy"], 3) if (m, *c) in acc else "not run" for c in cols]] for m in mixers]
    note = [] if complete else ["Some sweeps stopped at their time limit: a missing cell was not run.", ""]
    return note + _table(["mixer", *[f"w{w} L{L} P{P}" for w, L, P in cols]], rows), best, chance


def _curves(best: list[dict]):
    import matplotlib.pyplot as plt

    from tttlm.eval.plots import mixer_color

    contexts = sorted({r["train"]["seq_len"] for r in best})
    fig, axes = plt.subplots(1, len(contexts), figsize=(5.5 * len(contexts), 4), squeeze=False)
    for ax, ctx in zip(axes[0], contexts, strict=True):
        for r in best:
            if r["train"]["seq_len"] == ctx and r["training"]["val_curve"]:
                c = r["training"]["val_curve"]
                ax.plot([p["tokens"] / 1e6 for p in c], [p["val_loss"] for p in c], marker="o", label=r["name"],
                        color=mixer_color(r["model"]["mixer"]))
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel(f"validation loss at {ctx} (nats)")
        ax.set_title(f"trained at {ctx}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def summarize(root: str | Path) -> Path:
    """Writes root/summary.md (and its figures beside it) from the results under root; returns its path."""
    import matplotlib.pyplot as plt

    from tttlm.eval.plots import plot_positions, plot_recall

    root = Path(root)
    runs = read_runs(root)
    if not runs:
        raise FileNotFoundError(f"no experiment results (*/experiment.json) under {root}")
    best = best_runs(runs)
    lines = [f"# Experiment results under {root}", "",
             "Bold: the best run of each mixer's learning-rate sweep at each training context.", ""]

    def figure(fig, name: str) -> None:
        fig.savefig(root / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
        lines.extend([f"![{name}]({name})", ""])

    for ctx in sorted({r["train"]["seq_len"] for r in runs if r["experiment"] == "lm"}):
        lines += [f"## Language models trained at {ctx}", ""]
        lines += _lm_table([r for r in runs if r["experiment"] == "lm" and r["train"]["seq_len"] == ctx], best)
    if any(r["training"]["val_curve"] for r in best):
        lines += ["## Validation loss against training tokens", ""]
        figure(_curves(best), "summary-curves.png")
    table, contexts = _positions(best)
    if contexts:
        lines += ["## Loss by token position", ""] + table
        figure(plot_positions(contexts), "summary-positions.png")
    ladder = _ladder(best)
    if len(ladder) > 3:
        lines += ["## Context ladder (perplexity)", ""] + ladder
    telemetry = _telemetry(best)
    if telemetry:
        lines += ["## Inner-loop telemetry", ""] + telemetry
    recall, recall_best, chance = _recall(runs)
    if recall:
        lines += ["## MQAR: best accuracy over the learning rates", ""] + recall
        figure(plot_recall(recall_best, chance), "summary-recall.png")
    path = root / "summary.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
