"""A static-shape key/value cache for incremental decoding with :meth:`CausalLM.decode`.

The cache covers a whole ``[B, S]`` token buffer (left-padded prompts followed by the slots of the tokens still to be
generated). Besides keys and values it holds the buffer's segment ids and positions, known up front from the padding,
so the attention mask of any chunk of queries is computed exactly as the full-sequence model computes it: causal by
slot index, same non-zero segment, and (sliding layers) by position distance. No ring buffer: sliding-window layers
keep every slot and mask the ones out of the window.

Shapes: ``N`` layers, ``B`` batch, ``S`` buffer length, ``K`` key/value heads, ``Dh`` head dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from percausal_jax.models.config import ModelConfig


class KVCache(NamedTuple):
    """k, v [N, B, S, K, Dh] (compute dtype, zero until written); segment_ids, positions int32[B, S]."""

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    positions: jax.Array


def init_cache(cfg: ModelConfig, segment_ids: jax.Array, positions: jax.Array, dtype) -> KVCache:
    """An empty cache for the buffer described by ``segment_ids``/``positions`` int[B, S] (segment 0 = padding)."""
    B, S = segment_ids.shape
    shape = (cfg.num_hidden_layers, B, S, cfg.num_key_value_heads, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   segment_ids=jnp.asarray(segment_ids, jnp.int32), positions=jnp.asarray(positions, jnp.int32))
