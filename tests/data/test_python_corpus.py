"""The `python` corpus: every .py file of the interpreter's standard library and site-packages, found through
sysconfig (faked here with small folders), exact duplicates removed, split by the hash of paths inside those
folders, and its manifest."""

import json
import sysconfig

import pytest

from tttlm.cli import main
from tttlm.data.corpus import Corpus, _split_value

SOURCE = "def f(x):\n    return x + {}  # café\n"


def _install(root, name: str, files: dict) -> dict:
    """Writes a fake interpreter under root/name: stdlib (with a site-packages inside it, which the corpus
    must leave out) and two site-packages folders (purelib, platlib). Returns sysconfig-like paths."""
    base = root / name
    for rel, text in files.items():
        f = base / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return {"stdlib": str(base / "lib"), "platstdlib": str(base / "lib"), "purelib": str(base / "site"),
            "platlib": str(base / "site64")}


FILES = {
    "lib/os.py": SOURCE.format("'os'"),
    "lib/json/__init__.py": SOURCE.format(1),
    "lib/json/decoder.py": SOURCE.format(2),
    "lib/site-packages/inside_stdlib.py": SOURCE.format(3),  # another interpreter's packages: not ours
    "lib/__pycache__/os.py": SOURCE.format(4),
    "site/pkg_a/__init__.py": "",  # empty: skipped as empty, not as a duplicate
    "site/pkg_a/core.py": SOURCE.format("'shared'"),
    "site/pkg_b/__init__.py": "",
    "site/pkg_b/core.py": SOURCE.format("'shared'"),  # same bytes as pkg_a/core.py: removed
    "site/pkg_b/notes.txt": "not python",
    "site/single.py": SOURCE.format(5),
    "site64/pkg_c/fast.py": SOURCE.format("'os'"),  # same bytes as lib/os.py; site-packages/ sorts first
    **{f"site/many/m{i:02d}.py": SOURCE.format(100 + i) for i in range(24)},
}


@pytest.fixture
def fake_python(tmp_path, monkeypatch):
    """Points sysconfig at a fake interpreter; returns a function installing another one (same files, other
    folder) and pointing sysconfig there."""

    def use(name: str, files: dict = FILES) -> dict:
        paths = _install(tmp_path, name, files)
        monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: paths)
        return paths

    use("one")
    return use


def test_finds_stdlib_and_site_packages_and_removes_duplicates(fake_python):
    c = Corpus("python", val_fraction=0.3)
    assert c.ids == sorted(c.ids) and len(c.ids) == len(set(c.ids))
    assert "stdlib/os.py" in c.ids and "site-packages/pkg_c/fast.py" in c.ids  # platlib under site-packages/
    assert not any("inside_stdlib" in i or "__pycache__" in i or i.endswith(".txt") for i in c.ids)
    kept = {i: t for _, i, t in c.documents()}
    assert c.skipped.duplicate == 2 and c.skipped.empty == 2
    assert "site-packages/pkg_a/core.py" in kept and "site-packages/pkg_b/core.py" not in kept
    assert "site-packages/pkg_c/fast.py" in kept and "stdlib/os.py" not in kept  # the first id of the two wins
    assert len(kept) == len(set(kept.values())) == len(c.ids) - 4


def test_split_depends_only_on_paths_inside_the_interpreter(fake_python):
    first = {i: s for s, i, _ in Corpus("python", val_fraction=0.3).documents()}
    assert set(first.values()) == {"train", "val"}
    assert all((s == "val") == (_split_value(i) < 0.3) for i, s in first.items())
    fake_python("elsewhere/deeper")  # the same files installed under another prefix, written later
    moved = Corpus("python", val_fraction=0.3)
    assert {i: s for s, i, _ in moved.documents()} == first
    changed = dict(FILES, **{"site/pkg_a/core.py": SOURCE.format("'edited'")})
    fake_python("changed", changed)  # an edited file does not move any document to the other split
    again = {i: s for s, i, _ in Corpus("python", val_fraction=0.3).documents()}
    added = "site-packages/pkg_b/core.py"  # no longer a copy of pkg_a/core.py
    assert again == {**first, added: "val" if _split_value(added) < 0.3 else "train"}


def test_manifest_counts_packages_and_bytes(fake_python):
    c = Corpus("python", val_fraction=0.3)
    m = c.manifest()
    docs = {i: t for _, i, t in c.documents()}
    assert m["source"] == "python" and m["files"] == len(c.ids) and m["documents"] == len(docs)
    assert m["bytes"] == sum(len(t.encode()) for t in docs.values())
    assert m["skipped"]["duplicate"] == 2 and m["fingerprint"] == c.fingerprint()
    groups = {g["name"]: g for g in m["groups"]}
    assert set(groups) == {"stdlib", "pkg_a", "pkg_c", "single", "many"}  # pkg_b holds only an empty file and a copy
    assert (groups["stdlib"]["documents"], groups["pkg_a"]["documents"], groups["many"]["documents"]) == (2, 1, 24)
    assert groups["many"]["bytes"] == sum(len(t.encode()) for i, t in docs.items() if "/many/" in i)
    assert sum(g["val_documents"] for g in m["groups"]) == m["splits"]["val"]["documents"]
    assert [g["bytes"] for g in m["groups"]] == sorted((g["bytes"] for g in m["groups"]), reverse=True)
    assert all(g["distributions"] == [] for g in m["groups"])  # nothing installed provides the fake packages


def test_data_command_lists_packages_and_writes_the_manifest(fake_python, tmp_path, capsys):
    out = tmp_path / "manifest.json"
    code = main(["data", "python", "--vocab-size", "300", "--val-fraction", "0.3", "--cache-dir",
                 str(tmp_path / "cache"), "--manifest", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "many" in printed and "2 duplicate" in printed
    assert json.loads(out.read_text())["groups"][0]["name"] == "many"


def test_the_real_interpreter():
    c = Corpus("python")
    assert "stdlib/os.py" in c.ids and "site-packages/torch/__init__.py" in c.ids
    assert all(i.startswith(("stdlib/", "site-packages/")) and i.endswith(".py") for i in c.ids)
    assert not any("__pycache__" in i for i in c.ids)
    assert len(c.ids) > len(Corpus("stdlib").ids)
    from tttlm.data.corpus import _distributions

    assert any(d.startswith("torch ") for d in _distributions()["torch"])
