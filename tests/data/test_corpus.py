import json

import pytest

from tttlm.data.corpus import Corpus
from tttlm.errors import UserError


def test_stdlib_corpus_is_python_source_without_tests():
    c = Corpus()
    assert c.source == "stdlib" and len(c.files) > 100
    assert all(f.suffix == ".py" for f in c.files)
    assert not any("test" in f.relative_to(c.root).parts[:-1] for f in c.files)
    assert c.fingerprint() == Corpus("stdlib").fingerprint()


def test_formats_skips_and_deterministic_split(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    (tmp_path / "a.txt").write_text("alpha document\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta document\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n\n" + json.dumps({"text": "delta"}) + "\n")
    pq.write_table(pa.table({"text": ["epsilon", "zeta"]}), tmp_path / "d.parquet")
    (tmp_path / "e.bin").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "f.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "g.txt").write_text("   \n")
    (tmp_path / ".hidden.txt").write_text("never read")
    c = Corpus(str(tmp_path), val_fraction=0.5)
    docs = list(c.documents())
    texts = sorted(t.strip() for _, _, t in docs)
    assert texts == sorted(["alpha document", "beta document", "gamma", "delta", "epsilon", "zeta"])
    assert (c.skipped.binary, c.skipped.not_utf8, c.skipped.empty) == (1, 1, 1)
    ids = [i for _, i, _ in docs]
    assert "c.jsonl:3" in ids and "d.parquet:2" in ids  # line / row numbers identify records
    splits = {i: s for s, i, _ in docs}
    again = {i: s for s, i, _ in Corpus(str(tmp_path), val_fraction=0.5).documents()}
    assert splits == again and set(splits.values()) == {"train", "val"}
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), tmp_path / "h.parquet")
    with pytest.raises(UserError, match=r"h.parquet has no column 'text' \(columns: body, id\); choose"):
        list(Corpus(str(tmp_path / "h.parquet")).documents())


def test_glob_and_missing_paths(tmp_path, text_dir):
    c = Corpus(str(text_dir / "doc0*.txt"))
    assert len(c.files) == 10
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Corpus(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no files match"):
        Corpus(str(tmp_path / "*.nothing"))


def test_jsonl_without_the_text_field_is_a_clear_error(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(UserError, match="no field 'text'"):
        list(Corpus(str(tmp_path / "x.jsonl")).documents())
    (tmp_path / "y.jsonl").write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(UserError, match="field 'text' is int, not text"):
        list(Corpus(str(tmp_path / "y.jsonl")).documents())
    assert [t for _, _, t in Corpus(str(tmp_path / "x.jsonl"), text_field="body").documents()] == ["hello"]


def test_saved_datasets_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one doc", "two doc", ""]}).save_to_disk(str(tmp_path / "ds"))
    c = Corpus(str(tmp_path / "ds"))
    assert c.kind == "datasets"
    assert [t for _, _, t in c.documents()] == ["one doc", "two doc"]
    assert c.skipped.empty == 1
    with pytest.raises(UserError, match=r"has no column 'body' \(columns: text\); choose the text field"):
        list(Corpus(str(tmp_path / "ds"), text_field="body").documents())


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "only.bin").write_bytes(b"\x00" * 10)
    c = Corpus(str(tmp_path))
    list(c.documents())
    with pytest.raises(UserError, match="is empty.*1 binary"):
        c.require_documents()
