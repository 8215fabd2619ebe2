"""The figures: one colour per mixer in every figure, times in ms, training lengths marked, chance in the recall
plot, and a width that stays readable on a page."""

import matplotlib.colors as mcolors
import pytest

from tttlm.eval import plots
from tttlm.eval.plots import MIXER_COLORS, mixer_of
from tttlm.models import MIXERS


def curve(loss):
    return {"position": [1, 10, 100], "loss": loss, "bins": [[1, 2], [2, 20], [20, 200]], "mean": 5.0,
            "last_decile": 4.0}


def lines_by_label(fig):
    return {line.get_label(): line for ax in fig.axes for line in ax.get_lines()
            if not line.get_label().startswith("_")}


def same(a, b):
    return mcolors.to_hex(a) == mcolors.to_hex(b)


def test_every_mixer_has_its_own_colour():
    assert set(MIXERS) <= set(MIXER_COLORS) and len(set(MIXER_COLORS.values())) == len(MIXER_COLORS)
    assert mixer_of("lm-2k-mamba2-lr1e-3") == "mamba2" and mixer_of("runs/mamba/step-000010") == "mamba"
    assert mixer_of("ttt_mlp/step-000020") == "ttt_mlp" and mixer_of("x", {"mixer": "mesa"}) == "mesa"
    assert mixer_of("my-run") is None


def test_a_mixer_keeps_its_colour_across_figures():
    """The same two runs in a different order, in positions and ladder figures: each mixer's colour never changes;
    a second run of the same mixer gets another line style."""
    names = ["ttt_linear/step-000300", "transformer/step-000160", "ttt_linear-lr1e-2/step-000300"]
    pos = {2048: {"num_docs": 4, "checkpoints": {n: {**curve([6.0, 5.0, 4.0]), "trained_context": 512}
                                                  for n in reversed(names)}}}
    lad = {n: {"trained_context": 512, "lengths": {"512": {"perplexity": 100.0}, "2048": {"perplexity": 90.0}}}
           for n in names}
    for fig in (plots.plot_positions(pos), plots.plot_ladder(lad)):
        got = lines_by_label(fig)
        assert same(got[names[0]].get_color(), MIXER_COLORS["ttt_linear"])
        assert same(got[names[1]].get_color(), MIXER_COLORS["transformer"])
        assert same(got[names[2]].get_color(), MIXER_COLORS["ttt_linear"])
        assert got[names[0]].get_linestyle() != got[names[2]].get_linestyle()
        assert fig.get_size_inches()[0] <= plots.WIDTH


def test_training_length_marked_where_it_is_inside_the_panel():
    pos = {L: {"num_docs": 1, "checkpoints": {"mesa/step-1": {**curve([5.0, 4.0, 3.0]), "trained_context": 512}}}
           for L in (256, 2048)}
    fig = plots.plot_positions(pos)
    for ax, L in zip(fig.axes, (256, 2048), strict=True):
        marks = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
        assert len(marks) == (L > 512)
        if marks:
            assert marks[0].get_xdata()[0] == 512 and same(marks[0].get_color(), MIXER_COLORS["mesa"])


def test_recall_draws_chance():
    from tttlm.eval.recall import chance_accuracy

    best = [{"mixer": m, "width": 64, "seq_len": 64, "pairs": p, "accuracy": a}
            for m, a in (("transformer", 0.5), ("mamba2", 0.01)) for p in (4, 16)]
    assert chance_accuracy(256) == 1 / 128
    fig = plots.plot_recall(best, chance_accuracy(256))
    got = lines_by_label(fig)
    chance = next(line for label, line in got.items() if label.startswith("chance"))
    assert list(chance.get_ydata()) == [1 / 128] * 2
    assert same(got["mamba2"].get_color(), MIXER_COLORS["mamba2"])


def test_throughput_times_are_in_ms():
    mixers = {m: {"train": {"8x2048": {"tokens_per_s": 1e5}}, "prefill_s": {"512": 0.02, "2048": 0.03},
                  "decode_ms_per_token": {"512": 11.0, "2048": 12.0}} for m in ("ttt_linear", "transformer")}
    fig = plots.plot_throughput(mixers, "t")
    prefill, decode = fig.axes[1], fig.axes[2]
    assert "(ms)" in prefill.get_ylabel() and "(ms)" in decode.get_ylabel()
    line = next(line for line in prefill.get_lines() if line.get_label() == "ttt_linear")
    assert list(line.get_ydata()) == pytest.approx([20.0, 30.0])
    bars = fig.axes[0].patches
    assert same(bars[0].get_facecolor(), MIXER_COLORS["ttt_linear"]) and fig.get_size_inches()[0] <= plots.WIDTH


def test_telemetry_of_many_layers_fits_a_page():
    layer = {"mixer": "ttt_linear", "position": [16, 32], "loss_init": [3.0, 3.0], "loss_before": [2.0, 1.5],
             "loss_after": [1.8, 1.4], "grad_norm": [1.0, 0.9]}
    fig = plots.plot_telemetry([{**layer, "layer": i} for i in range(12)])
    width, height = fig.get_size_inches()
    assert len(fig.axes) == 2 and width <= plots.WIDTH and height <= 4.0
