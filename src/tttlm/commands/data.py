"""Prepare a corpus: train (or load) a tokenizer and tokenize it into cached token shards.

Training runs this themselves; running it first shows what the corpus holds. A second run on the same corpus
and tokenizer finds the cache and only prints its numbers.

examples:
  tttlm data                                   # the Python standard library's .py files
  tttlm data 'notes/**/*.md' --vocab-size 8192
  tttlm data corpus.jsonl --text-field body --tokenizer my/tokenizer.json
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("corpus", nargs="?", default="stdlib",
                        help="'stdlib' (default), a directory, a glob, a .txt/.jsonl/.parquet file, or a saved "
                             "`datasets` dataset")
    parser.add_argument("--text-field", default="text", help="field of .jsonl records / column holding the text")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents held out")
    parser.add_argument("--tokenizer", help="an existing tokenizer.json (default: train a byte-level BPE)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size of the trained tokenizer")
    parser.add_argument("--cache-dir", help="cache directory (default $TTTLM_CACHE or ~/.cache/tttlm)")


def run(args: argparse.Namespace) -> int:
    from tttlm.data.corpus import Corpus
    from tttlm.data.shards import prepare_data

    corpus = Corpus(args.corpus, args.text_field, args.val_fraction)
    print(f"corpus {corpus.source}: {len(corpus.files)} file(s) under {corpus.root}")
    data = prepare_data(corpus, tokenizer=args.tokenizer, vocab_size=args.vocab_size, cache_dir=args.cache_dir)
    m = data.meta
    print(f"shards: {data.path}")
    for split in ("train", "val"):
        print(f"  {split:5s} {m['documents'][split]:8d} documents {m['tokens'][split]:12,d} tokens "
              f"(longest document {m['max_document_tokens'][split]:,d})")
    if m["val_from_tail"]:
        print("no document fell in the validation split: it holds the last tokens of the corpus instead")
    print(f"tokenizer: {m['vocab_size']} tokens; unigram baseline on validation: {m['unigram_val_loss']:.4f} "
          f"nats/token")
    return 0
