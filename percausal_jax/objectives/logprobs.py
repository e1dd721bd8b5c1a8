"""What the objectives see of a forward pass: gold-token log-probs (and optionally entropy), computed only at response
positions and without ever materializing ``[B, R, V]``.

The vocabulary is processed in chunks by a ``lax.scan`` with an online logsumexp, sliced from the head in place;
the backward pass is written by hand (a second scan that recomputes each chunk's logits from the saved
log-normalizers and writes the head's gradient columns in place), so activation memory is ``O(B·R·chunk)`` instead
of ``O(B·R·V)`` and nothing of size ``[D, V]`` is copied per chunk.

:func:`chunked_pair_outputs` runs the personalized and the counterfactual pass through one scan and, from the same
two logit chunks, the log-softmax of their difference ``z_p − z_c`` at the gold token (NextQuill's alignment term):
two head matmuls per chunk, exactly the ones the two passes need anyway, for soft-capped heads too.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from percausal_jax.models.softcap import soft_cap, soft_cap_grad, soft_cap_with_tanh

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
    return soft_cap(z, softcap)


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


def _for_each_chunk(V: int, chunk: int, fn, carry):
    """``carry = fn(carry, start, width)`` over the vocabulary chunks: a scan over the full chunks, then the last
    partial one (``width`` static)."""
    n_full, tail = divmod(V, chunk)
    carry, _ = jax.lax.scan(lambda c, start: (fn(c, start, chunk), None), carry, jnp.arange(n_full) * chunk)
    return fn(carry, n_full * chunk, tail) if tail else carry


def _pass_logits(hs, w, softcap):
    """Per pass: (capped logits z, tanh(u / cap) or None) f32[B, R, chunk] for the head columns ``w``."""
    return [soft_cap_with_tanh(jnp.einsum("brd,dv->brv", h, w.astype(h.dtype), preferred_element_type=jnp.float32),
                               softcap) for h in hs]


def _streams(zs, mix):
    """Stream logits as integer combinations of the passes' logits (``mix[s][p]``: stream s, pass p)."""
    return [sum(c * z for c, z in zip(row, zs) if c) for row in mix]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _chunked_head(hs, head, targets, mix, softcap, chunk, entropy):
    return _chunked_forward(hs, head, targets, mix, softcap, chunk, entropy)[0]


def _chunked_forward(hs, head, targets, mix, softcap, chunk, entropy):
    """Online statistics per stream → ((logp, entropy | None) per stream, (logZ, H) per stream for the backward)."""
    def step(carry, start, width):
        w = jax.lax.dynamic_slice_in_dim(head, start, width, axis=1)
        hit = (start + jnp.arange(width))[None, None, :] == targets[..., None]
        zs = [z for z, _ in _pass_logits(hs, w, softcap)]
        return tuple(st.update(z, hit, ent) for st, z, ent in zip(carry, _streams(zs, mix), entropy))

    stats = _for_each_chunk(head.shape[1], chunk, step, tuple(_Stats.init(targets.shape) for _ in mix))
    outs = tuple(st.outputs(True) for st in stats)
    logz = tuple(st.m + jnp.log(st.s) for st in stats)
    return (tuple((o.logp, o.entropy if ent else None) for o, ent in zip(outs, entropy)),
            (logz, tuple(o.entropy for o in outs)))


def _chunked_head_fwd(hs, head, targets, mix, softcap, chunk, entropy):
    out, (logz, ent) = _chunked_forward(hs, head, targets, mix, softcap, chunk, entropy)
    return out, (hs, head, targets, logz, ent)


