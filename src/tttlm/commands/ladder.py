"""Context ladder: perplexity at each evaluation length, e.g. for models trained at a shorter one.

The same --num-docs validation documents (each holding at least the longest length) are read from their start
at every --lengths value, one call per length. Writes ladder.json and ladder.png (perplexity against the
evaluation length, each checkpoint's training length dotted).
"""

from __future__ import annotations

from tttlm.eval.options import add_device, add_documents, add_out, positive_int


def add_arguments(parser) -> None:
    add_documents(parser, num_docs=8)
    parser.add_argument(
        "--lengths",
        type=positive_int,
        nargs="+",
        default=[512, 1024, 2048, 4096],
        help="evaluation lengths in tokens (default 512 1024 2048 4096)",
    )
    add_device(parser)
    add_out(parser)


def run(args) -> int:
    from tttlm.eval.checkpoints import Checkpoint, resolve_device, resolve_dtype
    from tttlm.eval.plots import plot_ladder
    from tttlm.eval.positions import ladder
    from tttlm.eval.results import environment, write_result

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    lengths = sorted(set(args.lengths))
    checkpoints = {}
    for ckpt in [Checkpoint(p, args.verify) for p in args.checkpoints]:
        ids = ckpt.documents(args.data, lengths[-1], args.num_docs, args.cache_dir)
        model = ckpt.load(device, dtype)
        result = ladder(model, ids, lengths, args.batch_size)
        checkpoints[ckpt.name] = {
            "trained_context": ckpt.trained_context,
            "num_docs": ids.shape[0],
            "lengths": result,
        }
        print(f"{ckpt.name}: " + ", ".join(f"{L}: ppl {r['perplexity']:.3f}" for L, r in result.items()))
        del model
    data = {
        "data": args.data,
        "dtype": args.dtype,
        "environment": environment(device),
        "checkpoints": checkpoints,
    }
    path = write_result(args.out, "ladder", "ladder", data, plot_ladder(checkpoints))
    print(f"wrote {path}")
    return 0
