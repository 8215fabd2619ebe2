"""Validation loss and perplexity of checkpoints, scored on the tokens their training validated on.

By default everything that decides which tokens are scored, and how, is what the checkpoint's training run used
for its validations: the corpus (and --val-corpus), validation fraction, text field, sequence length, document
handling (resets at document starts, or --stream-windows), --batch-size sequences per batch, --eval-batches
batches, and the dtype; so the loss printed is the one training printed at that step. Any of them can be
changed; the tokenizer is always the checkpoint's own. With --out-dir, writes eval.json, which `tttlm report`
gathers.

examples:
  tttlm eval runs/quickstart                  # the latest checkpoint of a run
  tttlm eval runs/a runs/b --eval-batches 0 --out-dir out/                     # the whole split, to out/eval.json
  tttlm eval runs/quickstart/step-001000 --corpus 'other/**/*.py' --seq-len 512
"""

from __future__ import annotations

import argparse

from tttlm.cli import add_option
from tttlm.eval.options import add_corpus, add_device, add_micro_batch, add_out_dir, add_seq_len, add_verify


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+",
                        help="checkpoint directories, or run directories (their latest checkpoint)")
    add_corpus(parser, "corpus whose validation split is scored (default: the training corpus)")
    parser.add_argument("--val-corpus", metavar="SOURCE",
                        help="score every document of this source (default: the training run's, if it had one)")
    parser.add_argument("--text-field", help="field / column holding the text (default: the training one)")
    parser.add_argument("--val-fraction", type=float, help="fraction of documents held out (default: training's)")
    add_seq_len(parser, None, "tokens per sequence (default: the training length)", nargs=None)
    parser.add_argument("--stream-windows", action=argparse.BooleanOptionalAction, default=None,
                        help="windows of the concatenated stream, no resets at document starts (default: as trained)")
    parser.add_argument("--batch-size", type=int, help="sequences per batch (default: training's)")
    add_micro_batch(parser, None, "sequences per forward pass, at most (default: training's)")
    add_option(parser, "--eval-batches", deprecated=("--batches",), type=int, metavar="N",
               help="batches scored, 0: every full batch of the split (default: training's; fewer if the split is "
                    "smaller)")
    add_device(parser, "compute dtype, under autocast (default: the training run's)", dtype_default=None)
    parser.add_argument("--cache-dir", help="token cache (default: the training run's, else $TTTLM_CACHE or "
                                            "~/.cache/tttlm)")
    add_verify(parser)
    add_out_dir(parser, required=False, help="also write eval.json here, for `tttlm report` (default: print only)")


def _score(path, args, rt) -> dict:
    """The validation of one checkpoint: evaluate()'s dict with the settings that chose its tokens."""
    from tttlm.data.corpus import Corpus
    from tttlm.data.shards import prepare_data
    from tttlm.train.checkpoint import load_pretrained
    from tttlm.train.config import TrainConfig, split_batch
    from tttlm.train.trainer import evaluate

    model, _, trained = load_pretrained(path, rt.device)
    trained = {**TrainConfig().to_dict(), "seq_len": None, **(trained or {})}
    own_corpus = args.corpus is None or args.corpus == trained["corpus"]
    source = args.corpus or trained["corpus"]
    val_source = args.val_corpus or (trained.get("val_corpus") if own_corpus else None)
    corpus = Corpus(source, args.text_field or trained["text_field"], args.val_fraction or trained["val_fraction"],
                    val_source=val_source)
    seq_len = args.seq_len or trained["seq_len"]
    if not seq_len:
        raise ValueError(f"{path} does not record its sequence length: pass --seq-len")
    batch = args.batch_size or trained["batch_size"]
    batches = trained["eval_batches"] if args.eval_batches is None else args.eval_batches
    if batch < 1 or batches < 0:
        raise ValueError("--batch-size must be positive and --eval-batches >= 0")
    micro, _ = split_batch(batch, args.micro_batch_size or trained.get("micro_batch_size"), 1)
    data = prepare_data(corpus, tokenizer=str(path / "tokenizer.json"),
                        cache_dir=args.cache_dir or trained["cache_dir"], log=lambda *_: None)
    stream = trained.get("stream_windows", False) if args.stream_windows is None else args.stream_windows
    shard = data.split("val")
    result = evaluate(model, shard, seq_len, batch, micro, batches or shard.num_tokens, rt, resets=not stream)
    return {**result, "mixer": model.config.mixer, "corpus": corpus.source, "val_corpus": val_source,
            "seq_len": seq_len, "stream_windows": stream, "batch_size": batch, "eval_batches": batches,
            "unigram_val_loss": data.meta["unigram_val_loss"], "trained_context": trained["seq_len"]}


def run(args: argparse.Namespace) -> int:
    from tttlm.eval.checkpoints import Checkpoint
    from tttlm.eval.results import environment, write_result
    from tttlm.train import distributed

    ckpts = [Checkpoint(p, args.verify) for p in args.checkpoints]
    dtype = args.dtype or ckpts[0].train.get("dtype", "auto")
    rt = distributed.start(args.device, dtype)
    try:
        scores = {}
        for ckpt in ckpts:
            r = scores[ckpt.name] = _score(ckpt.path, args, rt)
            print(f"{ckpt.path}: validation loss {r['val_loss']:.4f} nats/token, perplexity {r['val_ppl']:.2f} "
                  f"({r['val_tokens']:,d} tokens of {r['val_corpus'] or r['corpus']}, sequence length "
                  f"{r['seq_len']}{', stream windows' if r['stream_windows'] else ''}); unigram baseline "
                  f"{r['unigram_val_loss']:.4f}")
    finally:
        distributed.stop()
    if args.out_dir:
        data = {"dtype": str(rt.dtype).removeprefix("torch."), "environment": environment(rt.device),
                "checkpoints": scores}
        path = write_result(args.out_dir, "eval", "eval", data)
        print(f"wrote {path}")
    return 0
