"""A minimal GPT of the Transformer++ presets' sizes, written the way nanoGPT writes one (Karpathy's nanoGPT:
one file, torch.compile of the whole model, fused AdamW, PyTorch's fastest attention), as the reference point
for `tttlm throughput`: what a user's own small training script reaches on the same GPU.

It is transformer-{size}'s architecture (Llama-style: RMSNorm, RoPE, SwiGLU MLP, no biases, tied embeddings,
the same vocabulary, width, depth, heads and MLP size, the same parameter count), so its tokens/s and model
FLOPs compare with the preset's directly. The loss is the plain cross-entropy of the full logits (compiled).

    python benchmarks/nanogpt.py [--size 125m] [--train-shapes 16x2048 4x8192] [--out DIR] [--no-compile]

prints one row and writes nanogpt.json in `tttlm throughput`'s format (its "mixers" hold "nanogpt");
`tttlm throughput --mixers ... nanogpt` times it in the same run as the tttlm models.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope(x, theta: float):
    """x [B, H, T, D]: rotary embedding of the two halves of the head dim."""
    T, D = x.shape[-2:]
    inv = theta ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    ang = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * inv
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        C = c.hidden_size
        self.heads, self.theta = c.num_attention_heads, c.rope_theta
        self.norm1, self.norm2 = RMSNorm(C, c.rms_norm_eps), RMSNorm(C, c.rms_norm_eps)
        self.qkv = nn.Linear(C, 3 * C, bias=False)
        self.proj = nn.Linear(C, C, bias=False)
        self.gate_up = nn.Linear(C, 2 * c.intermediate_size, bias=False)
        self.down = nn.Linear(c.intermediate_size, C, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(rope(q, self.theta), rope(k, self.theta), v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class GPT(nn.Module):
    """forward(idx [B, T], targets [B, T]) -> the mean next-token cross-entropy. `config` is the tttlm preset's
    TTTLMConfig it copies."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=config.initializer_range)

    def forward(self, idx, targets):
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.view(-1))


def build(size: str = "125m", **overrides) -> GPT:
    """The GPT of preset transformer-{size} (overrides: config fields, e.g. vocab_size)."""
    from tttlm.models import preset_config

    return GPT(preset_config(f"transformer-{size}", **overrides))


def prepare(model: GPT, compile: bool) -> GPT:
    """nanoGPT's `model = torch.compile(model)`, with dynamic shapes (compiled once for every training shape, as
    tttlm's blocks are); the compiled module keeps `config`."""
    if not compile:
        return model
    compiled = torch.compile(model, dynamic=True)
    compiled.config = model.config
    return compiled


def loss_of(model, ids):
    """The training loss `tttlm.eval.throughput.measure_training` calls: next-token targets (the last one wraps
    around, keeping the shapes of nanoGPT's batches)."""
    return model(ids, ids.roll(-1, dims=1))


def main(argv=None) -> int:
    from tttlm.eval.throughput import measure_model, peak_matmul_flops

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="125m", help="transformer preset size to copy (125m)")
    p.add_argument("--train-shapes", nargs="+", default=["16x2048", "4x8192"], help="BxT training shapes")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per shape, median kept")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile (on)")
    p.add_argument("--out", default=None, help="directory for nanogpt.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("nanogpt.py times a GPU: no CUDA device", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.train_shapes]
    torch.manual_seed(0)
    model = prepare(build(args.size).to(device), args.compile)
    peak = peak_matmul_flops(device)
    res = measure_model(model, shapes=shapes, contexts=[], new_tokens=1, dtype=torch.bfloat16,
                        repeats=args.repeats, peak_flops=peak, loss_of=loss_of, attention=True)
    for shape, r in res["train"].items():
        print(f"nanogpt-{args.size} {shape}: " + ("OOM" if r is None else
              f"{r['tokens_per_s']:,.0f} tok/s, MFU {r['mfu']:.1%}, peak {r['peak_mem_gb']:.1f} GB"))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        data = {"settings": {"size": args.size, "train_shapes": args.train_shapes, "compile": args.compile},
                "peak_flops": peak, "mixers": {"nanogpt": res}}
        (out / "nanogpt.json").write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
