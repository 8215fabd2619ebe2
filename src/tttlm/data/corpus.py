"""Text corpora: where documents come from, which split each belongs to, and a fingerprint for caching.

A corpus source is one of:
  "stdlib" (or None)   the Python standard library's own .py files (found through sysconfig; tests,
                       site-packages, IDLE and the codec / help-text tables left out), one document per file
  a directory          every file under it (recursively; hidden ones skipped), each read by its suffix;
                       a directory written by `datasets.Dataset.save_to_disk` is read as that dataset
  a glob pattern       "data/**/*.txt" (recursive)
  a file               .jsonl (one document per line, its `text_field`), .parquet (the `text_field` column),
                       anything else is one plain-text document
Binary and non-UTF-8 files are skipped and counted. A document goes to the validation split when the hash of
its id (a path relative to the corpus root, plus a line or row number) falls below `val_fraction`, so the split
never depends on order, machine or file system.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tttlm.errors import UserError

STDLIB = "stdlib"
# tests, third-party packages, and modules that are data tables rather than code (codec maps, help texts)
_STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "turtledemo", "encodings",
                "pydoc_data"}
_DATASET_MARKERS = (("dataset_info.json", "state.json"), ("dataset_dict.json",))  # Dataset, DatasetDict
_SNIFF = 8192  # bytes read to decide whether a file is binary


@dataclass
class SkipCounts:
    """Files and records left out of a corpus, by reason."""

    binary: int = 0
    not_utf8: int = 0
    empty: int = 0

    def total(self) -> int:
        return self.binary + self.not_utf8 + self.empty

    def describe(self) -> str:
        parts = [f"{n} {why}" for why, n in (("binary", self.binary), ("non-UTF-8", self.not_utf8),
                                              ("empty", self.empty)) if n]
        return ", ".join(parts) if parts else "none"


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _STDLIB_SKIP.intersection(p.relative_to(root).parts[:-1])]
    return root, sorted(files)


def _is_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any(all((path / m).exists() for m in markers) for markers in _DATASET_MARKERS)


def _split_value(doc_id: str) -> float:
    h = hashlib.blake2b(doc_id.encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def _decode(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


@dataclass
class Corpus:
    """The documents of one source (see the module docstring), each tagged "train" or "val".

    After `documents()` has run to the end, `skipped` holds the counts of what was left out and `num_documents`
    the number kept.
    """

    source: str | None = None
    text_field: str = "text"
    val_fraction: float = 0.05
    skipped: SkipCounts = field(default_factory=SkipCounts)
    num_documents: int = 0

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"the validation fraction must be in (0, 1), got {self.val_fraction}")
        self.source = STDLIB if self.source in (None, "", STDLIB) else str(self.source)
        self.root, self.files, self.kind = self._resolve()

    def _resolve(self) -> tuple[Path, list[Path], str]:
        src = self.source
        if src == STDLIB:
            root, files = _stdlib_files()
            return root, files, "files"
        path = Path(src).expanduser()
        if any(c in src for c in "*?["):
            files = sorted(Path(p) for p in glob.glob(os.path.expanduser(src), recursive=True) if Path(p).is_file())
            if not files:
                raise FileNotFoundError(f"no files match the corpus pattern {src!r}")
            root = Path(os.path.commonpath([str(f.parent) for f in files]))
            return root, files, "files"
        if not path.exists():
            raise FileNotFoundError(f"corpus path {src!r} does not exist")
        if _is_dataset_dir(path):
            return path, sorted(p for p in path.rglob("*") if p.is_file()), "datasets"
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path))
            return path, files, "files"
        return path.parent, [path], "files"

    def stamps(self) -> dict[str, list[int]]:
        """{path relative to the root: [size in bytes, modification time in ns]} of every file."""
        return {str(f.relative_to(self.root)): [(st := f.stat()).st_size, st.st_mtime_ns] for f in self.files}

    def fingerprint(self) -> str:
        """A hash of the source, its options and every file's path, size and modification time."""
        h = hashlib.sha256(json.dumps([self.source, self.kind, self.text_field, self.val_fraction]).encode())
        for name, (size, mtime) in self.stamps().items():
            h.update(f"{name}\0{size}\0{mtime}\n".encode())
        return h.hexdigest()

    def split_of(self, doc_id: str) -> str:
        return "val" if _split_value(doc_id) < self.val_fraction else "train"

    def documents(self) -> Iterator[tuple[str, str, str]]:
        """(split, doc_id, text) for every non-empty document, in a fixed order."""
        self.skipped, self.num_documents = SkipCounts(), 0
        records = self._dataset_records() if self.kind == "datasets" else self._file_records()
        for doc_id, text in records:
            if text is None:
                continue
            if not text.strip():
                self.skipped.empty += 1
                continue
            self.num_documents += 1
            yield self.split_of(doc_id), doc_id, text

    def require_documents(self) -> None:
        """UserError when the last pass over `documents()` kept nothing."""
        if self.num_documents == 0:
            raise UserError(f"the corpus {self.source!r} is empty: {len(self.files)} file(s), no text documents "
                            f"(skipped: {self.skipped.describe()})")

    def _file_records(self) -> Iterator[tuple[str, str | None]]:
        for f in self.files:
            rel = f.relative_to(self.root).as_posix()
            suffix = f.suffix.lower()
            if suffix == ".jsonl":
                yield from self._jsonl(f, rel)
            elif suffix == ".parquet":
                yield from self._parquet(f, rel)
            else:
                yield rel, self._read_text(f)

    def _read_text(self, f: Path) -> str | None:
        data = f.read_bytes()
        if b"\0" in data[:_SNIFF]:
            self.skipped.binary += 1
            return None
        text = _decode(data)
        if text is None:
            self.skipped.not_utf8 += 1
        return text

    def _field(self, record, where: str) -> str:
        if not isinstance(record, dict) or self.text_field not in record:
            raise UserError(f"{where} has no field {self.text_field!r}; choose the text field with --text-field")
        value = record[self.text_field]
        if not isinstance(value, str):
            raise UserError(f"{where}: field {self.text_field!r} is {type(value).__name__}, not text")
        return value

    def _jsonl(self, f: Path, rel: str) -> Iterator[tuple[str, str | None]]:
        with open(f, "rb") as fh:
            for i, raw in enumerate(fh, 1):
                line = _decode(raw)
                if line is None:
                    self.skipped.not_utf8 += 1
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{f}:{i} is not valid JSON ({e.msg})") from None
                yield f"{rel}:{i}", self._field(record, f"{f}:{i}")

    def _parquet(self, f: Path, rel: str) -> Iterator[tuple[str, str | None]]:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(f)
        if self.text_field not in table.schema_arrow.names:
            raise UserError(f"{f} has no column {self.text_field!r} (columns: {', '.join(table.schema_arrow.names)});"
                            f" choose the text field with --text-field")
        row = 0
        for batch in table.iter_batches(columns=[self.text_field]):
            for value in batch.column(0).to_pylist():
                row += 1
                yield f"{rel}:{row}", value if isinstance(value, str) else ""

    def _dataset_records(self) -> Iterator[tuple[str, str | None]]:
        try:
            import datasets
        except ImportError:
            raise UserError(f"{self.source} is a saved `datasets` dataset; install it: pip install datasets") from None
        ds = datasets.load_from_disk(str(self.root))
        if isinstance(ds, datasets.DatasetDict):
            ds = datasets.concatenate_datasets([ds[k] for k in sorted(ds)])
        if self.text_field not in ds.column_names:
            raise UserError(f"the dataset at {self.root} has no column {self.text_field!r} (columns: "
                            f"{', '.join(ds.column_names)}); choose the text field with --text-field")
        for i, value in enumerate(ds[self.text_field]):
            yield f"{i}", value if isinstance(value, str) else ""
