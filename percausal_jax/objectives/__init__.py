"""Token-level causal objectives (CE, PerCE, NextQuill, LossCE, EntCE) over the two passes.

One frozen dataclass per method (:mod:`.losses`), the registry and the config reader (:mod:`.registry`), and the
two-pass forward with the model interface it needs (:mod:`.passes`).
"""

from percausal_jax.objectives.losses import (CE, EntCE, LossCE, NextQuill, Objective, Passes, PerCE, Requirements,
                                             Result, Targets, normalized_loss, total_loss)
from percausal_jax.objectives.passes import LanguageModel, compute_passes, evaluate
from percausal_jax.objectives.registry import OBJECTIVES, default_config, from_config, get

__all__ = ["CE", "EntCE", "LanguageModel", "LossCE", "NextQuill", "OBJECTIVES", "Objective", "Passes", "PerCE",
           "Requirements", "Result", "Targets", "compute_passes", "default_config", "evaluate", "from_config", "get",
           "normalized_loss", "total_loss"]
