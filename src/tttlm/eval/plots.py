"""The figures of the evaluation commands (matplotlib, Agg backend: no display needed). Each function takes
the JSON-ready result of one command and returns a matplotlib Figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402


def _log_x(ax, base: float = 10) -> None:
    """Log-scale x axis labelled at its major ticks only (minor labels crowd short ranges)."""
    ax.set_xscale("log", base=base)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _finite(xs, ys):
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and y == y and abs(y) != float("inf")]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _by_length(d: dict) -> list[tuple[int, object]]:
    """(length, value) pairs of a dict keyed by lengths (ints, or strings after a JSON round trip), sorted."""
    return sorted((int(k), v) for k, v in d.items())


def plot_positions(contexts: dict) -> plt.Figure:
    """contexts: {L: {"checkpoints": {label: position_curve dict}}}: one panel per context length, loss
    against token position (log scale), one line per checkpoint."""
    fig, axes = plt.subplots(1, len(contexts), figsize=(5.5 * len(contexts), 4), squeeze=False)
    for ax, (L, entry) in zip(axes[0], contexts.items(), strict=True):
        for name, curve in entry["checkpoints"].items():
            ax.plot(*_finite(curve["position"], curve["loss"]), label=name)
        _log_x(ax)
        ax.set_xlabel("token position")
        ax.set_ylabel("next-token loss (nats)")
        ax.set_title(f"context {L}, {entry['num_docs']} documents")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_ladder(checkpoints: dict) -> plt.Figure:
    """checkpoints: {label: {"trained_context": int|None, "lengths": {L: {"perplexity": ...}}}}."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, entry in checkpoints.items():
        pts = _by_length(entry["lengths"])
        line = ax.plot(*_finite([L for L, _ in pts], [v["perplexity"] for _, v in pts]), marker="o", label=name)[0]
        if entry.get("trained_context"):
            ax.axvline(entry["trained_context"], color=line.get_color(), ls=":", alpha=0.7)
    _log_x(ax, base=2)
    ax.set_yscale("log")
    ax.set_xlabel("evaluation length (tokens); dotted: training length")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_telemetry(layers: list[dict]) -> plt.Figure:
    """One column per layer: TTT layers show the three inner losses and the gradient and update norms against
    the token position; Mesa layers show CG iterations and the final residual against the tolerance."""
    n = len(layers)
    fig, axes = plt.subplots(2, n, figsize=(4.5 * n, 6.5), squeeze=False)
    for col, layer in enumerate(layers):
        top, bottom = axes[0, col], axes[1, col]
        title = f"layer {layer['layer']} ({layer['mixer']})"
        if layer["mixer"].startswith("ttt"):
            for key, label in (
                ("loss_init", "W_0"),
                ("loss_before", "before update"),
                ("loss_after", "after update"),
            ):
                top.plot(*_finite(layer["position"], layer[key]), label=label)
            top.set_ylabel("inner loss 1/2||f(k)-v||^2")
            for key, label in (("grad_norm", "|mean grad|"), ("update_norm", "|update|")):
                bottom.plot(*_finite(layer["position"], layer[key]), label=label)
            bottom.set_yscale("log")
            bottom.set_ylabel("norm")
            for ax in (top, bottom):
                _log_x(ax)
                ax.set_xlabel("token position (end of mini-batch)")
        else:
            solves = [s for s in layer["solves"] if s["tolerance"] is not None]
            tols = [s["tolerance"] for s in solves]
            top.plot(tols, [s["iterations"] for s in solves], marker="o")
            top.set_ylabel("CG iterations")
            bottom.plot(*_finite(tols, [s["residual_max"] for s in solves]), marker="o", label="max")
            bottom.plot(*_finite(tols, [s["residual_mean"] for s in solves]), marker="x", label="mean")
            bottom.plot(tols, tols, ls=":", color="gray", label="tolerance")
            bottom.set_yscale("log")
            bottom.set_ylabel("relative residual at stop")
            for ax in (top, bottom):
                _log_x(ax)
                ax.set_xlabel("CG tolerance")
        top.set_title(title)
        for ax in (top, bottom):
            ax.grid(alpha=0.3, which="both")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_recall(best: list[dict]) -> plt.Figure:
    """Best accuracy against the number of pairs, one panel per (width, seq_len), one line per mixer."""
    panels = sorted({(b["width"], b["seq_len"]) for b in best})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (w, L) in zip(axes[0], panels, strict=True):
        rows = [b for b in best if b["width"] == w and b["seq_len"] == L]
        for mixer in sorted({b["mixer"] for b in rows}):
            pts = sorted((b["pairs"], b["accuracy"]) for b in rows if b["mixer"] == mixer)
            ax.plot([p for p, _ in pts], [a for _, a in pts], marker="o", label=mixer)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("key-value pairs")
        ax.set_ylabel("accuracy (best lr)")
        ax.set_title(f"width {w}, length {L}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_throughput(mixers: dict, title: str) -> plt.Figure:
    """Training tokens/s per mixer (a bar per training shape), prefill seconds and decode ms/token against the
    context length."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    names = list(mixers)
    shapes = list(dict.fromkeys(s for m in names for s in mixers[m]["train"]))
    width = 0.8 / max(1, len(shapes))
    for i, shape in enumerate(shapes):
        r = [mixers[m]["train"].get(shape) for m in names]
        tps = [x["tokens_per_s"] if x and "tokens_per_s" in x else 0 for x in r]
        axes[0].bar([j + i * width for j in range(len(names))], tps, width, label=shape)
    axes[0].set_xticks([j + width * (len(shapes) - 1) / 2 for j in range(len(names))], names)
    axes[0].set_ylabel("training tokens / s")
    axes[0].tick_params(axis="x", rotation=30)
    axes[0].legend(fontsize=8)
    for ax, key, ylabel in (
        (axes[1], "prefill_s", "prefill time (s)"),
        (axes[2], "decode_ms_per_token", "decode time per token (ms)"),
    ):
        plotted = False
        for m in names:
            pts = _by_length(mixers[m][key])
            xs, ys = _finite([L for L, _ in pts], [v for _, v in pts])
            plotted |= len(xs) > 0
            ax.plot(xs, ys, marker="o", label=m)
        if not plotted:  # training only (no --contexts)
            ax.set_axis_off()
            continue
        _log_x(ax, base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
