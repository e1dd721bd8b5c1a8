"""What the objectives see of a forward pass: gold-token log-probs (and optionally entropy, full logits), computed
only at response positions and, for gold log-probs, without ever materializing ``[B, R, V]``.

The vocabulary is processed in chunks by a ``lax.scan`` with an online logsumexp; each chunk's body is
rematerialized in the backward pass, so activation memory is ``O(B·R·chunk)`` instead of ``O(B·R·V)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_NEG = -1e30


class PassOutputs(NamedTuple):
    """One pass, at response positions. ``logits`` only when an objective needs the full distribution."""

    logp: jax.Array  # f32[B, R] log p(y_t | context)
    entropy: jax.Array | None = None  # f32[B, R]
    logits: jax.Array | None = None  # f32[B, R, V]


def gather_rows(hidden: jax.Array, index: jax.Array) -> jax.Array:
    """hidden [B, L, D], index int[B, R] → [B, R, D] (rows that predict each response token)."""
    return jnp.take_along_axis(hidden, index[..., None].astype(jnp.int32), axis=1)


def full_logits(hidden: jax.Array, head: jax.Array, softcap: float | None = None) -> jax.Array:
    """hidden [B, R, D], head [D, V] → float32 logits [B, R, V]."""
    z = jnp.einsum("brd,dv->brv", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return z if softcap is None else jnp.tanh(z / softcap) * softcap


def outputs_from_logits(logits: jax.Array, targets: jax.Array, with_entropy: bool = False) -> PassOutputs:
    """Full logits f32[B, R, V] → PassOutputs (keeps the logits)."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    logp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - logz
    ent = None
    if with_entropy:
        probs = jax.nn.softmax(logits, axis=-1)
        ent = logz - jnp.sum(probs * logits, axis=-1)
    return PassOutputs(logp, ent, logits)


def chunked_outputs(hidden: jax.Array, head: jax.Array, targets: jax.Array, *, softcap: float | None = None,
                    chunk_size: int = 8192, with_entropy: bool = False) -> PassOutputs:
    """Gold log-probs (and entropy) from hidden [B, R, D] and head [D, V] in vocabulary chunks.

    Online statistics per chunk: running max ``m``, ``s = Σ exp(z - m)``, ``t = Σ exp(z - m)·z`` and the gold
    logit; then ``logZ = m + log s``, ``logp = z_gold - logZ``, ``H = logZ - t / s``.
    """
    D, V = head.shape
    chunk = min(chunk_size, V)
    n_chunks = -(-V // chunk)
    pad = n_chunks * chunk - V
    head_c = jnp.pad(head, ((0, 0), (0, pad))).reshape(D, n_chunks, chunk).transpose(1, 0, 2)
    B, R = targets.shape

    @jax.checkpoint
    def body(carry, xs):
        m, s, t, gold = carry
        w, start = xs
        z = full_logits(hidden, w, softcap)  # [B, R, chunk]
        vocab_ids = start + jnp.arange(chunk)
        z = jnp.where(vocab_ids < V, z, _NEG)
        m_new = jnp.maximum(m, jnp.max(z, axis=-1))
        scale = jnp.exp(m - m_new)
        e = jnp.exp(z - m_new[..., None])
        s = s * scale + jnp.sum(e, axis=-1)
        if with_entropy:
            t = t * scale + jnp.sum(e * jnp.where(vocab_ids < V, z, 0.0), axis=-1)
        hit = vocab_ids[None, None, :] == targets[..., None]
        gold = gold + jnp.sum(jnp.where(hit, z, 0.0), axis=-1)
        return (m_new, s, t, gold), None

    init = (jnp.full((B, R), _NEG, jnp.float32), jnp.zeros((B, R), jnp.float32), jnp.zeros((B, R), jnp.float32),
            jnp.zeros((B, R), jnp.float32))
    starts = jnp.arange(n_chunks) * chunk
    (m, s, t, gold), _ = jax.lax.scan(body, init, (head_c, starts))
    logz = m + jnp.log(s)
    return PassOutputs(gold - logz, (logz - t / s) if with_entropy else None, None)
