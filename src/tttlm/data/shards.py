"""Token shards: a corpus tokenized once into memory-mapped arrays with document boundaries, cached on disk.

A shard directory holds, per split ("train", "val"), `{split}.bin` (all documents' tokens back to back, each
framed by EOS at both ends so that the model learns how documents start and end; uint16 when the vocabulary
fits, else uint32) and `{split}.offsets.npy` (int64 [N+1]: document i is tokens[offsets[i]:offsets[i+1]]),
plus tokenizer.json and meta.json (counts, the unigram baseline). Its name is a hash of the corpus fingerprint
(files, sizes, mtimes, options) and the tokenizer, so a later run on the same corpus and tokenizer reuses it.
A trained tokenizer is cached the same way, keyed by corpus and vocabulary size. Directories are written under
a temporary name and renamed, so a crash never leaves half a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tttlm.data.corpus import Corpus, SkipCounts
from tttlm.data.tokenizer import eos_id, load_tokenizer, tokenizer_key, train_tokenizer
from tttlm.errors import UserError

SPLITS = ("train", "val")
_VERSION = 2  # bump when the shard layout or tokenizer training changes
_BATCH_DOCS = 256  # documents per encode_batch call (tokenizers encodes a batch on all cores)


def default_cache_dir() -> Path:
    """$TTTLM_CACHE, else ~/.cache/tttlm."""
    return Path(os.environ.get("TTTLM_CACHE") or Path.home() / ".cache" / "tttlm").expanduser()


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps([_VERSION, *parts]).encode()).hexdigest()[:20]


@dataclass
class TokenShard:
    """One split: tokens [n] (memory-mapped) and document offsets [N+1] int64."""

    tokens: np.ndarray
    offsets: np.ndarray

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def open(cls, directory: Path, split: str, dtype: str) -> TokenShard:
        offsets = np.load(directory / f"{split}.offsets.npy")
        n = int(offsets[-1])
        tokens = np.memmap(directory / f"{split}.bin", dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
        return cls(tokens, offsets)


@dataclass
class PreparedData:
    """A corpus ready to train on: its shard directory, tokenizer and meta (see the module docstring)."""

    path: Path
    tokenizer: object  # tokenizers.Tokenizer
    meta: dict
    cached: bool
    seconds: float

    def split(self, name: str) -> TokenShard:
        return TokenShard.open(self.path, name, self.meta["dtype"])

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]


def _atomic_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))


def _publish(tmp: Path, final: Path) -> None:
    try:
        os.replace(tmp, final)
    except OSError:  # another process published the same content first
        shutil.rmtree(tmp, ignore_errors=True)


def _texts(corpus: Corpus, split: str) -> Iterator[str]:
    for s, _, text in corpus.documents():
        if s == split:
            yield text


def get_tokenizer(corpus: Corpus, tokenizer: str | None, vocab_size: int, cache_dir: Path, log=print):
    """The tokenizer at path `tokenizer`, or a byte-level BPE of vocab_size trained on the corpus' train split
    (cached)."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    final = cache_dir / "tokenizers" / _hash(corpus.fingerprint(), vocab_size)
    if (final / "tokenizer.json").is_file():
        return load_tokenizer(final / "tokenizer.json")
    t0 = time.perf_counter()
    tok = train_tokenizer(_texts(corpus, "train"), vocab_size)
    corpus.require_documents()
    tmp = _atomic_dir(final)
    tok.save(str(tmp / "tokenizer.json"))
    _publish(tmp, final)
    log(f"trained a byte-level BPE tokenizer ({tok.get_vocab_size()} tokens) in {time.perf_counter() - t0:.1f} s")
    return tok


def _carve_val_from_tail(tmp: Path, dtype, val_fraction: float) -> None:
    """Moves the last val_fraction of the train tokens to the (empty) val split, cutting a document if needed."""
    offsets = np.load(tmp / "train.offsets.npy")
    n = int(offsets[-1])
    cut = int(n * (1 - val_fraction))
    if cut <= 0 or cut >= n:
        raise UserError(f"the corpus is too small to hold out a validation split ({n} tokens)")
    tokens = np.fromfile(tmp / "train.bin", dtype=dtype)
    tokens[cut:].tofile(tmp / "val.bin")
    tokens[:cut].tofile(tmp / "train.bin")
    keep = offsets[offsets < cut]
    np.save(tmp / "train.offsets.npy", np.append(keep, cut).astype(np.int64))
    val_starts = offsets[offsets > cut] - cut
    np.save(tmp / "val.offsets.npy", np.concatenate([[0], val_starts]).astype(np.int64))


