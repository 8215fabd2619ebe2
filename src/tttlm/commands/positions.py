"""Loss by token position: mean next-token loss at each position of long documents, checkpoints overlaid.

For each --seq-len L, the first L tokens of up to --num-docs validation documents that hold at least L tokens
are read from their start; position p's loss is that of predicting token p+1. Writes positions.json (log-binned
curves, overall and last-decile means) and positions.png (log-scale positions, one panel per length, each
checkpoint's training length dotted).

examples:
  tttlm positions runs/ttt runs/transformer --seq-len 2048 8192 --out-dir out/
"""

from __future__ import annotations

from tttlm.eval.options import add_device, add_documents, add_out_dir, add_seq_len


def add_arguments(parser) -> None:
    add_documents(parser, num_docs=16)
    add_seq_len(parser, [2048], "lengths read from each document's start (the papers use 2k, 8k, 32k)",
                deprecated=("--context",))
    add_device(parser, "dtype of the model's weights")
    add_out_dir(parser)


def run(args) -> int:
    from tttlm.eval.checkpoints import Checkpoint, resolve_device, resolve_dtype
    from tttlm.eval.plots import plot_positions
    from tttlm.eval.positions import position_curve, token_losses
    from tttlm.eval.results import environment, write_result

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    contexts = {L: {"num_docs": None, "checkpoints": {}} for L in sorted(set(args.seq_len))}
    for ckpt in [Checkpoint(p, args.verify) for p in args.checkpoints]:
        model = ckpt.load(device, dtype)
        for L, entry in contexts.items():
            ids = ckpt.documents(args.corpus, L, args.num_docs, args.cache_dir)
            curve = position_curve(token_losses(model, ids, args.micro_batch_size))
            entry["checkpoints"][ckpt.name] = {"mixer": model.config.mixer, "trained_context": ckpt.trained_context,
                                               **curve}
            entry["num_docs"] = ids.shape[0]
            print(
                f"{ckpt.name} context {L}: mean loss {curve['mean']:.4f} over {ids.shape[0]} documents, "
                f"last tenth {curve['last_decile']:.4f}"
            )
        del model
    data = {"corpus": args.corpus, "dtype": str(dtype).removeprefix("torch."), "environment": environment(device),
            "contexts": contexts}
    path = write_result(args.out_dir, "positions", "positions", data, plot_positions(contexts))
    print(f"wrote {path}")
    return 0
