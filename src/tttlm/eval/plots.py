"""The figures of the evaluation commands (matplotlib, Agg backend: no display needed). Each function takes
the JSON-ready result of one command and returns a matplotlib Figure.

Every figure draws a mixer in its own colour (`MIXER_COLORS`, the one mapping), times in milliseconds, and a
model's training length as a dotted vertical line in its colour where lengths are on the x axis. Figures are
sized to stay readable at a page's width (at most 11 inches wide, panels wrapped into rows).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

MIXER_COLORS = {
    "transformer": "#1f77b4",
    "mamba2": "#ff7f0e",
    "ttt_linear": "#2ca02c",
    "ttt_mlp": "#d62728",
    "mesa": "#9467bd",
    "mamba": "#8c564b",
    "nanogpt": "#7f7f7f",
}
OTHER_COLOR = "#17becf"
_STYLES = ("-", "--", "-.", (0, (3, 1, 1, 1, 1, 1)))  # the 2nd, 3rd, ... run of one mixer in a figure
WIDTH = 11.0  # inches: the widest figure


def mixer_of(label: str, entry: dict | None = None) -> str | None:
    """The mixer of a curve: its result's "mixer" field, else the mixer named in its label (a run directory
    such as "ttt_linear/step-000300" or "lm-2k-mesa-lr1e-3"), else None."""
    if entry and entry.get("mixer"):
        return entry["mixer"]
    for name in sorted(MIXER_COLORS, key=len, reverse=True):  # ttt_linear before mamba2 before mamba
        if name in label:
            return name
    return None


def mixer_color(mixer: str | None) -> str:
    return MIXER_COLORS.get(mixer, OTHER_COLOR)


class _Styles:
    """Colour by mixer; a second run of the same mixer in one figure gets the next line style."""

    def __init__(self):
        self.seen: dict[str | None, list[str]] = {}

    def __call__(self, label: str, entry: dict | None = None) -> dict:
        mixer = mixer_of(label, entry)
        labels = self.seen.setdefault(mixer, [])
        if label not in labels:
            labels.append(label)
        return {"color": mixer_color(mixer), "ls": _STYLES[labels.index(label) % len(_STYLES)]}


def _log_x(ax, base: float = 10) -> None:
    """Log-scale x axis labelled at its major ticks only (minor labels crowd short ranges)."""
    ax.set_xscale("log", base=base)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _finite(xs, ys):
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and y == y and abs(y) != float("inf")]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _grid(panels: int, height: float = 3.6, columns: int = 3):
    """A figure of `panels` panels, at most `columns` per row, WIDTH wide: (fig, flat list of the axes used)."""
    cols = min(columns, panels)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(WIDTH if cols > 1 else WIDTH / 2, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[panels:]:
        ax.set_axis_off()
    return fig, flat[:panels]


def _trained_at(ax, length, color, within: float) -> None:
    """A dotted vertical line at a training length inside the panel's x range (up to `within`)."""
    if length and length < within:
        ax.axvline(length, color=color, ls=":", lw=1.2, alpha=0.8)


def _by_length(d: dict) -> list[tuple[int, object]]:
    """(length, value) pairs of a dict keyed by lengths (ints, or strings after a JSON round trip), sorted."""
    return sorted((int(k), v) for k, v in d.items())


