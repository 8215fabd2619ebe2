import numpy as np
import pytest

from tttlm.data.corpus import Corpus
from tttlm.data.shards import prepare_data
from tttlm.data.tokenizer import EOS, as_transformers, load_tokenizer
from tttlm.errors import UserError


def test_shards_hold_every_document_framed_by_eos_and_are_reused(tmp_path, text_dir):
    corpus = Corpus(str(text_dir), val_fraction=0.2)
    data = prepare_data(corpus, vocab_size=300, cache_dir=tmp_path / "cache", log=lambda *_: None)
    assert not data.cached and data.vocab_size == 300 and data.meta["dtype"] == "uint16"
    tok = data.tokenizer
    eos = tok.token_to_id(EOS)
    texts = {s: sorted(t for sp, _, t in corpus.documents() if sp == s) for s in ("train", "val")}
    for split in ("train", "val"):
        shard = data.split(split)
        assert shard.num_documents == len(texts[split]) > 0
        docs = [np.asarray(shard.tokens[a:b]) for a, b in zip(shard.offsets[:-1], shard.offsets[1:])]
        assert all(d[0] == eos and d[-1] == eos for d in docs)
        assert sorted(tok.decode(d[1:-1].tolist()) for d in docs) == texts[split]
    assert 0 < data.meta["unigram_val_loss"] < np.log(300)
    text = "def value(self):\n    return total"  # the shard directory carries the tokenizer of its tokens
    assert load_tokenizer(data.path).encode(text).ids == tok.encode(text).ids

    again = prepare_data(Corpus(str(text_dir), val_fraction=0.2), vocab_size=300, cache_dir=tmp_path / "cache")
    assert again.cached and again.path == data.path
    (text_dir / "doc00.txt").write_text("changed\n")  # a changed file invalidates the cache
    changed = prepare_data(Corpus(str(text_dir), val_fraction=0.2), vocab_size=300, cache_dir=tmp_path / "cache",
                           log=lambda *_: None)
    assert not changed.cached and changed.path != data.path


def test_tokenizer_loads_in_transformers_and_by_path(tmp_path, text_dir):
    data = prepare_data(Corpus(str(text_dir)), vocab_size=300, cache_dir=tmp_path / "cache", log=lambda *_: None)
    data.tokenizer.save(str(tmp_path / "tokenizer.json"))
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    text = "def value(self):\n    return total"
    assert hf(text)["input_ids"] == data.tokenizer.encode(text).ids
    assert as_transformers(data.tokenizer).decode(hf(text)["input_ids"]) == text
    reused = prepare_data(Corpus(str(text_dir)), tokenizer=str(tmp_path / "tokenizer.json"),
                          cache_dir=tmp_path / "cache")
    assert reused.cached and reused.path == data.path  # same corpus, same tokenizer: the same shards


def test_single_document_corpus_holds_out_its_tail(tmp_path, text_dir):
    data = prepare_data(Corpus(str(text_dir / "doc01.txt")), vocab_size=300, cache_dir=tmp_path / "c",
                        log=lambda *_: None)
    train, val = data.split("train"), data.split("val")
    assert data.meta["val_from_tail"] and train.num_documents == val.num_documents == 1
    assert val.num_tokens > 0 and train.num_tokens > 10 * val.num_tokens


def test_binary_only_corpus_is_an_error(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x00\xff" * 100)
    with pytest.raises(UserError, match="empty"):
        prepare_data(Corpus(str(tmp_path)), vocab_size=300, cache_dir=tmp_path / "c", log=lambda *_: None)


def test_missing_tokenizer_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"tokenizer file '{tmp_path / 'nope'}/tokenizer.json' does not"):
        (tmp_path / "nope").mkdir()
        load_tokenizer(tmp_path / "nope")
