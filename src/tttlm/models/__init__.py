"""Causal LMs of every tttlm mixer, in the transformers ecosystem.

Importing this package registers model_type "tttlm" with AutoConfig and AutoModelForCausalLM, so a directory
written by `save_pretrained` loads back with `AutoModelForCausalLM.from_pretrained(path)`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from tttlm.models.cache import LayerCache, TTTLMCache
from tttlm.models.config import MIXERS, TTTLMConfig
from tttlm.models.modeling import TTTLMForCausalLM, TTTLMModel, chunked_cross_entropy
from tttlm.models.presets import NOMINAL, SIZES, build_model, count_parameters, preset_config, preset_names

AutoConfig.register(TTTLMConfig.model_type, TTTLMConfig, exist_ok=True)
AutoModelForCausalLM.register(TTTLMConfig, TTTLMForCausalLM, exist_ok=True)

__all__ = [
    "MIXERS",
    "NOMINAL",
    "SIZES",
    "LayerCache",
    "TTTLMCache",
    "TTTLMConfig",
    "TTTLMForCausalLM",
    "TTTLMModel",
    "build_model",
    "chunked_cross_entropy",
    "count_parameters",
    "preset_config",
    "preset_names",
]
