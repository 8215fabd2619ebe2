"""Validation documents as token ids, from the training data pipeline (`tttlm.data`): the corpus' validation
split, tokenized (and cached) with the checkpoint's own tokenizer. Documents are read whole from their start,
never concatenated, so position t of a row really is the t-th token of one document."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def load_documents(
    source: str | None,
    tokenizer_file: str | Path,
    min_length: int,
    max_docs: int,
    *,
    split: str = "val",
    text_field: str = "text",
    val_fraction: float = 0.05,
    val_source: str | None = None,
    cache_dir: str | Path | None = None,
) -> Tensor:
    """The first `min_length` tokens of up to `max_docs` documents of the corpus `source` (any source
    `tttlm.data.corpus.Corpus` reads; None: the Python standard library; with val_source, validation is all of
    that source) in `split` that hold at least that many tokens, in corpus order. tokenizer_file: the
    checkpoint's tokenizer.json.

    Returns int64 [N, min_length] with 1 <= N <= max_docs; a ValueError when no document is long enough.
    """
    from tttlm.data.corpus import Corpus
    from tttlm.data.shards import prepare_data

    if min_length < 2:
        raise ValueError(f"documents must hold at least 2 tokens, got min_length = {min_length}")
    corpus = Corpus(source, text_field=text_field, val_fraction=val_fraction, val_source=val_source)
    data = prepare_data(corpus, tokenizer=str(tokenizer_file), cache_dir=cache_dir, log=lambda *a: None)
    shard = data.split(split)
    starts = shard.offsets[:-1][shard.lengths >= min_length][:max_docs]
    if starts.size == 0:
        longest = int(shard.lengths.max(initial=0))
        raise ValueError(
            f"no {split} document of corpus {corpus.source!r} holds {min_length} tokens (the longest holds "
            f"{longest}); pass shorter lengths or a corpus with longer documents"
        )
    rows = np.stack([np.asarray(shard.tokens[s : s + min_length], dtype=np.int64) for s in starts])
    return torch.from_numpy(rows)