def _chunked_head_bwd(mix, softcap, chunk, entropy, res, cot):
    """Per chunk: recompute the logits, d logp/dz = onehot − p and dH/dz = −p·(log p + H) per stream, back to each
    pass (through the soft-cap), then dh += du·wᵀ and the head's columns dW = Σ hᵀ·du written in place."""
    hs, head, targets, logz, ent = res

    def step(carry, start, width):
        dhs, dw = carry
        w = jax.lax.dynamic_slice_in_dim(head, start, width, axis=1)
        hit = (start + jnp.arange(width))[None, None, :] == targets[..., None]
        passes = _pass_logits(hs, w, softcap)
        dz_streams = []
        for z, lz, h_s, (g_logp, g_ent), ent_on in zip(_streams([z for z, _ in passes], mix), logz, ent, cot,
                                                        entropy):
            logp = z - lz[..., None]
            prob = jnp.exp(logp)
            dz = g_logp[..., None] * (hit.astype(jnp.float32) - prob)
            if ent_on and g_ent is not None:
                dz = dz - g_ent[..., None] * prob * (logp + h_s[..., None])
            dz_streams.append(dz)
        new_dhs, dw_chunk = [], None
        for p, ((_, t), h, dh) in enumerate(zip(passes, hs, dhs)):
            du = sum(row[p] * dz for row, dz in zip(mix, dz_streams) if row[p])
            du = soft_cap_grad(du, t).astype(h.dtype)
            new_dhs.append(dh + jnp.einsum("brv,dv->brd", du, w.astype(h.dtype), preferred_element_type=jnp.float32))
            part = jnp.einsum("brd,brv->dv", h, du, preferred_element_type=jnp.float32)
            dw_chunk = part if dw_chunk is None else dw_chunk + part
        return tuple(new_dhs), jax.lax.dynamic_update_slice_in_dim(dw, dw_chunk, start, axis=1)

    init = (tuple(jnp.zeros(h.shape, jnp.float32) for h in hs), jnp.zeros(head.shape, jnp.float32))
    dhs, dw = _for_each_chunk(head.shape[1], chunk, step, init)
    return tuple(d.astype(h.dtype) for d, h in zip(dhs, hs)), dw.astype(head.dtype), None


_chunked_head.defvjp(_chunked_head_fwd, _chunked_head_bwd)


def _chunked(hs: tuple[jax.Array, ...], head: jax.Array, targets: jax.Array, mix: tuple[tuple[int, ...], ...],
             softcap: float | None, chunk_size: int, entropy: tuple[bool, ...]) -> tuple[PassOutputs, ...]:
    """Gold log-probs (entropy per flag) of every stream ``Σ_p mix[s][p]·z_p`` of the passes' logits ``z_p`` (from
    ``hs[p]`` [B, R, D] and ``head`` [D, V]), one vocabulary chunk at a time, with a hand-written backward pass:
    it recomputes each chunk's logits from the saved log-normalizers and writes the head's gradient in place, so
    neither ``[B, R, V]`` nor a copy of the ``[D, V]`` head per chunk ever exists."""
    chunk = min(chunk_size, head.shape[1])
    out = _chunked_head(tuple(hs), head, targets, mix, softcap, chunk, entropy)
    return tuple(PassOutputs(logp, ent) for logp, ent in out)


def chunked_outputs(hidden: jax.Array, head: jax.Array, targets: jax.Array, *, softcap: float | None = None,
                    chunk_size: int = 8192, with_entropy: bool = False) -> PassOutputs:
    """Gold log-probs (and entropy) from hidden [B, R, D] and head [D, V] in vocabulary chunks."""
    (out,) = _chunked((hidden,), head, targets, ((1,),), softcap, chunk_size, (with_entropy,))
    return out


def chunked_pair_outputs(h_p: jax.Array, h_c: jax.Array, head: jax.Array, targets: jax.Array, *,
                         softcap: float | None = None, chunk_size: int = 8192, with_entropy: bool = False
                         ) -> tuple[PassOutputs, PassOutputs, jax.Array]:
    """Both passes and their contrast in one scan: h_p, h_c [B, R, D] → (personalized, counterfactual,
    ``log softmax(z_p − z_c)[y]`` f32[B, R]), where z are the (soft-capped) float32 logits of each pass.

    Per chunk the two logit blocks are computed once and their difference taken in float32, so the contrast is the
    same number as from full ``[B, R, V]`` logits (no extra matmul, no hidden-state difference rounded to the compute
    dtype, and exact under Gemma 2's final soft-capping, which is not linear)."""
    p, c, d = _chunked((h_p, h_c), head, targets, ((1, 0), (0, 1), (1, -1)), softcap, chunk_size,
                       (with_entropy, with_entropy, False))
    return p, c, d.logp
