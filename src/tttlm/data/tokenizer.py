"""Byte-level BPE tokenizers: trained on a corpus with HF tokenizers, saved as tokenizer.json, loadable as a
transformers PreTrainedTokenizerFast. The end-of-text token EOS frames every document (see shards)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tttlm.errors import UserError

EOS = "<|endoftext|>"
MIN_VOCAB = 260  # 256 byte symbols, EOS and a few merges


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` with `vocab_size` entries (EOS has id 0), trained on texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise UserError(f"the vocabulary size must be at least {MIN_VOCAB}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path):
    """The `tokenizers.Tokenizer` saved at path (a tokenizer.json, or a directory holding one); it must know EOS."""
    from tokenizers import Tokenizer

    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise UserError(f"{path} is not a tokenizer.json file ({e})") from None
    if tok.token_to_id(EOS) is None:
        tok.add_special_tokens([EOS])
    return tok


def tokenizer_key(tok) -> str:
    """A canonical string of what decides token ids (vocabulary, merges, added tokens, normalisation and
    pre-tokenisation), the same for a tokenizer and its copy re-saved by transformers."""
    spec = json.loads(tok.to_str())
    return json.dumps({k: spec.get(k) for k in ("added_tokens", "normalizer", "pre_tokenizer", "model")},
                      sort_keys=True)


def eos_id(tok) -> int:
    return tok.token_to_id(EOS)


def as_transformers(tok):
    """The `tokenizers.Tokenizer` tok as a transformers PreTrainedTokenizerFast with EOS as eos token."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None,
                                   clean_up_tokenization_spaces=False)


def save_tokenizer(tok, directory: str | Path) -> None:
    """Writes tokenizer.json (and the transformers files beside it) so that AutoTokenizer loads the directory."""
    as_transformers(tok).save_pretrained(str(directory))
