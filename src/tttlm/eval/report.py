"""The Markdown report: every result JSON of the given run directories as tables, with its figure beside."""

from __future__ import annotations

import os
from pathlib import Path

from tttlm.eval.results import read_results

ORDER = ("eval", "positions", "ladder", "telemetry", "recall", "throughput")
TITLES = {
    "eval": "Validation loss",
    "positions": "Loss by token position",
    "ladder": "Context ladder",
    "telemetry": "Inner-loop telemetry",
    "recall": "Associative recall (MQAR)",
    "throughput": "Throughput and latency",
}


def _num(x, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}"


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _by_length(d: dict) -> list[tuple[int, object]]:
    return sorted((int(k), v) for k, v in d.items())


def _eval(r: dict) -> list[str]:
    rows = []
    for name, c in r["checkpoints"].items():
        source = f"all of {c['val_corpus']}" if c.get("val_corpus") else f"{c['corpus']} (held-out split)"
        rows.append([name, c["mixer"], source, c["seq_len"], f"{c['val_tokens']:,d}", _num(c["val_loss"]),
                     _num(c["val_ppl"]), _num(c["unigram_val_loss"])])
    return [f"Loss in nats/token ({r['dtype']}):", ""] + _table(
        ["checkpoint", "mixer", "validation documents", "seq len", "tokens", "loss", "perplexity", "unigram loss"],
        rows)


def _positions(r: dict) -> list[str]:
    out = []
    for L, entry in _by_length(r["contexts"]):
        marks = [p for p in (1, 10, 100, 1000, 10000, 100000) if p < L]
        rows = []
        for name, c in entry["checkpoints"].items():
            at = []
            for p in marks:  # the bin holding position p
                hit = [loss for (a, b), loss in zip(c["bins"], c["loss"], strict=True) if a <= p < b]
                at.append(_num(hit[0] if hit else None))
            rows.append([name, _num(c.get("trained_context")), _num(c["mean"]), _num(c["last_decile"]), *at])
        out.append(f"Context {L}, {entry['num_docs']} documents; loss in nats (at a position: its log bin's mean):")
        out.append("")
        out += _table(["checkpoint", "trained at", "mean", "last tenth", *[f"pos {p}" for p in marks]], rows)
    return out


def _ladder(r: dict) -> list[str]:
    lengths = sorted({int(L) for c in r["checkpoints"].values() for L in c["lengths"]})
    rows = []
    for name, c in r["checkpoints"].items():
        ppl = {int(L): v["perplexity"] for L, v in c["lengths"].items()}
        rows.append([name, _num(c.get("trained_context")), _num(c["num_docs"]), *[_num(ppl.get(L)) for L in lengths]])
    return ["Perplexity at each evaluation length:", ""] + _table(
        ["checkpoint", "trained at", "docs", *[f"ppl@{L}" for L in lengths]], rows
    )


def _telemetry(r: dict) -> list[str]:
    out = [
        f"Checkpoint {r['checkpoint']} ({r['mixer']}), {r['num_docs']} documents of {r['seq_len']} tokens.",
        "",
    ]
    ttt = [layer for layer in r["layers"] if layer["mixer"].startswith("ttt")]
    mesa = [layer for layer in r["layers"] if layer["mixer"] == "mesa"]
    if ttt:
        rows = []
        for layer in ttt:
            avg = {k: _mean(layer[k]) for k in ("loss_init", "loss_before", "loss_after", "grad_norm")}
            rows.append([
                layer["layer"], _num(avg["loss_init"]), _num(avg["loss_before"]), _num(avg["loss_after"]),
                _num(avg["grad_norm"]), _num(sum(layer["non_finite"].values())),
                _num(layer["first_non_finite_minibatch"]), _num(layer["max_abs_diff_vs_op"], 2),
            ])  # fmt: skip
        out += [
            "TTT inner loss of each mini-batch under W_0, before and after its update (means over mini-batches):",
            "",
        ]
        out += _table(
            ["layer", "loss W_0", "loss before", "loss after", "mean grad norm", "non-finite", "first bad mb",
             "re-run vs op"],
            rows,
        )  # fmt: skip
    if mesa:
        tols = [s["tolerance"] for s in mesa[0]["solves"] if s["tolerance"] is not None]
        rows = []
        for layer in mesa:
            by_tol = {s["tolerance"]: s for s in layer["solves"]}
            capped = by_tol.get(None, {})
            rows.append(
                [
                    layer["layer"],
                    *[by_tol[t]["iterations"] for t in tols],
                    _num(capped.get("residual_max"), 2),
                ]
            )
        out += [f"Mesa CG iterations to reach each relative tolerance (at most {mesa[0]['max_iter']}):", ""]
        out += _table(["layer", *[f"tol {t:g}" for t in tols], f"residual after {mesa[0]['max_iter']}"], rows)
    return out


