import random

import pytest

_WORDS = ("def return self value index total count items result print while for if else import class "
          "data name list dict key lambda yield None True False").split()


def fake_source(rng: random.Random, lines: int) -> str:
    out = []
    for _ in range(lines):
        depth = rng.randint(0, 3)
        out.append("    " * depth + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 8))))
    return "\n".join(out) + "\n"


@pytest.fixture
def text_dir(tmp_path):
    """A directory of 30 small text documents (a.txt ...), different in content and length."""
    rng = random.Random(0)
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(30):
        (root / f"doc{i:02d}.txt").write_text(fake_source(rng, rng.randint(10, 60)))
    return root
