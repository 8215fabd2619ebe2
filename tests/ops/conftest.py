import pytest

from tttlm.ops.ttt_linear import triton_parts


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every kernel's outputs start as NaN, so an element a kernel fails to write cannot pass as a zero."""
    monkeypatch.setattr(triton_parts, "POISON_OUTPUTS", True)
