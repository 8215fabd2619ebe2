"""Corpora named hf:NAME[:CONFIG[:SPLIT]], streamed through `datasets`, on local datasets only (no network):
a directory of JSON-lines files, which load_dataset reads as the Hub's own, and one written by save_to_disk."""

import json

import pytest

from tttlm.cli import main
from tttlm.data.corpus import Corpus, parse_hub
from tttlm.errors import UserError

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)


def rows(n, start=0):
    return [{"text": " ".join(f"token{(i * 7 + j) % 50}" for j in range(40)), "id": i} for i in range(start, start + n)]


@pytest.fixture
def hub_dir(tmp_path):
    """A dataset directory laid out as on the Hub: data files per split."""
    d = tmp_path / "hub"
    d.mkdir()
    for split, data in (("train", rows(30)), ("validation", rows(6, start=100))):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    return d


def test_sources_parse():
    assert parse_hub("hf:wikitext") == ("wikitext", None, "train", None)
    assert parse_hub("hf:wikitext:wikitext-103-raw-v1:validation") == ("wikitext", "wikitext-103-raw-v1",
                                                                        "validation", None)
    assert parse_hub("hf:HuggingFaceFW/fineweb-edu:sample-10BT:train[:1000]") == (
        "HuggingFaceFW/fineweb-edu", "sample-10BT", "train", 1000)
    for bad in ("hf:", "hf:x:y:train[:0]", "hf:x:y:tr ain"):
        with pytest.raises(UserError, match="hf:NAME"):
            parse_hub(bad)


def test_a_streamed_dataset_is_split_by_row_hash(hub_dir):
    corpus = Corpus(f"hf:{hub_dir}", val_fraction=0.2)
    docs = list(corpus.documents())
    texts = [r["text"] for r in rows(30)]
    assert [t for _, _, t in docs] == texts and [i for _, i, _ in docs] == [f"train:{i}" for i in range(30)]
    assert {s for s, i, _ in docs} == {"train", "val"} and all(s == corpus.split_of(i) for s, i, _ in docs)
    first = list(Corpus(f"hf:{hub_dir}::train[:5]").documents())
    assert [t for _, _, t in first] == texts[:5]
    validation = list(Corpus(f"hf:{hub_dir}::validation").documents())
    assert [t for _, _, t in validation] == [r["text"] for r in rows(6, start=100)]
    assert Corpus(f"hf:{hub_dir}").fingerprint() != Corpus(f"hf:{hub_dir}::train[:5]").fingerprint()


def test_a_dataset_saved_with_save_to_disk(tmp_path):
    datasets.Dataset.from_list(rows(12)).save_to_disk(str(tmp_path / "saved"))
    docs = list(Corpus(f"hf:{tmp_path / 'saved'}").documents())
    assert [t for _, _, t in docs] == [r["text"] for r in rows(12)]


def test_errors_are_one_line(hub_dir, tmp_path, capsys):
    with pytest.raises(UserError, match="has no field 'body'"):
        list(Corpus(f"hf:{hub_dir}", text_field="body").documents())
    assert main(["data", "--corpus", f"hf:{tmp_path / 'nothing'}", "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tttlm data: error: cannot stream hf:{tmp_path / 'nothing'}") and "\n" not in err


def test_train_on_a_hub_corpus_with_its_validation_split(hub_dir, tmp_path, capsys):
    """--corpus hf:... --val-corpus hf:...:validation: the train split trains, the validation split validates."""
    tiny = [f"--set={k}={v}" for k, v in (("hidden_size", 32), ("num_hidden_layers", 1), ("num_attention_heads", 2),
                                          ("intermediate_size", 64), ("mini_batch_size", 8))]
    argv = ["train", "--corpus", f"hf:{hub_dir}", "--val-corpus", f"hf:{hub_dir}::validation", *tiny,
            "--vocab-size", "300", "--seq-len", "16", "--batch-size", "2", "--steps", "2", "--warmup-steps", "1",
            "--eval-batches", "1", "--device", "cpu", "--no-tensorboard", "--cache-dir", str(tmp_path / "cache"),
            "--out-dir", str(tmp_path / "run")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "30 + 6 documents" in out and "validation loss" in out
