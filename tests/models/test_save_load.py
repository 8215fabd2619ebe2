"""save_pretrained / from_pretrained round trips (safetensors), through the model and the Auto classes."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import tttlm
from tttlm.models import TTTLMConfig, TTTLMForCausalLM

MIXERS = ["ttt_linear", "ttt_mlp", "mesa", "transformer", "mamba2", "mamba"]


@pytest.mark.parametrize("mixer", MIXERS)
@torch.no_grad()
def test_save_then_load_gives_identical_logits(mixer, tiny, tokens, tmp_path):
    model = tiny(mixer, mesa_cg_tol=1e-5)
    ids = tokens(2, 21)
    want = model(ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    for cls in (TTTLMForCausalLM, AutoModelForCausalLM):
        loaded = cls.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, TTTLMForCausalLM) and loaded.config.mixer == mixer
        assert loaded.config.mesa_cg_tol == 1e-5
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        assert torch.equal(loaded(ids).logits, want)


def test_auto_config_and_lazy_registration(tmp_path):
    tttlm.build_model("transformer-tiny", vocab_size=50).save_pretrained(tmp_path)
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, TTTLMConfig) and cfg.model_type == "tttlm" and cfg.vocab_size == 50
