"""Time one whole mixer layer (projections, convs, op, gate, output projection): forward+backward over a fixed
token budget, and peak memory. The default configuration is the one of the TTT authors' layer timings quoted in
DESIGN.md (width 2048 = 32 heads x 64, float32, 32,768 tokens per call, T = 2k and 8k).

    python benchmarks/layer_speed.py [--mixers ttt_linear,ttt_mlp] [--dtype float32|bfloat16] [--tokens 32768]
        [--T 2048,8192] [--width 2048] [--heads 32]

On a GPU the TTT ops' PyTorch path compiles its per-mini-batch function; TTTLM_COMPILE=0 measures it eager
(tttlm.fast).
"""

from __future__ import annotations

import argparse
import time

import torch

from tttlm.layers import AttentionMixer, Mamba2Mixer, MesaMixer, SeqInfo, TTTMixer
from tttlm.models.config import TTTLMConfig


def make_layer(mixer: str, width: int, heads: int) -> torch.nn.Module:
    config = TTTLMConfig(mixer=mixer, hidden_size=width, num_attention_heads=heads, intermediate_size=4 * width)
    if mixer in ("ttt_linear", "ttt_mlp"):
        layer = TTTMixer(config, mixer.split("_")[1])
    else:
        layer = {"mesa": MesaMixer, "transformer": AttentionMixer, "mamba2": Mamba2Mixer}[mixer](config)
    if hasattr(layer, "init_parameters"):  # mixers with parameters that nn.Module leaves uninitialised
        layer.init_parameters(0.02)
    return layer


def bench(layer, B: int, T: int, width: int, dtype, device: str, repeats: int) -> tuple[float, float]:
    x = torch.randn(B, T, width, device=device, dtype=dtype, requires_grad=True)
    info = SeqInfo.contiguous(B, T, 0, device)
    dy = torch.randn_like(x)

    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            y = layer(x, info)
        y.backward(dy)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mixers", default="ttt_linear,ttt_mlp")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--T", default="2048,8192")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, width {a.width} ({a.heads} heads), "
          f"{a.dtype}, {a.tokens} tokens per call")
    print("| mixer | T | B | fwd+bwd ms | peak GiB |\n|---|---|---|---|---|")
    for mixer in a.mixers.split(","):
        layer = make_layer(mixer, a.width, a.heads).cuda()
        for T in map(int, a.T.split(",")):
            ms, gib = bench(layer, a.tokens // T, T, a.width, dtype, "cuda", a.repeats)
            print(f"| {mixer} | {T} | {a.tokens // T} | {ms:.1f} | {gib:.1f} |", flush=True)
        del layer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
