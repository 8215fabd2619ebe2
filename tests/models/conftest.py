import pytest
import torch

from tttlm.models import build_model

VOCAB = 97


def _tiny(mixer: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, initializer_range=0.1, mamba_chunk_size=8)
    kw.update(overrides)
    model = build_model(f"{mixer}-tiny", **kw).float().eval()
    if mixer == "mamba":  # its reference init (kept by the layer) leaves a few blocks' scans nearly silent
        with torch.no_grad():
            for block in model.model.layers:
                block.mixer.x_proj.weight.mul_(4)
                block.mixer.out_proj.weight.mul_(4)
    return model


def _tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tiny():
    """tiny(mixer, seed=0, **overrides): a float32 tiny model in eval mode (vocabulary 97), initialised with
    larger weights so every mixer visibly matters (Mamba's B, C and output projections scaled up), and small
    Mamba2 chunks so a few dozen tokens cross several chunk / mini-batch boundaries."""
    return _tiny


@pytest.fixture
def tokens():
    """tokens(*shape, seed=1): random token ids below the tiny models' vocabulary."""
    return _tokens
