"""Multi-query associative recall (Zoology's MQAR): every mixer trained from scratch, best over lrs.

One model per (mixer, width, sequence length, pairs, learning rate) is trained on fresh random examples for
--steps steps and scored on held-out examples (accuracy on the answers only). Writes recall.json (every run
and the best accuracy per mixer, width, length and pairs) and recall.png (with the accuracy of a uniform guess
among the values).

examples:
  tttlm recall --mixers transformer ttt_linear mesa --out-dir out/
  tttlm recall --merge out/transformer out/ttt_linear --out-dir out/      # sweeps run apart, one JSON
"""

from __future__ import annotations

from tttlm.cli import add_option
from tttlm.eval.options import add_device, add_out_dir, add_seq_len, positive_float, positive_int

MIXERS = ("ttt_linear", "ttt_mlp", "mesa", "transformer", "mamba2")


def add_arguments(parser) -> None:
    parser.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=MIXERS, help="mixers")
    parser.add_argument("--widths", type=positive_int, nargs="+", default=[64, 128], help="model widths")
    add_seq_len(parser, [256], "sequence lengths", deprecated=("--seq-lens",))
    parser.add_argument("--pairs", type=positive_int, nargs="+", default=[16, 32, 64],
                        help="key-value pairs per sequence")
    add_option(parser, "--lr", deprecated=("--lrs",), type=positive_float, nargs="+", default=[1e-3, 3e-3, 1e-2],
               help="learning rates swept per configuration (the best is kept)")
    parser.add_argument("--steps", type=positive_int, default=1000, help="training steps per run")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="sequences per step")
    parser.add_argument("--vocab-size", type=positive_int, default=8192, help="vocabulary (Zoology's)")
    parser.add_argument("--layers", type=positive_int, default=2, help="blocks per model")
    parser.add_argument("--head-dim", type=positive_int, default=16, help="head dim of every mixer")
    parser.add_argument("--eval-examples", type=positive_int, default=1000, help="held-out examples scored per run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the models and the examples")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="instead of training: combine the recall.json of sweeps run apart (e.g. one process per mixer) into "
             "--out-dir (default: train the sweep)",
    )
    add_device(parser)
    add_out_dir(parser)


def run(args) -> int:
    from tttlm.eval.checkpoints import resolve_device
    from tttlm.eval.plots import plot_recall
    from tttlm.eval.recall import chance_accuracy, recall_sweep
    from tttlm.eval.results import environment, write_result

    if args.merge:
        return _merge(args.merge, args.out_dir)
    device = resolve_device(args.device)

    if not any(L >= 4 * P for L in args.seq_len for P in args.pairs):
        raise ValueError("no configuration has seq_len >= 4 * pairs; lengthen --seq-len or lower --pairs")
    settings = {
        k: getattr(args, k)
        for k in ("steps", "batch_size", "vocab_size", "layers", "head_dim", "eval_examples", "seed")
    }
    env = environment(device)
    chance = chance_accuracy(args.vocab_size)
    total = (
        len(args.mixers) * len(args.widths) * len(args.lr) * sum(L >= 4 * P for L in args.seq_len for P in args.pairs)
    )

    def save(result: dict, complete: bool):
        data = {"settings": settings, "environment": env, "complete": complete, "chance": chance, **result}
        return write_result(args.out_dir, "recall", "recall", data, plot_recall(result["best"], chance))

    def on_run(r: dict, so_far: dict):
        print(
            f"[{len(so_far['runs'])}/{total}] {r['mixer']} width {r['width']} len {r['seq_len']} pairs {r['pairs']} "
            f"lr {r['lr']:g}: accuracy {r['accuracy']:.3f} (loss {r['final_loss']:.3f}, {r['seconds']:.1f} s)",
            flush=True,
        )
        save(so_far, complete=False)  # a sweep cut short still leaves its finished runs

    result = recall_sweep(
        args.mixers,
        args.widths,
        args.seq_len,
        args.pairs,
        args.lr,
        steps=args.steps,
        batch_size=args.batch_size,
        vocab_size=args.vocab_size,
        device=device,
        num_layers=args.layers,
        head_dim=args.head_dim,
        eval_examples=args.eval_examples,
        seed=args.seed,
        on_run=on_run,
    )
    print(f"wrote {save(result, complete=True)}")
    return 0


def _merge(dirs: list[str], out: str) -> int:
    import json
    from pathlib import Path

    from tttlm.eval.plots import plot_recall
    from tttlm.eval.recall import best_runs, chance_accuracy
    from tttlm.eval.results import write_result

    parts = []
    for d in dirs:
        f = Path(d) / "recall.json"
        if not f.is_file():
            raise FileNotFoundError(f"--merge: {f} does not exist")
        parts.append(json.loads(f.read_text()))
    if any(p["settings"] != parts[0]["settings"] for p in parts):
        raise ValueError("--merge: the sweeps were run with different settings (steps, batch, vocabulary, ...)")
    runs = [r for p in parts for r in p["runs"]]
    data = {
        "settings": parts[0]["settings"],
        "environment": parts[0]["environment"],
        "complete": all(p.get("complete", True) for p in parts),
        "chance": chance_accuracy(parts[0]["settings"]["vocab_size"]),
        "merged_from": [str(d) for d in dirs],
        "runs": runs,
        "best": best_runs(runs),
    }
    figure = plot_recall(data["best"], data["chance"])
    print(f"wrote {write_result(out, 'recall', 'recall', data, figure)}")
    return 0
