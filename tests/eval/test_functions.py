"""The evaluation functions on tensors: MQAR examples, position bins and losses, inner-loop telemetry."""

import math

import pytest
import torch

import tttlm
from tttlm.eval.positions import ladder, log_bins, position_curve, token_losses
from tttlm.eval.recall import mqar_accuracy, mqar_batch
from tttlm.eval.telemetry import model_telemetry


def test_mqar_batch_layout():
    V, L, P = 41, 40, 6
    ids, labels = mqar_batch(64, L, P, V, torch.Generator().manual_seed(3))
    half = (V - 1) // 2
    for x, y in zip(ids.tolist(), labels.tolist(), strict=True):
        keys, values = x[0 : 2 * P : 2], x[1 : 2 * P : 2]
        assert len(set(keys)) == P and len(set(values)) == P  # drawn without replacement
        assert all(1 <= k <= half for k in keys) and all(half < v < V for v in values)
        answers = [t for t, lab in enumerate(y) if lab != -100]
        assert len(answers) == P and min(answers) > 2 * P  # every key asked once, after the pairs
        table = dict(zip(keys, values, strict=True))
        assert sorted(x[t - 1] for t in answers) == sorted(keys)
        for t in answers:
            assert y[t] == x[t] == table[x[t - 1]]
        assert sum(v != 0 for v in x) == 4 * P  # the rest is filler
    with pytest.raises(ValueError, match="seq_len"):
        mqar_batch(1, 4 * P - 1, P, V)
    with pytest.raises(ValueError, match="num_pairs"):
        mqar_batch(1, 400, half + 1, V)


class _Oracle(torch.nn.Module):
    """Predicts each key's value by looking it up in the pairs (a perfect MQAR model) unless told to miss."""

    def __init__(self, vocab: int, pairs: int, miss: bool):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.pairs, self.miss = vocab, pairs, miss

    def forward(self, input_ids):
        B, L = input_ids.shape
        logits = torch.zeros(B, L, self.vocab)
        for b in range(B):
            x = input_ids[b].tolist()
            table = dict(zip(x[0 : 2 * self.pairs : 2], x[1 : 2 * self.pairs : 2], strict=True))
            for t, tok in enumerate(x):
                if tok in table:
                    logits[b, t, (table[tok] + self.miss) % self.vocab] = 1.0
        return type("Out", (), {"logits": logits})


def test_mqar_accuracy_counts_answers_only():
    ids, labels = mqar_batch(8, 32, 4, 31, torch.Generator().manual_seed(0))
    assert mqar_accuracy(_Oracle(31, 4, miss=False), ids, labels, batch_size=3) == 1.0
    assert mqar_accuracy(_Oracle(31, 4, miss=True), ids, labels) == 0.0


def test_log_bins_cover_every_position_once():
    for n in (1, 2, 9, 100, 32767):
        bins = log_bins(n)
        assert bins[0][0] == 1 and bins[-1][1] == n + 1
        assert all(a < b and b == a2 for (a, b), (a2, _) in zip(bins, bins[1:] + [(n + 1, None)], strict=True))
    assert log_bins(1000)[:3] == [(1, 2), (2, 3), (3, 4)]


def test_position_curve_averages_bins():
    losses = torch.arange(1, 101, dtype=torch.float32).repeat(3, 1)  # loss p at position p
    curve = position_curve(losses)
    for (a, b), loss in zip(curve["bins"], curve["loss"], strict=True):
        assert loss == pytest.approx((a + b - 1) / 2)
    assert curve["mean"] == pytest.approx(50.5) and curve["last_decile"] == pytest.approx(95.5)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tttlm.build_model("ttt_linear-tiny", vocab_size=97).eval()


def test_token_losses_match_model_loss(model):
    ids = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(1))
    losses = token_losses(model, ids, batch_size=2)
    assert losses.shape == (3, 39)
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss
    assert losses.double().mean().item() == pytest.approx(expected.item(), rel=1e-5)
    # causal: a prefix read alone gives the prefix's losses, so the ladder's short lengths are real contexts
    res = ladder(model, ids, [16, 40])
    assert res[16]["loss"] == pytest.approx(losses[:, :15].double().mean().item(), rel=1e-5)
    assert res[40]["perplexity"] == pytest.approx(math.exp(expected.item()), rel=1e-5)


