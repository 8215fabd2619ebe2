"""Prepare a corpus: train (or load) a tokenizer and tokenize it into cached token shards.

Training runs this themselves; running it first shows what the corpus holds. A second run on the same corpus
and tokenizer finds the cache and only prints its numbers. For the `python` corpus (every .py file installed
with this interpreter, exact duplicates removed) it also lists the packages it holds; --manifest writes that
list (documents and bytes by package, distributions and versions, skipped files) as JSON, for any corpus.

examples:
  tttlm data                                   # the Python standard library's .py files
  tttlm data --corpus python --vocab-size 32000 --manifest python-corpus.json
  tttlm data --corpus 'notes/**/*.md' --vocab-size 8192
  tttlm data --corpus corpus.jsonl --text-field body --tokenizer my/tokenizer.json
  tttlm data --corpus hf:wikitext:wikitext-103-raw-v1 --val-corpus hf:wikitext:wikitext-103-raw-v1:validation
"""

from __future__ import annotations

import argparse
import sys

from tttlm.eval.options import CORPUS_HELP, add_corpus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_corpus(parser, CORPUS_HELP, default="stdlib")
    parser.add_argument("old_corpus", nargs="?", help=argparse.SUPPRESS)  # the corpus was once a positional
    parser.add_argument("--val-corpus", metavar="SOURCE",
                        help="hold out every document of this source, and none of --corpus (default: hold out "
                             "--val-fraction of --corpus)")
    parser.add_argument("--text-field", default="text", help="field of .jsonl records / column holding the text")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents held out")
    parser.add_argument("--tokenizer", help="an existing tokenizer.json (default: train a byte-level BPE)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size of the trained tokenizer")
    parser.add_argument("--cache-dir", help="cache directory (default $TTTLM_CACHE or ~/.cache/tttlm)")
    parser.add_argument("--manifest", metavar="JSON",
                        help="write what the corpus holds, by package, to this file (default: none)")


_LISTED = 20  # largest packages printed; the manifest holds them all


def run(args: argparse.Namespace) -> int:
    import json
    import sysconfig
    from pathlib import Path

    from tttlm.data.corpus import PYTHON, Corpus
    from tttlm.data.shards import prepare_data

    source = args.corpus
    if args.old_corpus is not None:
        print(f"tttlm data: the corpus as a positional argument is deprecated and goes in a future release: use "
              f"--corpus {args.old_corpus}", file=sys.stderr)
        source = args.old_corpus
    corpus = Corpus(source, args.text_field, args.val_fraction, val_source=args.val_corpus)
    for c in (corpus, corpus.validation):
        if c is None:
            continue
        where = f"{len(c.files)} file(s) under {c.root}" if c.files else "streamed"
        print(f"{'validation ' if c is corpus.validation else ''}corpus {c.source}: {where}"
              + (f" and {sysconfig.get_paths()['purelib']}" if c.source == PYTHON else ""))
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
    if args.manifest or corpus.source == PYTHON:
        manifest = corpus.manifest()
        groups = manifest["groups"]
        print(f"{manifest['documents']:,d} documents, {manifest['bytes'] / 1e6:.1f} MB kept of {manifest['files']:,d} "
              f"files (skipped: {corpus.skipped.describe()}); largest groups:")
        for g in groups[:_LISTED]:
            print(f"  {g['name']:32s} {g['documents']:7,d} documents {g['bytes'] / 1e6:9.2f} MB  "
                  f"{', '.join(g.get('distributions', []))}")
        if len(groups) > _LISTED:
            rest = groups[_LISTED:]
            print(f"  ... {len(rest)} more: {sum(g['documents'] for g in rest):,d} documents, "
                  f"{sum(g['bytes'] for g in rest) / 1e6:.2f} MB")
        if args.manifest:
            Path(args.manifest).parent.mkdir(parents=True, exist_ok=True)
            Path(args.manifest).write_text(json.dumps(manifest, indent=1) + "\n")
            print(f"wrote {args.manifest}")
    return 0
