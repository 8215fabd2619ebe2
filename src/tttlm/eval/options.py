"""Command-line options that several commands share, spelled and explained once (README: "CLI conventions")."""

from __future__ import annotations

import argparse
import re

from tttlm.cli import add_option

DTYPES = ("auto", "float32", "bfloat16")
CORPUS_HELP = ("'stdlib' (the Python standard library's .py files), 'python' (every .py file installed with the "
               "interpreter, duplicates removed), a directory, a glob, a .txt/.jsonl/.parquet file, a saved "
               "`datasets` dataset, or hf:NAME[:CONFIG[:SPLIT]] (a Hub dataset, streamed; SPLIT may end in [:N])")
DEVICE_HELP = "auto (CUDA when present, else CPU), cpu, cuda or cuda:N"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def device_name(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected {DEVICE_HELP}, got {text!r}")
    return text


def add_device(parser: argparse.ArgumentParser, dtype_help: str | None = None, dtype_default: str = "float32") -> None:
    """--device, and unless dtype_help is None --dtype (auto, float32 or bfloat16; auto: bfloat16 on CUDA, float32
    elsewhere)."""
    parser.add_argument("--device", type=device_name, default="auto", help=DEVICE_HELP)
    if dtype_help is not None:
        parser.add_argument("--dtype", default=dtype_default, choices=DTYPES,
                            help=f"{dtype_help}: auto (bfloat16 on CUDA, float32 elsewhere), float32 or bfloat16")


def add_verify(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verify", action="store_true",
                        help="also check every file's SHA-256 against the checkpoint's manifest (sizes are always "
                             "checked)")


def add_out_dir(parser: argparse.ArgumentParser, required: bool = True,
                help: str = "directory for the JSON result and the PNG figure", default: str | None = None) -> None:
    add_option(parser, "--out-dir", deprecated=("--out",), required=required, default=default, metavar="DIR",
               help=help)


def add_corpus(parser: argparse.ArgumentParser, help: str, deprecated: tuple[str, ...] = (), **kwargs) -> None:
    add_option(parser, "--corpus", deprecated=deprecated, metavar="SOURCE", help=help, **kwargs)


def add_seq_len(parser: argparse.ArgumentParser, default, help: str, deprecated: tuple[str, ...] = (),
                nargs: str | None = "+") -> None:
    """--seq-len: tokens per sequence; one or more values (nargs) where the command measures several."""
    add_option(parser, "--seq-len", deprecated=deprecated, type=positive_int, nargs=nargs, default=default,
               metavar="TOKENS", help=help)


def add_micro_batch(parser: argparse.ArgumentParser, default: int | None, help: str, **kwargs) -> None:
    add_option(parser, "--micro-batch-size", type=positive_int, default=default, metavar="N", help=help, **kwargs)


def add_documents(parser: argparse.ArgumentParser, num_docs: int, batch_size: bool = True) -> None:
    """Checkpoints to evaluate and where their validation documents come from."""
    parser.add_argument("checkpoints", nargs="+", help="checkpoint directories, or run directories (latest step)")
    add_corpus(parser, "corpus whose validation documents are read (any source `tttlm data` accepts; default: the "
                       "one each checkpoint was validated on, split as in training)", deprecated=("--data",))
    add_verify(parser)
    parser.add_argument("--cache-dir", default=None, help="token cache (default: the training run's, or ~/.cache)")
    parser.add_argument("--num-docs", type=positive_int, default=num_docs, help="documents per length, at most")
    if batch_size:
        add_micro_batch(parser, 1, "documents per forward call", deprecated=("--batch-size",))
