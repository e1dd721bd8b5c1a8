"""The JAX decoder: config, layers, decoder, partitioning."""

from percausal_jax.models.config import ModelConfig, RopeConfig
from percausal_jax.models.decoder import CausalLM

__all__ = ["CausalLM", "ModelConfig", "RopeConfig"]
