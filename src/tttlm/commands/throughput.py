"""Throughput and latency of every mixer at one model size: training tokens/s, prefill, decode per token.

Models are built from the presets "{mixer}-{size}" with random weights (speed does not depend on them).
Training runs forward + backward + AdamW on --train-batch x --train-seq-len tokens; prefill reads each
--contexts length at batch 1; decoding generates --new-tokens tokens one call each after that context. Writes
throughput.json and throughput.png. Measure on an otherwise idle machine.
"""

from __future__ import annotations

from tttlm.eval.options import add_device, add_out, positive_int

MIXERS = ("ttt_linear", "ttt_mlp", "mesa", "transformer", "mamba2")


def add_arguments(parser) -> None:
    parser.add_argument("--size", default="small", help="preset size (default small; see `tttlm info`)")
    parser.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=MIXERS, help="mixers (default all)")
    parser.add_argument(
        "--contexts",
        type=positive_int,
        nargs="+",
        default=[512, 2048, 8192],
        help="context lengths for prefill and decode (512 2048 8192)",
    )
    parser.add_argument("--train-batch", type=positive_int, default=8, help="training batch (8)")
    parser.add_argument("--train-seq-len", type=positive_int, default=2048, help="training sequence length (2048)")
    parser.add_argument("--new-tokens", type=positive_int, default=32, help="decoded tokens per measurement (32)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed repeats, median kept (3)")
    parser.add_argument("--vocab-size", type=positive_int, default=None, help="vocabulary (default: the preset's)")
    add_device(parser, "compute dtype under autocast (default auto: bfloat16 on CUDA, else float32)", auto_dtype=True)
    add_out(parser)


def run(args) -> int:
    import torch

    import tttlm
    from tttlm.eval.checkpoints import resolve_device, resolve_dtype
    from tttlm.eval.plots import plot_throughput
    from tttlm.eval.results import environment, write_result
    from tttlm.eval.throughput import measure_model

    device = resolve_device(args.device)
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    dtype = resolve_dtype(dtype_name)
    overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    settings = {k: getattr(args, k) for k in ("size", "train_batch", "train_seq_len", "new_tokens", "repeats")}
    env = environment(device)
    title = f"{args.size} models, {dtype_name}, {env['device_name']}"
    mixers = {}
    for mixer in args.mixers:
        torch.manual_seed(0)
        model = tttlm.build_model(f"{mixer}-{args.size}", **overrides).to(device)
        res = measure_model(
            model,
            contexts=sorted(set(args.contexts)),
            train_batch=args.train_batch,
            train_seq_len=args.train_seq_len,
            new_tokens=args.new_tokens,
            dtype=dtype,
            repeats=args.repeats,
        )
        mixers[mixer] = res
        tps = res["train_tokens_per_s"]
        print(
            f"{mixer}-{args.size} ({res['params'] / 1e6:.1f}M): train {_fmt(tps, 1)} tok/s; "
            + "; ".join(
                f"L={L}: prefill {_fmt(res['prefill_s'][L], 1e3)} ms, decode "
                f"{_fmt(res['decode_ms_per_token'][L], 1)} ms/token"
                for L in res["prefill_s"]
            ),
            flush=True,
        )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # written after every mixer, so that a run cut short keeps the mixers it finished
        data = {"settings": {**settings, "dtype": dtype_name}, "environment": env, "mixers": mixers}
        path = write_result(args.out, "throughput", "throughput", data, plot_throughput(mixers, title))
    print(f"wrote {path}")
    return 0


def _fmt(value, scale: float) -> str:
    return "OOM" if value is None else f"{value * scale:.2f}"
