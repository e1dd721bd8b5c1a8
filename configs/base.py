"""Base training config: every key with its default. Other configs start from this one and override.

    percausal train --config configs/tiny.py --workdir runs/x --config.optimizer.lr=1e-4

The keys, their defaults, admissible values and help are declared once, on the typed dataclasses of
``percausal_jax/config.py`` (the objectives' in ``percausal_jax/objectives/losses.py``); this file returns them.
``python -c "from percausal_jax.config import describe_keys; print(describe_keys())"`` lists them.
"""

import ml_collections

from percausal_jax.config import default_config


def get_config() -> ml_collections.ConfigDict:
    return default_config()
