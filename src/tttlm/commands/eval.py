"""Validation loss and perplexity of a checkpoint.

By default the corpus, validation fraction, sequence length and document handling (resets at document starts,
or --stream-windows) are those the checkpoint was trained with; the tokenizer is always the checkpoint's own.

examples:
  tttlm eval runs/quickstart                  # the latest checkpoint of a run
  tttlm eval runs/quickstart/step-001000 --corpus 'other/**/*.py' --seq-len 512
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    parser.add_argument("--corpus", help="corpus to evaluate on (default: the training corpus)")
    parser.add_argument("--text-field", help="field / column holding the text (default: the training one)")
    parser.add_argument("--val-fraction", type=float, help="fraction of documents held out (default: training's)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the training length)")
    parser.add_argument("--stream-windows", action=argparse.BooleanOptionalAction, default=None,
                        help="windows of the concatenated stream, no resets at document starts (default: as trained)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--batches", type=int, default=50, help="batches evaluated (fewer if the split is small)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--cache-dir", help="cache directory (default $TTTLM_CACHE or ~/.cache/tttlm)")


def run(args: argparse.Namespace) -> int:
    from tttlm.data.corpus import Corpus
    from tttlm.data.shards import prepare_data
    from tttlm.train import distributed
    from tttlm.train.checkpoint import load_pretrained, resolve_checkpoint
    from tttlm.train.trainer import evaluate

    if args.batch_size < 1 or args.batches < 1:
        raise ValueError("--batch-size and --batches must be positive")
    rt = distributed.start(args.device, "auto")
    path = resolve_checkpoint(args.checkpoint)
    model, _, trained = load_pretrained(path, rt.device)
    trained = trained or {}
    corpus = Corpus(args.corpus or trained.get("corpus", "stdlib"),
                    args.text_field or trained.get("text_field", "text"),
                    args.val_fraction or trained.get("val_fraction", 0.05))
    seq_len = args.seq_len or trained.get("seq_len")
    if not seq_len:
        raise ValueError("the checkpoint does not record its sequence length: pass --seq-len")
    data = prepare_data(corpus, tokenizer=str(path / "tokenizer.json"), cache_dir=args.cache_dir)
    stream = trained.get("stream_windows", False) if args.stream_windows is None else args.stream_windows
    result = evaluate(model, data.split("val"), seq_len, args.batch_size, args.batch_size, args.batches, rt,
                      resets=not stream)
    print(f"{path}: validation loss {result['val_loss']:.4f} nats/token, perplexity {result['val_ppl']:.2f} "
          f"({result['val_tokens']:,d} tokens of {corpus.source}, sequence length {seq_len}"
          f"{', stream windows' if stream else ''}); unigram baseline "
          f"{data.meta['unigram_val_loss']:.4f}")
    return 0