def _recall(r: dict) -> list[str]:
    best = r["best"]
    cols = sorted({(b["width"], b["seq_len"], b["pairs"]) for b in best})
    mixers = sorted({b["mixer"] for b in best})
    cell = {(b["mixer"], b["width"], b["seq_len"], b["pairs"]): b for b in best}
    rows = []
    for m in mixers:
        row = [m]
        for c in cols:
            b = cell.get((m, *c))
            row.append("n/a" if b is None else f"{b['accuracy']:.3f} (lr {b['lr']:g})")
        rows.append(row)
    s = r["settings"]
    head = (
        f"Best accuracy over the learning-rate sweep; {s['steps']} steps of {s['batch_size']} sequences, "
        f"vocabulary {s['vocab_size']}, {s['layers']} layers, head dim {s['head_dim']}:"
    )
    if r.get("chance") is not None:
        head = head[:-1] + f"; chance (a uniform guess among the values) {r['chance']:.3g}:"
    if not r.get("complete", True):
        head += f" **(sweep cut short: {len(r['runs'])} runs finished)**"
    return [head, ""] + _table(["mixer", *[f"w{w} L{L} P{P}" for w, L, P in cols]], rows)


def _throughput(r: dict) -> list[str]:
    s = r["settings"]
    lengths = sorted({int(L) for m in r["mixers"].values() for L in m["prefill_s"]})
    shapes = list(s["train_shapes"])
    rows = []
    for name, m in r["mixers"].items():
        pre = {int(L): v for L, v in m["prefill_s"].items()}
        dec = {int(L): v for L, v in m["decode_ms_per_token"].items()}
        train = []
        for shape in shapes:
            t = m["train"].get(shape)
            ok = t is not None and "tokens_per_s" in t
            train += [_num(round(t["tokens_per_s"]) if ok else None),
                      _num(100 * t["mfu"] if ok and t["mfu"] is not None else None, 1)]
        rows.append([
            name, f"{m['params'] / 1e6:.1f}M", *train,
            *[_num(None if pre.get(L) is None else 1e3 * pre[L], 3) for L in lengths],
            *[_num(dec.get(L), 3) for L in lengths],
        ])  # fmt: skip
    compiled = "not recorded" if s["compile"] is None else s["compile"]
    head = (
        f"{s['size']} models, {s['dtype']}, compiled: {compiled}; training tokens/s and model FLOPs "
        f"utilisation (%) at batch x length {', '.join(shapes)}; prefill and decode at batch 1 "
        f"({s['new_tokens']} decoded tokens); n/a: out of memory or failed:"
    )
    header = ["mixer", "params", *[c for sh in shapes for c in (f"train tok/s {sh}", f"MFU % {sh}")],
              *[f"prefill ms @{L}" for L in lengths], *[f"decode ms/tok @{L}" for L in lengths]]  # fmt: skip
    return [head, ""] + _table(header, rows)


SECTIONS = {
    "eval": _eval,
    "positions": _positions,
    "ladder": _ladder,
    "telemetry": _telemetry,
    "recall": _recall,
    "throughput": _throughput,
}


def build_report(run_dirs: list[str | Path], out_path: str | Path, title: str = "tttlm evaluation report") -> str:
    """The Markdown text gathering every result of run_dirs; figure links are relative to out_path's folder.

    A FileNotFoundError for a missing directory, a ValueError when none holds a result.
    """
    results = []
    for d in run_dirs:
        if not Path(d).is_dir():
            raise FileNotFoundError(f"run directory {d} does not exist")
        results += read_results(d)
    if not results:
        raise ValueError(f"no result JSON (written by eval, positions, ladder, telemetry, recall, throughput) in "
                         f"{run_dirs}")
    base = Path(out_path).resolve().parent
    lines = [f"# {title}", "", "Gathered from: " + ", ".join(f"`{d}`" for d in run_dirs), ""]
    for kind in ORDER:
        found = [r for r in results if r["kind"] == kind]
        if not found:
            continue
        lines += [f"## {TITLES[kind]}", ""]
        for r in found:
            env = r.get("environment", {})
            lines += [
                f"`{os.path.relpath(r['_path'], base)}` ({env.get('device_name', '?')}, {env.get('date', '?')})",
                "",
            ]
            lines += SECTIONS[kind](r)
            if r.get("non_finite"):
                lines += [
                    f"**Warning: {r['non_finite']} non-finite values in this result (written as null).**",
                    "",
                ]
            if r.get("figure"):
                fig = os.path.relpath(Path(r["_path"]).parent / r["figure"], base)
                lines += [f"![{TITLES[kind]}]({fig})", ""]
    return "\n".join(lines)
