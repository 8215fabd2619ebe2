"""tttlm: test-time-training sequence models (TTT-Linear, TTT-MLP, Mesa) in PyTorch."""

__version__ = "0.1.0"


def build_model(name: str, **overrides):
    """A causal LM from a preset "{mixer}-{size}" (see `tttlm.models.presets`), a transformers PreTrainedModel."""
    from tttlm.models import build_model as _build

    return _build(name, **overrides)