def plot_positions(contexts: dict) -> plt.Figure:
    """contexts: {L: {"num_docs", "checkpoints": {label: position_curve dict (+ "mixer", "trained_context")}}}:
    one panel per context length, loss against token position (log scale), one line per checkpoint, its
    training length dotted."""
    fig, axes = _grid(len(contexts), columns=2)
    style = _Styles()
    for ax, (L, entry) in zip(axes, contexts.items(), strict=True):
        for name, curve in entry["checkpoints"].items():
            st = style(name, curve)
            ax.plot(*_finite(curve["position"], curve["loss"]), label=name, **st)
            _trained_at(ax, curve.get("trained_context"), st["color"], int(L))
        _log_x(ax)
        ax.set_xlabel("token position (dotted: training length)")
        ax.set_ylabel("next-token loss (nats)")
        ax.set_title(f"context {L}, {entry['num_docs']} documents")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_ladder(checkpoints: dict) -> plt.Figure:
    """checkpoints: {label: {"mixer", "trained_context": int|None, "lengths": {L: {"perplexity": ...}}}}."""
    fig, ax = plt.subplots(figsize=(WIDTH / 2 + 1, 4))
    style = _Styles()
    longest = max((L for e in checkpoints.values() for L, _ in _by_length(e["lengths"])), default=0)
    for name, entry in checkpoints.items():
        pts = _by_length(entry["lengths"])
        st = style(name, entry)
        ax.plot(*_finite([L for L, _ in pts], [v["perplexity"] for _, v in pts]), marker="o", label=name, **st)
        _trained_at(ax, entry.get("trained_context"), st["color"], longest + 1)
    _log_x(ax, base=2)
    ax.set_yscale("log")
    ax.set_xlabel("evaluation length (tokens); dotted: training length")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_telemetry(layers: list[dict]) -> plt.Figure:
    """Every layer in one pair of panels, a colour per layer. TTT layers: the inner loss of each mini-batch
    before its update (solid), after it (dashed) and under W_0 (dotted), and the inner gradient norm, against
    the token position. Mesa layers: CG iterations and the largest relative residual at the stop against the
    tolerance."""
    ttt = [layer for layer in layers if layer["mixer"].startswith("ttt")]
    mesa = [layer for layer in layers if not layer["mixer"].startswith("ttt")]
    fig, axes = _grid(2 * (bool(ttt) + bool(mesa)), height=3.8, columns=2)
    cmap = plt.get_cmap("viridis")

    def color(i: int, n: int):
        return cmap(0.9 * i / max(1, n - 1))

    if ttt:
        loss, norm = axes[0], axes[1]
        for i, layer in enumerate(ttt):
            c = color(i, len(ttt))
            loss.plot(*_finite(layer["position"], layer["loss_before"]), color=c, label=f"layer {layer['layer']}")
            loss.plot(*_finite(layer["position"], layer["loss_after"]), color=c, ls="--")
            loss.plot(*_finite(layer["position"], layer["loss_init"]), color=c, ls=":", lw=1)
            norm.plot(*_finite(layer["position"], layer["grad_norm"]), color=c, label=f"layer {layer['layer']}")
        loss.set_yscale("log")
        loss.set_ylabel("inner loss 1/2||f(k)-v||^2")
        loss.set_title(f"{ttt[0]['mixer']}: before update (solid), after (dashed), W_0 (dotted)", fontsize=9)
        norm.set_yscale("log")
        norm.set_ylabel("inner gradient norm")
        norm.set_title(f"{ttt[0]['mixer']}: mean inner gradient of each mini-batch", fontsize=9)
        for ax in (loss, norm):
            _log_x(ax)
            ax.set_xlabel("token position (end of mini-batch)")
    if mesa:
        its, res = axes[-2], axes[-1]
        for i, layer in enumerate(mesa):
            c = color(i, len(mesa))
            solves = [s for s in layer["solves"] if s["tolerance"] is not None]
            tols = [s["tolerance"] for s in solves]
            its.plot(tols, [s["iterations"] for s in solves], marker="o", color=c, label=f"layer {layer['layer']}")
            res.plot(*_finite(tols, [s["residual_max"] for s in solves]), marker="o", color=c,
                     label=f"layer {layer['layer']}")
        tols = sorted({s["tolerance"] for layer in mesa for s in layer["solves"] if s["tolerance"] is not None})
        res.plot(tols, tols, ls=":", color="gray", label="tolerance")
        its.set_ylabel("CG iterations")
        its.set_title("mesa: CG iterations to reach each tolerance", fontsize=9)
        res.set_yscale("log")
        res.set_ylabel("largest relative residual at the stop")
        res.set_title("mesa: residual at the stop", fontsize=9)
        for ax in (its, res):
            _log_x(ax)
            ax.set_xlabel("CG tolerance")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_recall(best: list[dict], chance: float | None = None) -> plt.Figure:
    """Best accuracy against the number of pairs, one panel per (width, seq_len), one line per mixer; the
    accuracy of chance (`tttlm.eval.recall.chance_accuracy`), when given, dotted."""
    panels = sorted({(b["width"], b["seq_len"]) for b in best})
    fig, axes = _grid(len(panels))
    for ax, (w, L) in zip(axes, panels, strict=True):
        rows = [b for b in best if b["width"] == w and b["seq_len"] == L]
        for mixer in sorted({b["mixer"] for b in rows}):
            pts = sorted((b["pairs"], b["accuracy"]) for b in rows if b["mixer"] == mixer)
            ax.plot([p for p, _ in pts], [a for _, a in pts], marker="o", label=mixer, color=mixer_color(mixer))
        if chance is not None:
            ax.axhline(chance, color="gray", ls=":", label=f"chance ({chance:.2g})")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("key-value pairs")
        ax.set_ylabel("accuracy (best lr)")
        ax.set_title(f"width {w}, length {L}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def figure_of(result: dict) -> plt.Figure | None:
    """The figure of a result JSON (tttlm.eval.results) as its command draws it, from the JSON alone; None for
    a kind without one."""
    kind = result["kind"]
    if kind == "positions":
        return plot_positions(result["contexts"])
    if kind == "ladder":
        return plot_ladder(result["checkpoints"])
    if kind == "telemetry":
        return plot_telemetry(result["layers"])
    if kind == "recall":
        from tttlm.eval.recall import chance_accuracy

        return plot_recall(result["best"], result.get("chance") or chance_accuracy(result["settings"]["vocab_size"]))
    if kind == "throughput":
        s, env = result["settings"], result["environment"]
        return plot_throughput(result["mixers"], f"{s['size']} models, {s['dtype']}, {env['device_name']}")
    return None


def plot_throughput(mixers: dict, title: str) -> plt.Figure:
    """Training tokens/s per mixer (a bar per training shape), prefill ms and decode ms/token against the
    context length."""
    fig, axes = _grid(3)
    names = list(mixers)
    shapes = list(dict.fromkeys(s for m in names for s in mixers[m]["train"]))
    width = 0.8 / max(1, len(shapes))
    hatches = ("", "//", "..", "xx")
    for i, shape in enumerate(shapes):
        r = [mixers[m]["train"].get(shape) for m in names]
        tps = [x["tokens_per_s"] if x and "tokens_per_s" in x else 0 for x in r]
        axes[0].bar([j + i * width for j in range(len(names))], tps, width, label=shape,
                    color=[mixer_color(m) for m in names], hatch=hatches[i % len(hatches)], edgecolor="white")
    axes[0].set_xticks([j + width * (len(shapes) - 1) / 2 for j in range(len(names))], names)
    axes[0].set_ylabel("training tokens / s")
    axes[0].tick_params(axis="x", rotation=30)
    if len(shapes) > 1:
        axes[0].legend(fontsize=8, title="batch x length (hatch)", title_fontsize=8)
    else:
        axes[0].set_title(f"batch x length {shapes[0]}" if shapes else "", fontsize=9)
    for ax, key, scale, ylabel in (
        (axes[1], "prefill_s", 1e3, "prefill time (ms)"),
        (axes[2], "decode_ms_per_token", 1.0, "decode time per token (ms)"),
    ):
        plotted = False
        for m in names:
            pts = _by_length(mixers[m][key])
            xs, ys = _finite([L for L, _ in pts], [None if v is None else scale * v for _, v in pts])
            plotted |= len(xs) > 0
            ax.plot(xs, ys, marker="o", label=m, color=mixer_color(m))
        if not plotted:  # training only (no --seq-len)
            ax.set_axis_off()
            continue
        _log_x(ax, base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
