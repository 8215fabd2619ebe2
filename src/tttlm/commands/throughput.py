"""Throughput and latency of every mixer at one model size: training tokens/s, model FLOPs utilisation and peak
memory at one or more batch shapes; prefill and decode per token.

Models are built from the presets "{mixer}-{size}" with random weights (speed does not depend on them); the
mixer "nanogpt" is benchmarks/nanogpt.py's minimal compiled GPT of transformer-{size}'s architecture (a source
checkout), timed in the same run as the reference. Training runs forward + backward + fused AdamW on random
ids at each --train-shapes BxT (after --warmup steps, which include torch.compile's work; the median of
--repeats steps kept). Utilisation counts 6 N + 12 L C T FLOPs per token (the attention term for attention
models only; tttlm.eval.throughput) against the bf16 matmul peak measured once at the start. Prefill reads
a context of each --seq-len at batch 1; decoding generates --new-tokens tokens one call each after that context
(on CUDA through the captured CUDA graph of tttlm.models.decode, as generate() does).
--profile prints the top kernels of one training step per mixer and shape. Writes throughput.json (after
every mixer) and throughput.png. Measure on an otherwise idle machine.

examples:
  tttlm throughput --size small --out-dir out/
  tttlm throughput --size 125m --train-shapes 16x2048 4x8192 --seq-len --mixers transformer nanogpt --out-dir out/
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from tttlm.eval.options import add_device, add_out_dir, add_seq_len, positive_int

MIXERS = ("ttt_linear", "ttt_mlp", "mesa", "transformer", "mamba2", "mamba")
NANOGPT = Path(__file__).resolve().parents[3] / "benchmarks" / "nanogpt.py"


def train_shape(text: str) -> tuple[int, int]:
    try:
        B, T = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a training shape is BxT, e.g. 16x2048; got {text!r}") from None
    if B < 1 or T < 2:
        raise argparse.ArgumentTypeError(f"a training shape needs B >= 1 and T >= 2, got {text!r}")
    return B, T


def add_arguments(parser) -> None:
    parser.add_argument("--size", default="small", help="preset size (see `tttlm info`)")
    parser.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=(*MIXERS, "nanogpt"),
                        help="mixers (nanogpt: the reference GPT of benchmarks/nanogpt.py)")
    parser.add_argument("--train-shapes", type=train_shape, nargs="+", default=[(8, 2048)], metavar="BxT",
                        help="training batch shapes, sequences x tokens per sequence (default: 8x2048)")
    add_seq_len(parser, [512, 2048, 8192], "context lengths of prefill and decode (none: training only)",
                deprecated=("--contexts",), nargs="*")
    parser.add_argument("--new-tokens", type=positive_int, default=32, help="decoded tokens per measurement")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed repeats, median kept")
    parser.add_argument("--warmup", type=positive_int, default=2, help="untimed training steps first")
    parser.add_argument("--vocab-size", type=positive_int, default=None, help="vocabulary (default: the preset's)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the models' blocks; --no-compile runs them as plain PyTorch, as "
                             "TTTLM_COMPILE=0 does (default: on CUDA only)")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of one training step")
    add_device(parser, "compute dtype, under autocast", dtype_default="auto")
    add_out_dir(parser)


def _nanogpt():
    if not NANOGPT.is_file():
        from tttlm.errors import UserError

        raise UserError(f"the mixer nanogpt needs {NANOGPT} (a source checkout)")
    spec = importlib.util.spec_from_file_location("nanogpt", NANOGPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(mixer: str, size: str, overrides: dict, device):
    """The model and its training loss for measure_model (nanoGPT compiled as nanoGPT does, unless off)."""
    import torch

    import tttlm
    from tttlm.eval.throughput import lm_loss
    from tttlm.fast import compile_enabled

    torch.manual_seed(0)
    if mixer != "nanogpt":
        return tttlm.build_model(f"{mixer}-{size}", **overrides).to(device), lm_loss, None
    nanogpt = _nanogpt()
    model = nanogpt.prepare(nanogpt.build(size, **overrides).to(device), compile_enabled(device))
    return model, nanogpt.loss_of, True


def _row(name: str, res: dict) -> str:
    parts = [f"{name} ({res['params'] / 1e6:.1f}M)"]
    for shape, r in res["train"].items():
        if r is None:
            parts.append(f"train {shape}: OOM")
        elif "error" in r:
            parts.append(f"train {shape}: failed ({r['error']})")
        else:
            mfu = "" if r["mfu"] is None else f", MFU {r['mfu']:.1%}"
            mem = "" if r["peak_mem_gb"] is None else f", peak {r['peak_mem_gb']:.1f} GB"
            parts.append(f"train {shape}: {r['tokens_per_s']:,.0f} tok/s{mfu}{mem} (warm-up {r['warmup_s']:.0f} s)")
    for L in res["prefill_s"]:
        pre, dec = res["prefill_s"][L], res["decode_ms_per_token"][L]
        parts.append(f"L={L}: prefill {'OOM' if pre is None else f'{1e3 * pre:.2f}'} ms, decode "
                     f"{'OOM' if dec is None else f'{dec:.2f}'} ms/token")
    return "; ".join(parts)


def _print_profile(name: str, res: dict) -> None:
    for shape, r in res["train"].items():
        if not r or "profile" not in r:
            continue
        total = r["profile"][-1]["ms"]
        print(f"\n{name} {shape}: top kernels of one training step ({total:.1f} ms of kernels)")
        print("| kernel | calls | ms | share |\n|---|---|---|---|")
        for k in r["profile"][:-1]:
            print(f"| {k['name'][:100]} | {k['calls']} | {k['ms']:.2f} | {k['share']:.1%} |")
        print(flush=True)


def run(args) -> int:
    import torch

    from tttlm.errors import UserError
    from tttlm.eval.checkpoints import resolve_device, resolve_dtype
    from tttlm.eval.plots import plot_throughput
    from tttlm.eval.results import environment, write_result
    from tttlm.eval.throughput import measure_model, peak_matmul_flops
    from tttlm.fast import compile_enabled, fast_paths

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    shapes = [tuple(s) for s in args.train_shapes]
    env = environment(device)
    peak = peak_matmul_flops(device)
    env["peak_bf16_matmul_tflops"] = None if peak is None else peak / 1e12
    if peak is not None:
        print(f"{env['device_name']}: bf16 matmul peak {peak / 1e12:.0f} TFLOP/s (measured)", flush=True)
    with fast_paths(compile=args.compile):
        settings = {
            "size": args.size, "train_shapes": [f"{B}x{T}" for B, T in shapes], "contexts": args.seq_len,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "warmup": args.warmup, "dtype": dtype_name,
            "compile": compile_enabled(device), "decode": "graph" if device.type == "cuda" else "eager",
        }
        title = f"{args.size} models, {dtype_name}, {env['device_name']}"
        mixers, path = {}, None
        for mixer in args.mixers:
            try:
                model, loss_of, attention = _build(mixer, args.size, overrides, device)
                res = measure_model(
                    model, shapes=shapes, contexts=[] if mixer == "nanogpt" else sorted(set(args.seq_len)),
                    new_tokens=args.new_tokens, dtype=dtype, repeats=args.repeats, warmup=args.warmup,
                    profile=args.profile, peak_flops=peak, loss_of=loss_of, attention=attention,
                )
            except UserError:
                raise
            except Exception as e:  # a model that fails (e.g. to compile) is recorded; the others still run
                res = {"params": 0, "train": {f"{B}x{T}": {"error": f"{type(e).__name__}: {e}"[:500]}
                                              for B, T in shapes}, "prefill_s": {}, "decode_ms_per_token": {}}
            mixers[mixer] = res
            print(_row(f"{mixer}-{args.size}", res), flush=True)
            if args.profile:
                _print_profile(f"{mixer}-{args.size}", res)
            model = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            # written after every mixer, so that a run cut short keeps the mixers it finished
            data = {"settings": settings, "environment": env, "mixers": mixers}
            path = write_result(args.out_dir, "throughput", "throughput", data, plot_throughput(mixers, title))
    _print_table(mixers, shapes)
    print(f"wrote {path}")
    return 0


def _print_table(mixers: dict, shapes) -> None:
    """Training tokens/s per mixer and shape, with MFU and the ratio to the transformer's."""
    keys = [f"{B}x{T}" for B, T in shapes]
    print("\n| model | " + " | ".join(f"{k} tok/s (MFU, x transformer)" for k in keys) + " |")
    print("|---|" + "---|" * len(keys))
    ref = mixers.get("transformer", {}).get("train", {})
    for name, res in mixers.items():
        cells = []
        for k in keys:
            r = res["train"].get(k)
            if not r or "error" in r:
                cells.append("OOM" if r is None else "failed")
                continue
            mfu = "" if r["mfu"] is None else f"{r['mfu']:.0%}, "
            base = ref.get(k)
            ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base and "error" not in base else "-"
            cells.append(f"{r['tokens_per_s']:,.0f} ({mfu}{ratio})")
        print(f"| {name} | " + " | ".join(cells) + " |")
