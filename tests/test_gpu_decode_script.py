"""benchmarks/gpu_decode.py's pieces on CPU with tiny models (the script itself needs a GPU): the random
static cache, decode and prefill timings, the table."""

import importlib.util
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
