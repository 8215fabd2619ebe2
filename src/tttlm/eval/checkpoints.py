"""Models for the evaluations: checkpoints written by `tttlm train` (`tttlm.train.checkpoint`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """ "auto": CUDA when present, else CPU; otherwise a torch device string ("cpu", "cuda", "cuda:1")."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """ "auto": bfloat16 on CUDA, float32 elsewhere; otherwise the dtype named."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


class Checkpoint:
    """One checkpoint directory (or the latest one of a run directory): its path, name, training settings.
    Checked against its manifest on construction (sizes; SHA-256 too with hashes=True): a damaged one is a
    CheckpointError naming the file before any work starts."""

    def __init__(self, path: str | Path, hashes: bool = False):
        from tttlm.train.checkpoint import resolve_checkpoint

        self.path = resolve_checkpoint(path, hashes)
        train_file = self.path / "train.json"
        self.train = json.loads(train_file.read_text()) if train_file.is_file() else {}

    @property
    def name(self) -> str:
        """Its name in tables and legends: the run directory's name and the step folder's."""
        p = self.path.resolve()
        return f"{p.parent.name}/{p.name}" if p.name.startswith("step-") else p.name

    @property
    def trained_context(self) -> int | None:
        """The sequence length it was trained at (train.json's seq_len), when recorded."""
        value = self.train.get("seq_len")
        return value if isinstance(value, int) else None

    @property
    def tokenizer_file(self) -> Path:
        return self.path / "tokenizer.json"

    def load(self, device: torch.device, dtype: torch.dtype = torch.float32):
        """The model in eval mode on device, cast to dtype (`tttlm.train.checkpoint.load_pretrained`)."""
        from tttlm.train.checkpoint import load_pretrained

        model, _, _ = load_pretrained(self.path, device)
        return model.to(dtype)

    def documents(self, source: str | None, min_length: int, max_docs: int, cache_dir=None) -> torch.Tensor:
        """Validation documents (`tttlm.eval.documents.load_documents`) tokenized with this checkpoint's
        tokenizer; source None: those it was validated on in training (its val_corpus, or its corpus' split)."""
        from tttlm.eval.documents import load_documents

        if source is None:
            source = self.train.get("corpus")
        same_corpus = source == self.train.get("corpus")
        return load_documents(
            source,
            self.tokenizer_file,
            min_length,
            max_docs,
            text_field=self.train.get("text_field", "text") if same_corpus else "text",
            val_fraction=self.train.get("val_fraction", 0.05) if same_corpus else 0.05,
            val_source=self.train.get("val_corpus") if same_corpus else None,
            cache_dir=cache_dir if cache_dir is not None else self.train.get("cache_dir"),
        )
