"""The Llama-3.2-style model, its presets, and the Hugging Face round trip."""

from zagreus.model.config import PRESETS, ModelConfig, RopeScaling, resolve_model_config
from zagreus.model.llama import KVCache, Transformer

__all__ = ["PRESETS", "ModelConfig", "RopeScaling", "resolve_model_config", "KVCache", "Transformer"]
