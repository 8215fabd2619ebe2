"""A checkpoint's manifest: manifest.json lists every other file of the directory with its size and SHA-256.

It is written last, inside the temporary directory that is renamed into place, so a checkpoint with a manifest
was complete when saved; comparing the files with it finds one cut short (an interrupted copy, a full disk),
missing, or changed since. Sizes cost a stat per file and are checked on every load; hashes read every byte
and are checked on `--resume` and where asked (`--verify`). `sha256sum` checks them by hand too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tttlm.errors import CheckpointError

MANIFEST = "manifest.json"
# the files only a resumed run reads: a checkpoint stripped of them (to share the model) still loads for inference
RESUME_ONLY = ("trainer_state.pt", "rng-", "data.json")
_CHUNK = 1 << 24


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, step: int) -> None:
    """Lists every file of `directory` (size and SHA-256) in directory/manifest.json."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))


def damage(directory: Path, hashes: bool = False, resume: bool = False) -> str | None:
    """What is wrong with the checkpoint `directory` by its manifest ("model.safetensors has 10 bytes, ..."), or
    None when every file matches (sizes; SHA-256 too with hashes=True). The files of RESUME_ONLY are checked
    only with resume=True. A directory without a manifest (written by transformers' save_pretrained, or by
    tttlm before manifests) cannot be checked and passes."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} cannot be read ({e})"
    if not resume:
        files = {name: entry for name, entry in files.items() if not name.startswith(RESUME_ONLY)}
    for name, entry in files.items():
        f = directory / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != entry["bytes"]:
            return f"{name} has {size:,d} bytes, its manifest says {entry['bytes']:,d}"
    if hashes:
        for name, entry in files.items():
            if sha256(directory / name) != entry["sha256"]:
                return f"{name} does not match its SHA-256 in {MANIFEST} (changed since it was saved)"
    return None


def verify(directory: Path, hashes: bool = False, resume: bool = False) -> None:
    """CheckpointError naming the damaged file of `directory` (see `damage`)."""
    problem = damage(directory, hashes, resume)
    if problem is not None:
        raise CheckpointError(f"checkpoint {directory} is damaged: {problem}")