def _unigram_loss(train: TokenShard, val: TokenShard, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the val tokens under the train split's token frequencies (add-1/2)."""
    chunk = 1 << 24
    counts = np.zeros(vocab_size, np.float64)
    for s in range(0, train.num_tokens, chunk):
        counts += np.bincount(train.tokens[s : s + chunk], minlength=vocab_size)[:vocab_size]
    logp = np.log((counts + 0.5) / (counts.sum() + 0.5 * vocab_size))
    total = sum(float(logp[val.tokens[s : s + chunk]].sum()) for s in range(0, val.num_tokens, chunk))
    return -total / max(1, val.num_tokens)


def _tokenize(corpus: Corpus, tok, tmp: Path, dtype) -> dict:
    eos = eos_id(tok)
    files = {s: open(tmp / f"{s}.bin", "wb") for s in SPLITS}
    lengths: dict[str, list[int]] = {s: [] for s in SPLITS}
    pending: list[tuple[str, str]] = []

    def flush():
        encodings = tok.encode_batch([text for _, text in pending], add_special_tokens=False)
        for (split, _), enc in zip(pending, encodings):
            ids = np.asarray([eos, *enc.ids, eos], dtype=dtype)
            ids.tofile(files[split])
            lengths[split].append(len(ids))
        pending.clear()

    try:
        for split, _, text in corpus.documents():
            pending.append((split, text))
            if len(pending) >= _BATCH_DOCS:
                flush()
        if pending:
            flush()
    finally:
        for f in files.values():
            f.close()
    corpus.require_documents()
    for s in SPLITS:
        np.save(tmp / f"{s}.offsets.npy", np.concatenate([[0], np.cumsum(lengths[s], dtype=np.int64)]))
    return {"documents": {s: len(lengths[s]) for s in SPLITS}}


def prepare_data(corpus: Corpus, *, tokenizer: str | None = None, vocab_size: int = 4096,
                 cache_dir: str | Path | None = None, log=print) -> PreparedData:
    """Tokenizes `corpus` into cached shards (or finds them cached). tokenizer: a tokenizer.json path, or None
    to train a byte-level BPE of `vocab_size` on the corpus. Returns the PreparedData."""
    t0 = time.perf_counter()
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    tok = get_tokenizer(corpus, tokenizer, vocab_size, cache_dir, log)
    final = cache_dir / "shards" / _hash(corpus.fingerprint(), tokenizer_key(tok))
    cached = (final / "meta.json").is_file()
    if not cached:
        V = tok.get_vocab_size()
        dtype = np.dtype(np.uint16 if V <= 65535 else np.uint32)
        tmp = _atomic_dir(final)
        try:
            meta = _tokenize(corpus, tok, tmp, dtype)
            meta.update(source=corpus.source, vocab_size=V, dtype=dtype.name, skipped=vars(corpus.skipped),
                        val_from_tail=meta["documents"]["val"] == 0)
            if meta["val_from_tail"]:
                _carve_val_from_tail(tmp, dtype, corpus.val_fraction)
            shards = {s: TokenShard.open(tmp, s, dtype.name) for s in SPLITS}
            meta["documents"] = {s: shards[s].num_documents for s in SPLITS}
            meta["tokens"] = {s: shards[s].num_tokens for s in SPLITS}
            meta["max_document_tokens"] = {s: int(shards[s].lengths.max(initial=0)) for s in SPLITS}
            meta["unigram_val_loss"] = _unigram_loss(shards["train"], shards["val"], V)
            tok.save(str(tmp / "tokenizer.json"))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _publish(tmp, final)
    meta = json.loads((final / "meta.json").read_text())
    seconds = time.perf_counter() - t0
    docs, tokens = meta["documents"], meta["tokens"]
    how = "reused the cached shards" if cached else "tokenized into new shards"
    log(f"{how} in {seconds:.2f} s: {docs['train']:,d} + {docs['val']:,d} documents, {tokens['train']:,d} + "
        f"{tokens['val']:,d} tokens (train + validation); skipped: {SkipCounts(**meta['skipped']).describe()}")
    return PreparedData(final, tok, meta, cached, seconds)
