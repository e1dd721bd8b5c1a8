"""Soft-capping, the one statement of the rule: ``tanh(x / cap) · cap`` (Gemma 2's attention and final logits).

:func:`soft_cap` is the plain form; :func:`soft_cap_with_tanh` also returns ``t = tanh(x / cap)`` for hand-written
backward passes, whose derivative ``1 − t²`` is :func:`soft_cap_grad`. ``cap`` None: no capping (x unchanged).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def soft_cap_with_tanh(x: jax.Array, cap: float | None) -> tuple[jax.Array, jax.Array | None]:
    """(``tanh(x / cap) · cap``, ``tanh(x / cap)``), or (x, None) when ``cap`` is None."""
    if cap is None:
        return x, None
    t = jnp.tanh(x / cap)
    return t * cap, t


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """``tanh(x / cap) · cap``, or x when ``cap`` is None."""
    return soft_cap_with_tanh(x, cap)[0]


def soft_cap_grad(g: jax.Array, t: jax.Array | None) -> jax.Array:
    """The cotangent ``g`` of the capped value back through the cap: ``g · (1 − t²)`` with ``t`` from
    :func:`soft_cap_with_tanh` (g unchanged when there was no cap, ``t`` None)."""
    return g if t is None else g * (1.0 - t * t)
