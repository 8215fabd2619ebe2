"""Text corpora: where documents come from, which split each belongs to, and a fingerprint for caching.

A corpus source is one of:
  "stdlib" (or None)   the Python standard library's own .py files (found through sysconfig; tests,
                       site-packages, IDLE and the codec / help-text tables left out), one document per file
  "python"             every .py file installed with the running interpreter: its standard library (sysconfig's
                       stdlib and platstdlib, site-packages inside them left out) and its site-packages (purelib,
                       platlib), tests included; ids "stdlib/<path>" and "site-packages/<path>", so the split
                       depends only on paths inside those folders. Exact duplicates (same bytes) are removed:
                       the file first in id order is kept, the others counted. `Corpus.manifest()` lists the
                       packages it holds.
  a directory          every file under it (recursively; hidden ones skipped), each read by its suffix;
                       a directory written by `datasets.Dataset.save_to_disk` is read as that dataset
  a glob pattern       "data/**/*.txt" (recursive)
  a file               .jsonl (one document per line, its `text_field`), .parquet (the `text_field` column),
                       anything else is one plain-text document
  "hf:NAME[:CONFIG[:SPLIT]]"  a dataset of the Hugging Face Hub, or a local directory of data files or
                       written by save_to_disk, streamed row by row (`datasets.load_dataset(..., streaming=True)`);
                       SPLIT defaults to "train" and may end in "[:N]" to read its first N rows only; ids
                       "SPLIT:ROW"
Binary and non-UTF-8 files are skipped and counted. A document goes to the validation split when the hash of
its id (a path relative to the corpus root, plus a line or row number) falls below `val_fraction`, so the split
never depends on order, machine or file system. With `val_source`, every document of `source` trains and every
document of `val_source` (any of the above) validates; their ids start with "val:".
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tttlm.errors import UserError

STDLIB = "stdlib"
PYTHON = "python"
HUB = "hf:"
# tests, third-party packages, and modules that are data tables rather than code (codec maps, help texts)
_STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "turtledemo", "encodings",
                "pydoc_data"}
_SITE_DIRS = {"site-packages", "dist-packages"}
# sysconfig paths of the python corpus, by the folder name its document ids start with
_PYTHON_ROOTS = {"stdlib": ("stdlib", "platstdlib"), "site-packages": ("purelib", "platlib")}
_DATASET_MARKERS = (("dataset_info.json", "state.json"), ("dataset_dict.json",))  # Dataset, DatasetDict
_SNIFF = 8192  # bytes read to decide whether a file is binary


@dataclass
class SkipCounts:
    """Files and records left out of a corpus, by reason."""

    binary: int = 0
    not_utf8: int = 0
    empty: int = 0
    duplicate: int = 0

    def total(self) -> int:
        return self.binary + self.not_utf8 + self.empty + self.duplicate

    def add(self, other: SkipCounts) -> None:
        for name, n in vars(other).items():
            setattr(self, name, getattr(self, name) + n)

    def describe(self) -> str:
        parts = [f"{n} {why}" for why, n in (("binary", self.binary), ("non-UTF-8", self.not_utf8),
                                              ("empty", self.empty), ("duplicate", self.duplicate)) if n]
        return ", ".join(parts) if parts else "none"


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _STDLIB_SKIP.intersection(p.relative_to(root).parts[:-1])]
    return root, sorted(files)


def _python_files() -> list[tuple[str, Path]]:
    """(id, path) of every .py file of the interpreter (see the module docstring), sorted by id."""
    paths = sysconfig.get_paths()
    found: dict[str, Path] = {}
    for label, keys in _PYTHON_ROOTS.items():
        for key in keys:
            root = Path(paths[key])
            if not root.is_dir():
                continue
            for f in root.rglob("*.py"):
                parts = f.relative_to(root).parts
                if "__pycache__" in parts or (label == "stdlib" and _SITE_DIRS.intersection(parts[:-1])):
                    continue
                if f.is_file():  # platstdlib is often stdlib itself: one id per file
                    found.setdefault(f"{label}/{'/'.join(parts)}", f)
    return sorted(found.items())


def _package(doc_id: str) -> str:
    """The group a document of the python corpus belongs to: "stdlib", or the top-level package (or module) it
    comes from in site-packages."""
    label, _, rest = doc_id.partition("/")
    if label == "stdlib":
        return label
    top = rest.split("/", 1)[0]
    return top[:-3] if top.endswith(".py") and "/" not in rest else top


def _distributions() -> dict[str, list[str]]:
    """Installed distributions ("name version") by the top-level names they provide."""
    versions = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            versions.setdefault(name, f"{name} {dist.version}")
    return {top: sorted({versions.get(d, d) for d in dists})
            for top, dists in importlib.metadata.packages_distributions().items()}


def parse_hub(source: str) -> tuple[str, str | None, str, int | None]:
    """(name, config, split, row limit) of a source "hf:NAME[:CONFIG[:SPLIT[[:N]]]]"."""
    parts = source[len(HUB):].split(":")
    name, config, split = parts[0], parts[1] if len(parts) > 1 else None, ":".join(parts[2:]) or "train"
    limit = None
    if (m := re.fullmatch(r"(\w[\w.-]*)\[:(\d+)\]", split)) is not None:
        split, limit = m.group(1), int(m.group(2))
    if not name or not re.fullmatch(r"\w[\w.-]*", split) or limit == 0:
        raise UserError(f"a Hub corpus is hf:NAME[:CONFIG[:SPLIT]] (SPLIT may end in [:N], N > 0), got {source!r}")
    return name, config or None, split, limit


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
    val_source: str | None = None
    skipped: SkipCounts = field(default_factory=SkipCounts)
    num_documents: int = 0

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"the validation fraction must be in (0, 1), got {self.val_fraction}")
        self.source = STDLIB if self.source in (None, "", STDLIB) else str(self.source)
        self.root, self.ids, self.files, self.kind = self._resolve()
        self.dedupe = self.source == PYTHON
        self.validation = None if self.val_source is None else Corpus(self.val_source, self.text_field,
                                                                      self.val_fraction)

    def _resolve(self) -> tuple[Path, list[str], list[Path], str]:
        """The root folder, the files' ids (their paths relative to the root, unless the source names them),
        the files, and the kind ("files" or "datasets") of the source."""
        if self.source == PYTHON:
            found = _python_files()
            return Path(sysconfig.get_paths()["stdlib"]), [i for i, _ in found], [f for _, f in found], "files"
        if self.source.startswith(HUB):
            name = parse_hub(self.source)[0]
            local = Path(name).expanduser()
            # a local dataset directory is stamped like any other; a Hub name has no files to stamp
            files = sorted(p for p in local.rglob("*") if p.is_file() and not _hidden(p, local)) if local.is_dir() \
                else []
            return local, [f.relative_to(local).as_posix() for f in files], files, "hub"
        root, files, kind = (*_stdlib_files(), "files") if self.source == STDLIB else self._resolve_path(self.source)
        return root, [f.relative_to(root).as_posix() for f in files], files, kind

    def _resolve_path(self, src: str) -> tuple[Path, list[Path], str]:
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
        """{document id (the file's path relative to its root): [size in bytes, modification time in ns]} of every
        file (the validation source's with ids "val:...")."""
        files = zip(self.ids, self.files, strict=True)
        own = {doc_id: [(st := f.stat()).st_size, st.st_mtime_ns] for doc_id, f in files}
        if self.validation is not None:
            own.update({f"val:{k}": v for k, v in self.validation.stamps().items()})
        return own

    def fingerprint(self) -> str:
        """A hash of the source, its options and every file's path, size and modification time (a Hub dataset's
        name only: one changed on the Hub is not noticed)."""
        options = [self.source, self.kind, self.text_field, self.val_fraction, self.val_source]
        h = hashlib.sha256(json.dumps(options if self.val_source else options[:-1]).encode())
        for name, (size, mtime) in self.stamps().items():
            h.update(f"{name}\0{size}\0{mtime}\n".encode())
        return h.hexdigest()

    def split_of(self, doc_id: str) -> str:
        if self.validation is not None:
            return "val" if doc_id.startswith("val:") else "train"
        return "val" if _split_value(doc_id) < self.val_fraction else "train"

    def documents(self) -> Iterator[tuple[str, str, str]]:
        """(split, doc_id, text) for every non-empty document, in a fixed order."""
        self.skipped, self.num_documents = SkipCounts(), 0
        seen: set[bytes] = set()  # content hashes of the documents kept, when removing duplicates
        val_documents = 0
        for doc_id, text, dedupe in self._all_records():
            if text is None:
                continue
            if not text.strip():
                self.skipped.empty += 1
                continue
            if dedupe:
                digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
                if digest in seen:
                    self.skipped.duplicate += 1
                    continue
                seen.add(digest)
            self.num_documents += 1
            split = self.split_of(doc_id)
            val_documents += split == "val"
            yield split, doc_id, text
        if self.validation is not None:
            self.skipped.add(self.validation.skipped)
            if val_documents == 0:
                raise UserError(f"the validation corpus {self.val_source!r} holds no text documents (skipped: "
                                f"{self.validation.skipped.describe()})")

    def _records(self) -> Iterator[tuple[str, str | None]]:
        """(doc_id, text or None) of this source alone."""
        if self.kind == "datasets":
            return self._dataset_records()
        return self._hub_records() if self.kind == "hub" else self._file_records()

    def _all_records(self) -> Iterator[tuple[str, str | None, bool]]:
        """(doc_id, text or None, whether to drop it as a duplicate) of the source, then the validation source."""
        for doc_id, text in self._records():
            yield doc_id, text, self.dedupe
        if self.validation is not None:
            self.validation.skipped = SkipCounts()
            for doc_id, text in self.validation._records():
                yield f"val:{doc_id}", text, self.validation.dedupe

    def require_documents(self) -> None:
        """UserError when the last pass over `documents()` kept nothing."""
        if self.num_documents == 0:
            raise UserError(f"the corpus {self.source!r} is empty: {len(self.files)} file(s), no text documents "
                            f"(skipped: {self.skipped.describe()})")

    def manifest(self) -> dict:
        """What the corpus holds, from one pass over `documents()`: counts of files found, documents kept and
        their UTF-8 bytes, by split and by group (python: "stdlib" and each top-level site-packages package,
        with the distributions that provide it; other sources: the first folder of the document's path),
        what was skipped and why, and the fingerprint."""
        groups: dict[str, dict] = {}
        splits = {s: {"documents": 0, "bytes": 0} for s in ("train", "val")}
        for split, doc_id, text in self.documents():
            name = _package(doc_id) if self.source == PYTHON else (doc_id.split("/", 1)[0] if "/" in doc_id else ".")
            g = groups.setdefault(name, {"name": name, "documents": 0, "bytes": 0, "val_documents": 0})
            size = len(text.encode())
            g["documents"] += 1
            g["bytes"] += size
            g["val_documents"] += split == "val"
            splits[split]["documents"] += 1
            splits[split]["bytes"] += size
        self.require_documents()
        record = {"source": self.source, "fingerprint": self.fingerprint(), "val_fraction": self.val_fraction,
                  "files": len(self.files), "documents": self.num_documents,
                  "bytes": sum(s["bytes"] for s in splits.values()), "splits": splits, "skipped": vars(self.skipped)}
        if self.source == PYTHON:
            dists = _distributions()
            for g in groups.values():
                g["distributions"] = dists.get(g["name"], [])
            record["python"] = platform.python_version()
            record["paths"] = {k: sysconfig.get_paths()[k] for keys in _PYTHON_ROOTS.values() for k in keys}
        record["groups"] = sorted(groups.values(), key=lambda g: (-g["bytes"], g["name"]))
        return record

    def _file_records(self) -> Iterator[tuple[str, str | None]]:
        for rel, f in zip(self.ids, self.files, strict=True):
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

    def _hub_records(self) -> Iterator[tuple[str, str | None]]:
        try:
            import datasets
        except ImportError:
            raise UserError(f"{self.source} is read with `datasets`; install it: pip install datasets") from None
        name, config, split, limit = parse_hub(self.source)
        try:
            if _is_dataset_dir(self.root):  # written by save_to_disk, which load_dataset refuses
                ds = datasets.load_from_disk(str(self.root))
                ds = (ds[split] if isinstance(ds, datasets.DatasetDict) else ds).to_iterable_dataset()
            else:
                ds = datasets.load_dataset(name, config, split=split, streaming=True)
        except Exception as e:  # unknown name, config or split, or no network: one line, not a traceback
            raise UserError(f"cannot stream {self.source}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") \
                from None
        if limit is not None:
            ds = ds.take(limit)
        for i, row in enumerate(ds):
            yield f"{split}:{i}", self._field(row, f"{self.source} row {i}")
