"""Token-level causal objectives (CE, PerCE, NextQuill, LossCE, EntCE) over the two passes."""

from percausal_jax.objectives.losses import Passes, Result, Targets, default_config, total_loss
from percausal_jax.objectives.registry import OBJECTIVES, compute_passes, evaluate, get

__all__ = ["OBJECTIVES", "Passes", "Result", "Targets", "compute_passes", "default_config", "evaluate", "get",
           "total_loss"]
