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
        res = bench.time_decode(model, 3, 40, 2, graph=False)
        assert res["ms_per_token"] > 0 and res["tokens_per_s"] > 0 and res["graph"] is False
        rows.append(dict(mixer=m, context=40, batch=1, **res, prefill_ms=bench.time_prefill(model, 40, 1)))
    assert "error" in bench._measure(lambda: 1 / 0)
    bench.print_table(rows, MIXERS, [40], [1])
    table = capsys.readouterr().out
    assert table.count("| 40 |") == len(MIXERS)


def test_run_on_cpu(tmp_path, capsys):
    out = tmp_path / "decode.json"
    argv = ["--device", "cpu", "--size", "tiny", "--contexts", "40", "--batches", "1", "3", "--steps", "1",
            "--prefill-repeats", "1", "--json", str(out)]
    assert _script().main(argv) == 0
    res = json.loads(out.read_text())
    assert res["command"] == "python benchmarks/gpu_decode.py " + " ".join(argv)
    assert {"device", "date", "rows"} <= set(res)
    rows = {(r["mixer"], r["context"], r["batch"]): r for r in res["rows"]}
    assert set(rows) == {(m, 40, B) for m in MIXERS for B in (1, 3)}
    for (_, _, B), r in rows.items():
        assert r["ms_per_token"] > 0 and r["tokens_per_s"] > 0 and ("prefill_ms" in r) == (B == 1), r
    assert capsys.readouterr().out.count("| 40 |") == len(MIXERS)
