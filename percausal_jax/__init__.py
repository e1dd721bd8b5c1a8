"""percausal_jax: personalized LLM training in JAX/Flax with token-level causal objectives (PerCE, NextQuill)."""

__version__ = "0.1.0"

from percausal_jax.hf.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from percausal_jax.models import CausalLM, ModelConfig  # noqa: E402

__all__ = ["CausalLM", "ModelConfig", "load_pretrained", "save_pretrained", "__version__"]
