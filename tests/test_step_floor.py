"""benchmarks/ttt_linear_step_floor.py times the right math: each stripped recurrence, in both orientations,
against its float64 reference (outputs poisoned with NaN before the kernels write them)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from tttlm.ops.compare import rel_rmse

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "ttt_linear_step_floor.py"
spec = importlib.util.spec_from_file_location("ttt_linear_step_floor", PATH)
floor = importlib.util.module_from_spec(spec)
spec.loader.exec_module(floor)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("orientation", [0, 1])
@pytest.mark.parametrize("name", list(floor.RECURRENCES))
def test_step_floor_kernels_match_reference(name, orientation):
    kernels, make_inputs, launch, reference = floor.RECURRENCES[name]
    B, T, H, D = 2, 48, 2, 32
    inputs = make_inputs(B, T, H, D, DEV)
    call, outputs = launch(kernels[orientation], inputs, B, T)
    call()
    expected = reference(*inputs, B, T)
    for out, ref in zip(outputs, expected, strict=True):
        assert rel_rmse(out.cpu(), ref.cpu()) < 1e-5
    initial = inputs[-1].expand_as(expected[0])  # W0 or dW0: the steps must have moved it
    assert rel_rmse(initial.cpu(), expected[0].cpu()) > 1e-2
