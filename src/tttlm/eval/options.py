"""Command-line options that several evaluation commands share."""

from __future__ import annotations

import argparse


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


def add_device(
    parser: argparse.ArgumentParser,
    dtype_help: str | None = "model dtype (default float32)",
    auto_dtype: bool = False,
) -> None:
    """--device, and unless dtype_help is None --dtype (default float32; with auto_dtype, "auto" is allowed
    and the default)."""
    parser.add_argument("--device", default="auto", help="torch device; auto: CUDA when present, else CPU")
    if dtype_help is None:
        return
    choices = ["float32", "bfloat16", "float16"] + (["auto"] if auto_dtype else [])
    parser.add_argument("--dtype", default="auto" if auto_dtype else "float32", choices=choices, help=dtype_help)


def add_verify(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verify", action="store_true",
                        help="also check every file's SHA-256 against the checkpoint's manifest (sizes are always "
                             "checked)")


def add_out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory for the JSON result and the PNG figure")


def add_documents(parser: argparse.ArgumentParser, num_docs: int, batch_size: bool = True) -> None:
    """Checkpoints to evaluate and where their validation documents come from."""
    parser.add_argument("checkpoints", nargs="+", help="checkpoint directories, or run directories (latest step)")
    parser.add_argument(
        "--data",
        default=None,
        help="corpus whose validation split is read (any source `tttlm data` accepts; default: the corpus "
        "each checkpoint was trained on, split as in training)",
    )
    add_verify(parser)
    parser.add_argument("--cache-dir", default=None, help="token cache (default: the training run's, or ~/.cache)")
    parser.add_argument(
        "--num-docs",
        type=positive_int,
        default=num_docs,
        help=f"documents per length, at most (default {num_docs})",
    )
    if batch_size:
        parser.add_argument("--batch-size", type=positive_int, default=1, help="documents per forward call")