def test_ttt_telemetry_descends_and_flags_non_finite(model):
    ids = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(2))
    layers = model_telemetry(model, ids)
    for layer in layers:
        assert len(layer["loss_before"]) == 3  # the partial last mini-batch is left out
        # one gradient step on a mini-batch lowers that mini-batch's loss (inner learning rate is small)
        assert all(a < b for a, b in zip(layer["loss_after"], layer["loss_before"], strict=True))
        assert layer["max_abs_diff_vs_op"] < 1e-5
    mixer = model.model.layers[1].mixer
    saved = mixer.W0.data.clone()
    try:
        mixer.W0.data[0, 0, 0] = float("inf")
        bad = model_telemetry(model, ids)
    finally:
        mixer.W0.data.copy_(saved)
    assert sum(bad[0]["non_finite"].values()) == 0
    assert bad[1]["non_finite"]["loss_init"] > 0 and bad[1]["first_non_finite_minibatch"] == 0


def test_telemetry_needs_ttt_or_mesa_layers():
    with pytest.raises(ValueError, match="TTT or Mesa"):
        model_telemetry(tttlm.build_model("transformer-tiny", vocab_size=31), torch.zeros(1, 16, dtype=torch.long))


def test_write_result_turns_non_finite_into_null(tmp_path):
    import json

    from tttlm.eval.results import read_results, write_result

    path = write_result(
        tmp_path, "x", "positions", {"a": [1.0, float("nan")], "b": {"c": torch.tensor([float("inf")])}}
    )
    data = json.loads(path.read_text())
    assert data["a"] == [1.0, None] and data["b"] == {"c": [None]} and data["non_finite"] == 2
    assert data["figure"] is None and [r["kind"] for r in read_results(tmp_path)] == ["positions"]


class _Clock:
    """time.perf_counter for tttlm.eval.throughput: every reading is `tick` seconds after the one before."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def test_throughput_arithmetic(model, monkeypatch):
    """With a clock that moves 0.25 s between readings: training reports batch x length / 0.25 tokens per second
    and 6 x parameters FLOPs per token (and trains: the weights move), prefill 0.25 s, decoding 0.25 s /
    new_tokens per token; each decoded token is one forward call of one token after the prefill and a warm-up
    token."""
    import tttlm.eval.throughput as throughput

    monkeypatch.setattr(throughput, "time", _Clock(0.25))
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        res = throughput.measure_model(model, shapes=[(2, 12)], contexts=[8, 24], new_tokens=5,
                                       dtype=torch.float32, repeats=3, warmup=1)
    finally:
        hook.remove()
        moved = any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
        with torch.no_grad():  # the module's other tests read the same model
            for p, b in zip(model.parameters(), before):
                p.copy_(b)
    assert moved
    assert res["params"] == sum(p.numel() for p in model.parameters())
    params = res["params"]
    assert res["train"] == {"2x12": {"warmup_s": pytest.approx(0.25), "tokens_per_s": pytest.approx(2 * 12 / 0.25),
                                     "step_ms": pytest.approx(250), "peak_mem_gb": None,
                                     "flops_per_token": 6 * params, "mfu": None}}
    assert res["prefill_s"] == pytest.approx({8: 0.25, 24: 0.25})
    assert res["decode_ms_per_token"] == pytest.approx({8: 250 / 5, 24: 250 / 5})
    train_calls, rest = calls[:4], calls[4:]  # a warm-up step and 3 timed ones
    assert train_calls == [(2, 12)] * 4 and not model.training
    assert rest[:8] == [(1, 8)] * 4 + [(1, 24)] * 4  # prefill: a warm-up and 3 timed reads of each context
    assert rest[8:] == [(1, 8)] + [(1, 1)] * 6 + [(1, 24)] + [(1, 1)] * 6
