"""Greedy decoding by full recomputation (no KV cache): the simple reference decoder.

Prompts of different lengths are left-padded into one ``[B, P + N]`` buffer; padding gets segment id 0 and positions
restart at each row's first real token, so every row computes exactly what it would compute alone. Each step runs
the model over the whole buffer (one compiled shape) and writes the argmax at column ``P + t``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from percausal_jax.models.decoder import CausalLM


def left_pad(prompts: Sequence[Sequence[int]], total_len: int, pad_id: int = 0):
    """→ tokens, segment_ids, positions int32[B, total_len] and the common prompt length P."""
    P = max(len(p) for p in prompts)
    B = len(prompts)
    tokens = np.full((B, total_len), pad_id, np.int32)
    seg = np.zeros((B, total_len), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):P] = p
        seg[i, P - len(p):] = 1
    positions = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    return tokens, seg, positions, P


@nnx.jit
def _next_token(model: CausalLM, tokens, positions, segment_ids, col):
    hidden = model.hidden_states(tokens, positions, segment_ids)
    last = jax.lax.dynamic_index_in_dim(hidden, col, axis=1, keepdims=False)
    return jnp.argmax(model.logits(last), axis=-1).astype(jnp.int32)


def greedy_generate(model: CausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    eos_ids: Sequence[int] = (), pad_id: int = 0) -> list[list[int]]:
    """Greedy continuation of each prompt; stops a row at any of ``eos_ids`` (the EOS is included)."""
    tokens, seg, positions, P = left_pad(prompts, max(len(p) for p in prompts) + max_new_tokens, pad_id)
    done = np.zeros(len(prompts), bool)
    out: list[list[int]] = [[] for _ in prompts]
    for t in range(max_new_tokens):
        nxt = np.asarray(_next_token(model, tokens, positions, seg, P + t - 1))
        for i, tok in enumerate(nxt):
            if not done[i]:
                out[i].append(int(tok))
                done[i] = int(tok) in eos_ids
        tokens[:, P + t] = nxt
        if done.all():
            break
    return out
