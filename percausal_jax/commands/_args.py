"""Range checks of numeric command-line flags, before anything is loaded (a UserError naming the flag: exit 2)."""

from __future__ import annotations

from percausal_jax.config import Bound

AT_LEAST_1, NONNEG = Bound(1), Bound(0)
DECODE = {"max_new_tokens": AT_LEAST_1, "temperature": NONNEG, "top_p": Bound(0, 1, low_open=True),
          "top_k": NONNEG, "repetition_penalty": Bound(0, low_open=True), "batch_size": AT_LEAST_1,
          "limit": NONNEG}


def check(args, bounds: dict[str, Bound]) -> None:
    """Each ``args.<name>`` present (and not None) within its bound; the error names ``--the-flag``."""
    for name, bound in bounds.items():
        value = getattr(args, name, None)
        if value is not None:
            bound.check(f"--{name.replace('_', '-')}", value)
