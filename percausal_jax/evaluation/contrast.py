"""Profile-contrastive logits: amplify what the profile adds to the next-token distribution.

Given the next-token logits ``z_h`` with profile + query and ``z_0`` with the query alone (context-aware decoding,
Shi et al. 2023, applied to the profile)::

    z = z_h + β · (z_h − z_0),   tokens with p_h < α · max p_h set to −inf   (p_h = softmax(z_h))

``β`` (``contrast``) ≥ 0 scales the profile's effect; ``α`` (``plausibility``) in [0, 1] is the standard guard
against implausible tokens: only tokens the personalized model itself finds plausible may be chosen (α = 0: all,
α = 1: only the personalized argmax). The logits are taken as the model returns them (after any final soft-cap),
before temperature; repetition penalty, temperature, top-k/top-p and greedy choice then apply to ``z`` exactly as
plain decoding applies them to ``z_h`` (:mod:`percausal_jax.evaluation.generate`).

:func:`contrast_argmax` is the teacher-forced diagnostic of ``percausal score --html``: per response token, the argmax
of ``z_h`` and of ``z``, so a user sees where the profile steers greedy generation. The settings' validation and
CLI flags are in :mod:`percausal_jax.evaluation.contrast_flags` (free of jax, for the command line).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def contrast_logits(z_h: jax.Array, z_0: jax.Array, contrast: jax.Array | float,
                    plausibility: jax.Array | float) -> jax.Array:
    """z_h, z_0 f32[..., V] → f32[..., V]: z_h + β·(z_h − z_0), tokens with p_h < α·max p_h at −inf."""
    z_h, z_0 = z_h.astype(jnp.float32), z_0.astype(jnp.float32)
    p_h = jax.nn.softmax(z_h, axis=-1)
    plausible = p_h >= plausibility * jnp.max(p_h, axis=-1, keepdims=True)
    return jnp.where(plausible, z_h + contrast * (z_h - z_0), -jnp.inf)


def contrast_argmax(model, h_h: jax.Array, h_0: jax.Array, contrast: jax.Array | float,
                    plausibility: jax.Array | float, chunk: int = 16) -> tuple[jax.Array, jax.Array]:
    """Hidden states h_h, h_0 [B, R, D] of the rows predicting each response token (with / without profile)
    → argmax of z_h and of the contrasted logits, int32[B, R] each. Logits are built ``chunk`` positions at a time
    (``[B, chunk, V]``, never ``[B, R, V]``)."""

    def one(hs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        z_h, z_0 = model.logits(hs[0]), model.logits(hs[1])  # f32[B, V]
        z = contrast_logits(z_h, z_0, contrast, plausibility)
        return jnp.argmax(z_h, axis=-1).astype(jnp.int32), jnp.argmax(z, axis=-1).astype(jnp.int32)

    top_h, top_c = jax.lax.map(one, (h_h.swapaxes(0, 1), h_0.swapaxes(0, 1)), batch_size=chunk)  # int32[R, B]
    return top_h.T, top_c.T

