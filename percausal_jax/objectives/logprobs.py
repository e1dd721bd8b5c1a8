"""What the objectives see of a forward pass: gold-token log-probs (and optionally entropy), computed only at response
positions and without ever materializing ``[B, R, V]``.

The vocabulary is processed in chunks by a ``lax.scan`` with an online logsumexp; each chunk's body is
rematerialized in the backward pass, so activation memory is ``O(B·R·chunk)`` instead of ``O(B·R·V)``.

:func:`chunked_pair_outputs` runs the personalized and the counterfactual pass through one scan and, from the same
two logit chunks, the log-softmax of their difference ``z_p − z_c`` at the gold token (NextQuill's alignment term):
two head matmuls per chunk, exactly the ones the two passes need anyway, for soft-capped heads too.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

_NEG = -1e30


class PassOutputs(NamedTuple):
    """One pass, at response positions."""

    logp: jax.Array  # f32[B, R] log p(y_t | context)
    entropy: jax.Array | None = None  # f32[B, R]


def gather_rows(hidden: jax.Array, index: jax.Array) -> jax.Array:
    """hidden [B, L, D], index int[B, R] → [B, R, D] (rows that predict each response token)."""
    return jnp.take_along_axis(hidden, index[..., None].astype(jnp.int32), axis=1)


def head_logits(hidden: jax.Array, head: jax.Array, softcap: float | None = None) -> jax.Array:
    """hidden [B, R, D], head [D, V] → float32 logits [B, R, V] (used on one vocabulary chunk at a time)."""
    z = jnp.einsum("brd,dv->brv", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return z if softcap is None else jnp.tanh(z / softcap) * softcap


def outputs_from_logits(logits: jax.Array, targets: jax.Array, with_entropy: bool = False) -> PassOutputs:
    """Full logits f32[B, R, V] → PassOutputs (for callers that already hold logits, and for tests)."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    logp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - logz
    ent = None
    if with_entropy:
        probs = jax.nn.softmax(logits, axis=-1)
        ent = logz - jnp.sum(probs * logits, axis=-1)
    return PassOutputs(logp, ent)


class _Stats(NamedTuple):
    """Online statistics of one stream of logits over the vocabulary chunks seen so far, each f32[B, R]."""

    m: jax.Array  # running max
    s: jax.Array  # Σ exp(z − m)
    t: jax.Array  # Σ exp(z − m)·z (entropy only)
    gold: jax.Array  # the gold logit

    @classmethod
    def init(cls, shape) -> _Stats:
        return cls(jnp.full(shape, _NEG, jnp.float32), *(jnp.zeros(shape, jnp.float32) for _ in range(3)))

    def update(self, z: jax.Array, hit: jax.Array, with_entropy: bool) -> _Stats:
        """z f32[B, R, chunk] (logits of real vocabulary entries); hit bool[B, R, chunk] (the gold token)."""
        m = jnp.maximum(self.m, jnp.max(z, axis=-1))
        scale = jnp.exp(self.m - m)
        e = jnp.exp(z - m[..., None])
        s = self.s * scale + jnp.sum(e, axis=-1)
        t = self.t * scale + jnp.sum(e * z, axis=-1) if with_entropy else self.t
        return _Stats(m, s, t, self.gold + jnp.sum(jnp.where(hit, z, 0.0), axis=-1))

    def outputs(self, with_entropy: bool) -> PassOutputs:
        """logZ = m + log s, logp = z_gold − logZ, H = logZ − t / s."""
        logz = self.m + jnp.log(self.s)
        return PassOutputs(self.gold - logz, (logz - self.t / self.s) if with_entropy else None)


def _chunked_scan(streams: Callable[[jax.Array], tuple[jax.Array, ...]], head: jax.Array, targets: jax.Array,
                  chunk_size: int, entropy: tuple[bool, ...]) -> tuple[PassOutputs, ...]:
    """One scan over vocabulary chunks of ``head`` [D, V]: ``streams(w)`` gives the logit chunks f32[B, R, chunk]
    of every stream for the head columns ``w`` [D, chunk]; one online logsumexp per stream (entropy per flag).

    The chunks are sliced out of ``head`` in place (no padded or transposed copy of the ``[D, V]`` head, whose
    gradient then accumulates into one ``[D, V]`` buffer); a last partial chunk is one more step after the scan."""
    V = head.shape[1]
    chunk = min(chunk_size, V)
    n_full, tail = divmod(V, chunk)

    @functools.partial(jax.checkpoint, static_argnums=(2,))
    def step(carry, start, width):
        w = jax.lax.dynamic_slice_in_dim(head, start, width, axis=1)
        vocab_ids = start + jnp.arange(width)
        hit = vocab_ids[None, None, :] == targets[..., None]
        return tuple(st.update(z, hit, ent) for st, z, ent in zip(carry, streams(w), entropy))

    carry = tuple(_Stats.init(targets.shape) for _ in entropy)
    carry, _ = jax.lax.scan(lambda c, start: (step(c, start, chunk), None), carry, jnp.arange(n_full) * chunk)
    if tail:
        carry = step(carry, n_full * chunk, tail)
    return tuple(st.outputs(ent) for st, ent in zip(carry, entropy))


def chunked_outputs(hidden: jax.Array, head: jax.Array, targets: jax.Array, *, softcap: float | None = None,
                    chunk_size: int = 8192, with_entropy: bool = False) -> PassOutputs:
    """Gold log-probs (and entropy) from hidden [B, R, D] and head [D, V] in vocabulary chunks."""
    (out,) = _chunked_scan(lambda w: (head_logits(hidden, w, softcap),), head, targets, chunk_size, (with_entropy,))
    return out


def chunked_pair_outputs(h_p: jax.Array, h_c: jax.Array, head: jax.Array, targets: jax.Array, *,
                         softcap: float | None = None, chunk_size: int = 8192, with_entropy: bool = False
                         ) -> tuple[PassOutputs, PassOutputs, jax.Array]:
    """Both passes and their contrast in one scan: h_p, h_c [B, R, D] → (personalized, counterfactual,
    ``log softmax(z_p − z_c)[y]`` f32[B, R]), where z are the (soft-capped) float32 logits of each pass.

    Per chunk the two logit blocks are computed once and their difference taken in float32, so the contrast is the
    same number as from full ``[B, R, V]`` logits (no extra matmul, no hidden-state difference rounded to the compute
    dtype, and exact under Gemma 2's final soft-capping, which is not linear)."""
    def streams(w):
        zp, zc = head_logits(h_p, w, softcap), head_logits(h_c, w, softcap)
        return zp, zc, zp - zc

    p, c, d = _chunked_scan(streams, head, targets, chunk_size, (with_entropy, with_entropy, False))
    return p, c, d.logp
