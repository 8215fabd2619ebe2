"""Context ladder: perplexity at each evaluation length, e.g. for models trained at a shorter one.

The same --num-docs validation documents (each holding at least the longest length) are read from their start
at every --seq-len value, one call per length. Writes ladder.json and ladder.png (perplexity against the
evaluation length, each checkpoint's training length dotted).

examples:
  tttlm ladder runs/ttt runs/transformer --seq-len 512 1024 2048 4096 --out-dir out/
"""

from __future__ import annotations

from tttlm.eval.options import add_device, add_documents, add_out_dir, add_seq_len


def add_arguments(parser) -> None:
    add_documents(parser, num_docs=8)
    add_seq_len(parser, [512, 1024, 2048, 4096], "evaluation lengths", deprecated=("--lengths",))
    add_device(parser, "dtype of the model's weights")
    add_out_dir(parser)


def run(args) -> int:
    from tttlm.eval.checkpoints import Checkpoint, resolve_device, resolve_dtype
    from tttlm.eval.plots import plot_ladder
    from tttlm.eval.positions import ladder
    from tttlm.eval.results import environment, write_result

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    lengths = sorted(set(args.seq_len))
    checkpoints = {}
    for ckpt in [Checkpoint(p, args.verify) for p in args.checkpoints]:
        ids = ckpt.documents(args.corpus, lengths[-1], args.num_docs, args.cache_dir)
        model = ckpt.load(device, dtype)
        result = ladder(model, ids, lengths, args.micro_batch_size)
        checkpoints[ckpt.name] = {
            "mixer": model.config.mixer,
            "trained_context": ckpt.trained_context,
            "num_docs": ids.shape[0],
            "lengths": result,
        }
        print(f"{ckpt.name}: " + ", ".join(f"{L}: ppl {r['perplexity']:.3f}" for L, r in result.items()))
        del model
    data = {
        "corpus": args.corpus,
        "dtype": str(dtype).removeprefix("torch."),
        "environment": environment(device),
        "checkpoints": checkpoints,
    }
    path = write_result(args.out_dir, "ladder", "ladder", data, plot_ladder(checkpoints))
    print(f"wrote {path}")
    return 0
