"""The ``blocked`` attention kernel: flash-style attention in pure JAX, for backends without a fused kernel (CPU).

Query blocks × key tiles with an online softmax, both as real loops (``fori_loop`` over query blocks, a while loop
over each block's key tiles up to the causal diagonal), so the program's size and compile time do not grow with the
sequence length. Tiles have static sizes: a query block's keys ``[k0, qe)`` are covered by full ``block_kv`` tiles
and then by at most one tile each of ``block_q · 2^i`` keys (the binary digits of the remainder), so no tile
reaches past the diagonal and nothing above it is computed. ``k0`` is where the block's segments begin (in every
row of the batch): in a packed row, the tiles of the earlier examples are skipped too. Shapes as in
:mod:`percausal_jax.models.layers`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from percausal_jax.models.softcap import soft_cap, soft_cap_grad, soft_cap_with_tanh

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# Tile sizes, from ``bench/cpu_profile.py attention`` on XLA:CPU (SmolLM2 heads, fp32; re-checked for the looped
# kernel at 320–2112 tokens: 64×512 ≈ 64×256, ahead of 32×512, 64×1024 and 128×512): small query blocks keep each
# [B, K, G·bq, bkv] score tile in cache; ≤ BLOCK_KV keys per tile means prompts up to that length need few rescalings.
BLOCK_Q = 64
BLOCK_KV = 512


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, positions: jax.Array, *,
                      scale: float, softcap: float | None = None, window: int | None = None,
                      sliding: jax.Array | bool = False, block_q: int = BLOCK_Q,
                      block_kv: int = BLOCK_KV) -> jax.Array:
    """Flash-style self-attention in pure JAX: q [B, L, H, Dh], k/v [B, L, K, Dh] → [B, L, H, Dh].

    Key tiles entirely above the causal diagonal are never computed; each tile's mask comes from
    ``segment_ids``/``positions`` int[B, L] (the rule of :func:`percausal_jax.models.layers.attention_mask`: causal by
    index, same non-zero segment, ``pos_q − pos_k < window`` when ``sliding``, which may be traced), so no ``[L, L]``
    tensor exists. GQA without repeating K/V, Gemma2's logit soft-capping. The backward pass is the flash one (custom
    VJP): it recomputes each tile's probabilities from the saved log-sum-exp instead of keeping them. Rows that see no
    key (padding) come out finite, as the dense kernel's, but not equal to it; nothing reads them. ``L`` is padded to a
    multiple of ``block_q`` with segment 0 (seen by nobody); ``block_kv`` is rounded to a multiple of ``block_q``.
    """
    B, L, H, Dh = q.shape
    K = k.shape[2]
    bq = int(block_q)
    Lp = -(-L // bq) * bq
    bkv = max(1, int(block_kv) // bq) * bq
    qh = q.reshape(B, L, K, H // K, Dh).transpose(0, 2, 3, 1, 4)  # [B, K, G, L, Dh]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, L, Dh]
    seg, pos = segment_ids.astype(jnp.int32), positions.astype(jnp.int32)
    if Lp != L:
        pad = lambda x, axis: jnp.pad(x, [(0, Lp - L if a == axis else 0) for a in range(x.ndim)])  # noqa: E731
        qh, kh, vh, seg, pos = pad(qh, 3), pad(kh, 2), pad(vh, 2), pad(seg, 1), pad(pos, 1)
    static = (float(scale), None if softcap is None else float(softcap), window, bq, bkv)
    out = _blocked(qh, kh, vh, seg, pos, jnp.asarray(sliding), first_keys(seg, bq), static)[:, :, :, :L]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, L, H, Dh)


def _causal_tiles(tile, carry, k0, qe, bq: int, bkv: int, L: int):
    """``carry = tile(carry, ks, size)`` over key tiles covering ``[k0, qe)`` (both traced multiples of ``bq``,
    ``k0 ≤ qe``): ``(qe − k0) // bkv`` tiles of ``bkv`` keys in a while loop, then the rest in tiles of ``bq · 2^i``
    keys, the binary digits of ``rest / bq``, largest first. Sizes are static; the last tile ends at ``qe``. With
    ``bkv ≥ L`` there is no loop: XLA would hoist its one tile out of the loop over query blocks and compute it for
    every block."""
    ks, max_rest = k0, L // bq
    if bkv < L:
        n_full = (qe - k0) // bkv
        carry = lax.fori_loop(0, n_full, lambda j, c: tile(c, k0 + j * bkv, bkv), carry)
        ks, max_rest = k0 + n_full * bkv, bkv // bq - 1
    rest = (qe - ks) // bq
    for bit in reversed(range(max_rest.bit_length())):
        size, take = bq << bit, (rest >> bit) & 1
        carry = lax.cond(take == 1, lambda c, ks=ks, size=size: tile(c, ks, size), lambda c: c, carry)
        ks = ks + take * size
    return carry


def first_keys(seg: jax.Array, bq: int) -> jax.Array:
    """int32[L // bq]: for each block of ``bq`` queries, the first key any of its queries may see, rounded down to
    a multiple of ``bq``; keys before it belong to other segments in every row, so their tiles are skipped (a
    packed row's earlier examples). A query sees no key before the first occurrence of its segment id in its row
    (found by a stable sort, so ids need not be contiguous runs); padding queries (segment 0) need none. A block
    of padding only gets its own end: no tile."""
    B, L = seg.shape
    idx = jnp.arange(L, dtype=jnp.int32)
    order = jnp.argsort(seg, axis=1, stable=True)  # [B, L]: positions grouped by segment id, ascending
    sorted_seg = jnp.take_along_axis(seg, order, axis=1)
    starts = (sorted_seg != jnp.roll(sorted_seg, 1, axis=1)) | (idx == 0)[None]
    group_start = lax.cummax(jnp.where(starts, idx[None], 0), axis=1)  # index in sorted order of the group's first
    first = jnp.zeros_like(order).at[jnp.arange(B)[:, None], order].set(
        jnp.take_along_axis(order, group_start, axis=1))  # first occurrence of each position's segment id
    first = jnp.where(seg != 0, first, L)
    block_min = jnp.min(first.reshape(B, L // bq, bq), axis=(0, 2))
    block_end = (jnp.arange(L // bq, dtype=jnp.int32) + 1) * bq
    return jnp.minimum(block_min // bq * bq, block_end)


def tile_mask(seg, pos, sliding, window, qs, bq: int, ks, bk: int) -> jax.Array:
    """bool[B, bq, bk]: query i sees key j iff j ≤ i, same non-zero segment, and (``sliding``, may be traced)
    pos_i − pos_j < window; queries ``qs .. qs+bq-1`` and keys ``ks .. ks+bk-1`` (``qs``, ``ks`` may be traced) of
    ``seg``/``pos`` int[B, L]. The one statement of the rule: the dense masks of
    :mod:`percausal_jax.models.layers` are its tiles over every key."""
    q_seg, k_seg = lax.dynamic_slice_in_dim(seg, qs, bq, 1), lax.dynamic_slice_in_dim(seg, ks, bk, 1)
    mask = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
    mask = mask & ((qs + jnp.arange(bq))[:, None] >= (ks + jnp.arange(bk))[None, :])[None]
    if window is not None:
        q_pos, k_pos = lax.dynamic_slice_in_dim(pos, qs, bq, 1), lax.dynamic_slice_in_dim(pos, ks, bk, 1)
        mask = mask & (((q_pos[:, :, None] - k_pos[:, None, :]) < window) | ~jnp.asarray(sliding))
    return mask


def _blocked_forward(qh, kh, vh, seg, pos, sliding, k0s, static):
    """(out f32 [B, K, G, L, Dh], lse f32 [B, K, G, L]); L a multiple of bq; ``k0s`` = :func:`first_keys`."""
    scale, softcap, window, bq, bkv = static
    B, K, G, L, Dh = qh.shape

    def block(i, outs):
        out, lse = outs
        qs = i * bq
        qb = lax.dynamic_slice_in_dim(qh, qs, bq, 3)

        def tile(carry, ks, bk):
            m, l, acc = carry
            s = jnp.einsum("bkgqd,bksd->bkgqs", qb, lax.dynamic_slice_in_dim(kh, ks, bk, 2),
                           preferred_element_type=jnp.float32) * scale
            s = soft_cap(s, softcap)
            s = jnp.where(tile_mask(seg, pos, sliding, window, qs, bq, ks, bk)[:, None, None], s, MASK_VALUE)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vh.dtype), lax.dynamic_slice_in_dim(vh, ks, bk, 2),
                            preferred_element_type=jnp.float32)
            return m_new, l * alpha + jnp.sum(p, axis=-1), acc * alpha[..., None] + pv

        init = (jnp.full((B, K, G, bq), MASK_VALUE, jnp.float32), jnp.zeros((B, K, G, bq), jnp.float32),
                jnp.zeros((B, K, G, bq, Dh), jnp.float32))
        m, l, acc = _causal_tiles(tile, init, k0s[i], qs + bq, bq, bkv, L)
        # +inf for rows that see no key (padding): the backward pass then gives them probability 0 everywhere, so
        # no gradient flows through a masked score and none out of a row that attends to nothing
        lse_b = jnp.where(m > 0.5 * MASK_VALUE, m + jnp.log(l), jnp.inf)
        out_b = acc / jnp.where(l > 0, l, 1.0)[..., None]  # l = 0: a block of padding, no tile computed
        return (lax.dynamic_update_slice_in_dim(out, out_b, qs, 3),
                lax.dynamic_update_slice_in_dim(lse, lse_b, qs, 3))

    init = (jnp.zeros((B, K, G, L, Dh), jnp.float32), jnp.zeros((B, K, G, L), jnp.float32))
    return lax.fori_loop(0, L // bq, block, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _blocked(qh, kh, vh, seg, pos, sliding, k0s, static):
    return _blocked_forward(qh, kh, vh, seg, pos, sliding, k0s, static)[0].astype(qh.dtype)


def _blocked_fwd(qh, kh, vh, seg, pos, sliding, k0s, static):
    out, lse = _blocked_forward(qh, kh, vh, seg, pos, sliding, k0s, static)
    return out.astype(qh.dtype), (qh, kh, vh, seg, pos, sliding, k0s, out, lse)


def _blocked_bwd(static, res, dout):
    """Flash backward, each tile transposed (keys as rows: [B, K, bk, G, bq]) so that every tile-sized matmul is in a
    form XLA:CPU runs without copying the tile: sᵀ = k·qᵀ, dpᵀ = v·dOᵀ, dv = pᵀ·dO, dk = dsᵀ·q, dqᵀ = kᵀ·dsᵀ (kᵀ
    sliced from K transposed once: a transposed tile would be a bf16 dot XLA:CPU cannot run in a loop); only a block's
    small [Dh, G·bq] dqᵀ is transposed back. The loop over query blocks carries dK/dV (f32 [B, K, L, Dh]); each
    block's dQ accumulates over its key tiles."""
    scale, softcap, window, bq, bkv = static
    qh, kh, vh, seg, pos, sliding, k0s, out, lse = res
    B, K, G, L, Dh = qh.shape
    delta = jnp.sum(dout.astype(jnp.float32) * out, axis=-1)  # rowsum(dO ⊙ O) [B, K, G, L]
    kt = jnp.swapaxes(kh, 2, 3)  # [B, K, Dh, L]

    def block(i, grads):
        dq_all, dk_all, dv_all = grads
        qs = i * bq
        qb, dob = lax.dynamic_slice_in_dim(qh, qs, bq, 3), lax.dynamic_slice_in_dim(dout, qs, bq, 3)
        lse_b = lax.dynamic_slice_in_dim(lse, qs, bq, 3)[:, :, None]  # [B, K, 1, G, bq]
        delta_b = lax.dynamic_slice_in_dim(delta, qs, bq, 3)[:, :, None]

        def tile(carry, ks, bk):
            dq, dk, dv = carry
            kb, vb = lax.dynamic_slice_in_dim(kh, ks, bk, 2), lax.dynamic_slice_in_dim(vh, ks, bk, 2)
            mask = jnp.swapaxes(tile_mask(seg, pos, sliding, window, qs, bq, ks, bk), 1, 2)[:, None, :, None]
            s = jnp.einsum("bksd,bkgqd->bksgq", kb, qb, preferred_element_type=jnp.float32) * scale
            s, t = soft_cap_with_tanh(s, softcap)
            p = jnp.exp(jnp.where(mask, s, MASK_VALUE) - lse_b)
            dv_t = jnp.einsum("bksgq,bkgqd->bksd", p.astype(dob.dtype), dob, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bksd,bkgqd->bksgq", vb, dob, preferred_element_type=jnp.float32)
            ds = soft_cap_grad(p * (dp - delta_b), t)
            ds = (ds * scale).astype(qh.dtype)  # p = 0 exactly at masked scores: no gradient through them
            dk_t = jnp.einsum("bksgq,bkgqd->bksd", ds, qb, preferred_element_type=jnp.float32)
            dq = dq + jnp.einsum("bkds,bksgq->bkdgq", lax.dynamic_slice_in_dim(kt, ks, bk, 3), ds,
                                 preferred_element_type=jnp.float32)
            add = lambda acc, x: lax.dynamic_update_slice_in_dim(  # noqa: E731
                acc, lax.dynamic_slice_in_dim(acc, ks, bk, 2) + x, ks, 2)
            return dq, add(dk, dk_t), add(dv, dv_t)

        init = (jnp.zeros((B, K, Dh, G, bq), jnp.float32), dk_all, dv_all)
        dq, dk_all, dv_all = _causal_tiles(tile, init, k0s[i], qs + bq, bq, bkv, L)
        dq_all = lax.dynamic_update_slice_in_dim(dq_all, jnp.moveaxis(dq, 2, 4), qs, 3)  # → [B, K, G, bq, Dh]
        return dq_all, dk_all, dv_all

    init = (jnp.zeros(qh.shape, jnp.float32), jnp.zeros(kh.shape, jnp.float32), jnp.zeros(vh.shape, jnp.float32))
    dq, dk, dv = lax.fori_loop(0, L // bq, block, init)
    return dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), None, None, None, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)
