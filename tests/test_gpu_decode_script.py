"""benchmarks/gpu_decode.py on CPU with tiny models (its numbers need a GPU): the random static cache, decode and
prefill timings, the rows it writes and the table."""

import importlib.util
import json
from pathlib import Path

import torch

from tttlm.models import MIXERS, build_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_decode.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_decode", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def test_pieces_on_cpu(capsys):
    bench = _script()
    rows = []
    for m in MIXERS:
        torch.manual_seed(0)
        model = build_model(f"{m}-tiny", vocab_size=97).eval()
        cache = bench.random_cache(model, 3, 40, 5)
        assert cache.is_static and cache.positions.tolist() == [40, 40, 40] and cache.seen_tokens == 40
        tensors = [t for layer in cache.layers for t in layer.tensors()]
        assert all(bool(t.isfinite().all()) for t in tensors) and any(bool(t.float().std() > 0) for t in tensors)
        if m == "transformer":
            assert cache.capacity == 45
        again = bench.random_cache(model, 3, 40, 5)
        assert all(torch.equal(a, b) for la, lb in zip(cache.layers, again.layers) for a, b in
                   zip(la.tensors(), lb.tensors(), strict=True)), "the same seed gave other states"
        res = bench.time_decode(model, 3, 40, 2, graph=False)
        assert res["ms_per_token"] > 0 and res["tokens_per_s"] > 0 and res["graph"] is False
        assert res.pop("logits").shape == (3, 97) and res["first_step_s"] > 0
        prefill = bench.time_prefill(model, 40, 1)
        assert prefill["prefill_ms"] > 0 and prefill["prefill_first_s"] > 0
        rows.append(dict(mixer=m, context=40, batch=1, **res, **prefill))
    assert "error" in bench._measure(lambda: 1 / 0)
    order = bench._order([1, 64], [2048, 8192, 32768], prefill=True)
    assert order[:3] == [("decode", 1, 2048), ("decode", 64, 32768), ("prefill", 1, 32768)]
    assert sorted(order) == sorted({*((k, B, L) for k, B in (("decode", 1), ("decode", 64), ("prefill", 1))
                                      for L in (2048, 8192, 32768))})
    bench.print_table(rows, MIXERS, [40], [1])
    table = capsys.readouterr().out
    assert table.count("| 40 |") == len(MIXERS)


def test_run_on_cpu(tmp_path, capsys, monkeypatch):
    """A whole run of two mixers, with compiled blocks ("aot_eager" on the CPU): the batch-1 rows compare the
    compiled step with the uncompiled one."""
    from tttlm import fast

    monkeypatch.setattr(fast, "BACKEND", "aot_eager")
    monkeypatch.setenv("TTTLM_COMPILE", "1")
    torch._dynamo.reset()
    out = tmp_path / "decode.json"
    mixers = ["transformer", "mesa"]
    argv = ["--device", "cpu", "--size", "tiny", "--mixers", *mixers, "--contexts", "40", "--batches", "1", "3",
            "--steps", "1", "--plain-steps", "1", "--prefill-repeats", "1", "--json", str(out)]
    try:
        assert _script().main(argv) == 0
    finally:
        torch._dynamo.reset()
    res = json.loads(out.read_text())
    assert res["command"] == "python benchmarks/gpu_decode.py " + " ".join(argv)
    assert {"device", "date", "rows"} <= set(res)
    rows = {(r["mixer"], r["context"], r["batch"]): r for r in res["rows"]}
    assert set(rows) == {(m, 40, B) for m in mixers for B in (1, 3)}
    assert res["compile"] is True
    for (_, _, B), r in rows.items():
        assert r["ms_per_token"] > 0 and r["tokens_per_s"] > 0 and ("prefill_ms" in r) == (B == 1), r
        assert ("plain_ms_per_token" in r) == (B == 1) and r.get("plain_rel_err", 0) <= 1e-5, r
    assert capsys.readouterr().out.count("| 40 |") == len(mixers)
