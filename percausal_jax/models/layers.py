"""Building blocks of the decoder: RMSNorm, rotary embeddings, attention (xla | blocked | cudnn | splash; auto) and
the gated MLP.

Attribute names mirror Hugging Face (``q_proj``, ``gate_proj``, ``input_layernorm`` ...), and every kernel is HF's
``weight`` transposed, so import/export is rename + transpose. Shapes use jaxtyping-style notes:
``B`` batch, ``L`` sequence, ``D`` hidden, ``H`` query heads, ``K`` key/value heads, ``Dh`` head dim, ``F`` MLP width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from percausal_jax.models.blocked_attention import BLOCK_KV, BLOCK_Q, blocked_attention  # noqa: F401 (re-exported)
from percausal_jax.models.blocked_attention import MASK_VALUE as _MASK_VALUE
from percausal_jax.models.blocked_attention import tile_mask
from percausal_jax.models.config import ModelConfig
from percausal_jax.models.softcap import soft_cap

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "blocked", "cudnn", "splash")
DENSE_MASK_IMPLEMENTATIONS = ("xla",)  # kernels that take a [B, 1, L, L] mask


class RMSNorm(nnx.Module):
    """x / rms(x) · w in float32; Gemma stores ``w - 1`` (``plus_one``) and multiplies before casting back."""

    def __init__(self, dim: int, eps: float, plus_one: bool, param_dtype, *, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.plus_one = plus_one
        init = jnp.zeros if plus_one else jnp.ones
        self.weight = nnx.Param(init((dim,), dtype=param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...].astype(jnp.float32)
        if self.plus_one:  # Gemma: (x·(1+w)).to(dtype)
            return (normed * (1.0 + w)).astype(x.dtype)
        return normed.astype(x.dtype) * w.astype(x.dtype)  # Llama: x.to(dtype)·w


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions int[B, L], inv_freq f32[Dh/2] → cos, sin f32[B, L, Dh] (HF's rotate-half layout)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, L, N, Dh]; cos/sin [B, L, Dh]. Computed in x's dtype after casting cos/sin, as HF does."""
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention_mask(segment_ids: jax.Array, positions: jax.Array, sliding: jax.Array | bool,
                   window: int | None) -> jax.Array:
    """bool[B, 1, L, L]: query i sees key j iff j ≤ i, same non-zero segment, and (sliding) pos_i − pos_j < window.

    Causality is by index, so left padding and packed rows both work; segment 0 is padding and is seen by nobody.
    """
    return chunk_attention_mask(segment_ids, positions, 0, segment_ids.shape[1], sliding, window)


def chunk_attention_mask(segment_ids: jax.Array, positions: jax.Array, start: jax.Array | int, length: int,
                         sliding: jax.Array | bool, window: int | None) -> jax.Array:
    """bool[B, 1, length, S]: rows ``start .. start+length-1`` of :func:`attention_mask` over a ``[B, S]`` buffer.

    The queries of a KV-cached step (``start`` may be traced) see exactly the keys the full-sequence model shows them.
    """
    return tile_mask(segment_ids, positions, sliding, window, start, length, 0, segment_ids.shape[1])[:, None]


def resolve_attention_impl(attention_impl: str, cfg: ModelConfig, dtype, backend: str | None = None,
                           scan_layers: bool = False) -> str:
    """``attention_impl`` with ``"auto"`` replaced by the kernel for ``backend`` (default: JAX's default backend;
    an AOT plan passes its target's): TPU → splash where it can run (no soft-capping; a static window per layer,
    i.e. no mixed sliding/global layers under ``scan_layers``), GPU → cudnn for 16-bit compute without soft-capping
    (cuDNN's flash kernel has no fp32), else blocked (CPU: 2–4× the dense kernel at 320–1088 tokens,
    ``bench/cpu_profile.py attention``)."""
    if attention_impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLEMENTATIONS}, got {attention_impl!r}")
    if attention_impl != "auto":
        return attention_impl
    backend = backend or jax.default_backend()
    mixed_windows = cfg.sliding_window is not None and len(set(cfg.sliding_layers)) > 1
    if backend == "tpu" and cfg.attn_logit_softcap is None and not (scan_layers and mixed_windows):
        return "splash"
    if backend in ("gpu", "cuda", "rocm") and cfg.attn_logit_softcap is None and \
            jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    return "blocked"


def attention(impl: str, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, positions: jax.Array,
              cfg: ModelConfig, sliding: jax.Array | bool, mask: jax.Array | None = None) -> jax.Array:
    """Self-attention by kernel name: q [B, L, H, Dh], k/v [B, L, K, Dh] → [B, L, H, Dh], masked by the rule of
    :func:`attention_mask` (``mask``, when given, is that mask for the dense ``xla`` kernel; built here otherwise)."""
    impl = resolve_attention_impl(impl, cfg, q.dtype)
    if impl == "blocked":
        return blocked_attention(q, k, v, segment_ids, positions, scale=cfg.attn_scale,
                                 softcap=cfg.attn_logit_softcap, window=cfg.sliding_window, sliding=sliding)
    if impl == "splash":
        return _splash_attention(q, k, v, segment_ids, cfg, sliding)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, segment_ids, positions, cfg, sliding)
    if mask is None:
        mask = attention_mask(segment_ids, positions, sliding, cfg.sliding_window)
    return _xla_attention(q, k, v, mask, cfg.attn_scale, cfg.attn_logit_softcap)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, param_dtype, attention_impl: str, *, rngs: nnx.Rngs,
                 backend: str | None = None, scan_layers: bool = False):
        self.cfg = cfg
        self.auto = attention_impl == "auto"  # an auto-chosen splash yields to blocked at lengths splash cannot tile
        self.attention_impl = resolve_attention_impl(attention_impl, cfg, dtype, backend, scan_layers)
        H, K, Dh, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        linear = functools.partial(nnx.Linear, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                   kernel_init=nnx.initializers.normal(0.02))
        self.q_proj = linear(D, H * Dh, use_bias=cfg.attention_bias)
        self.k_proj = linear(D, K * Dh, use_bias=cfg.attention_bias)
        self.v_proj = linear(D, K * Dh, use_bias=cfg.attention_bias)
        self.o_proj = linear(H * Dh, D, use_bias=cfg.attention_out_bias)  # Llama-family attention_bias, not Qwen2
        if cfg.qk_norm:
            self.q_norm = RMSNorm(Dh, cfg.rms_norm_eps, cfg.norm_plus_one, param_dtype)
            self.k_norm = RMSNorm(Dh, cfg.rms_norm_eps, cfg.norm_plus_one, param_dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None,
                 segment_ids: jax.Array, sliding: jax.Array | bool, positions: jax.Array | None = None) -> jax.Array:
        """x [B, L, D] → [B, L, D]. ``mask`` bool[B, 1, L, L] for the dense ``xla`` kernel (None: built from
        ``segment_ids``/``positions``); the other kernels mask from ``segment_ids``/``positions`` without it."""
        B, L, _ = x.shape
        with jax.named_scope("attn_qkv"):
            q, k, v = self._qkv(x, cos, sin)
        impl = self.attention_impl
        if impl == "splash" and L % SPLASH_BLOCK:
            if not self.auto:
                raise ValueError(f"splash attention tiles sequences by {SPLASH_BLOCK}, got length {L}: set "
                                 f"data.bucket_multiple to a multiple of {SPLASH_BLOCK} (or attention_impl 'auto')")
            impl = "blocked"
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        with jax.named_scope("attn_core"):
            out = attention(impl, q, k, v, segment_ids, positions, self.cfg, sliding, mask)
        out = checkpoint_name(out.reshape(B, L, -1), "attention_out")
        with jax.named_scope("attn_o_proj"):
            return self.o_proj(out)

    def decode(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, kv: tuple[jax.Array, jax.Array],
               start: jax.Array | int) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """KV-cached attention of the tokens at buffer slots ``start .. start+L-1`` (the dense XLA kernel whatever
        ``attention_impl``: a step's few queries against the whole buffer, masked by :func:`chunk_attention_mask`).

        x [B, L, D], mask bool[B, 1, L, S], kv = this layer's cache (k, v) [B, S, K, Dh]
        → out [B, L, D] and the cache with the L new keys/values written at ``start``.
        """
        B, L, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        k_cache = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), start, axis=1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), start, axis=1)
        out = _xla_attention(q, k_cache, v_cache, mask, self.cfg.attn_scale, self.cfg.attn_logit_softcap)
        return self.o_proj(out.reshape(B, L, -1)), (k_cache, v_cache)

    def _qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, L, D] → q [B, L, H, Dh], k, v [B, L, K, Dh] (q/k normed when configured, then rotated)."""
        cfg = self.cfg
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(B, L, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(B, L, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = checkpoint_name(q, "query_proj")
        k = checkpoint_name(k, "key_proj")
        v = checkpoint_name(v, "value_proj")
        return q, k, v


def _xla_attention(q, k, v, mask, scale: float, softcap: float | None) -> jax.Array:
    """Grouped-query attention without repeating K/V: q [B, L, H, Dh], k/v [B, S, K, Dh] → [B, L, H, Dh]."""
    B, L, H, Dh = q.shape
    K = k.shape[2]
    q = q.reshape(B, L, K, H // K, Dh)
    scores = jnp.einsum("blkgd,bskd->bkgls", q, k, preferred_element_type=jnp.float32) * scale
    scores = soft_cap(scores, softcap)
    scores = jnp.where(mask[:, :, None], scores, _MASK_VALUE)  # mask [B, 1, L, S] → [B, 1, 1, L, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgls,bskd->blkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(B, L, H, Dh).astype(q.dtype)


def cudnn_attention(q, k, v, segment_ids, positions, cfg: ModelConfig, sliding,
                    implementation: str = "cudnn") -> jax.Array:
    """``attention_impl='cudnn'``: :func:`jax.nn.dot_product_attention` told the mask by its arguments (causal,
    per-row lengths, a left window), so no ``[L, L]`` mask exists; ``implementation="xla"`` is the same call on any
    backend (tests). Those arguments express the rule of :func:`attention_mask` only for a batch of
    :func:`one_segment_per_row`; any other batch (a packed row, left padding) goes whole through the blocked kernel.
    The choice is made on the device (``lax.switch``), as generation (left-padded) and training (right-padded, or
    packed) run one model; both kernels are compiled, and their residuals for the backward pass allocated."""
    if cfg.attn_logit_softcap is not None:
        raise ValueError("cudnn attention does not support attention logit soft-capping (Gemma2): use 'blocked'")
    window = cfg.sliding_window
    lengths = jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32)

    def dense(windowed: bool):
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, scale=cfg.attn_scale, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
            local_window_size=(window - 1, 0) if windowed else None, implementation=implementation)

    def blocked(q, k, v):
        return blocked_attention(q, k, v, segment_ids, positions, scale=cfg.attn_scale, window=window,
                                 sliding=sliding)

    if window is None or isinstance(sliding, bool):
        branches, which = [dense(window is not None and sliding)], 0
    else:  # a traced per-layer flag (scanned Gemma2/3 layers)
        branches, which = [dense(False), dense(True)], jnp.asarray(sliding, jnp.int32)
    simple = one_segment_per_row(segment_ids, positions, window is not None)
    return jax.lax.switch(jnp.where(simple, which, len(branches)), [*branches, blocked], q, k, v)


def one_segment_per_row(segment_ids: jax.Array, positions: jax.Array, windowed: bool) -> jax.Array:
    """bool[]: every row is one segment from index 0, then padding (segment 0) only, and (``windowed``) its
    positions count up by one from the first token's — the batches whose mask is causal ∧ (i, j < row length) ∧
    (i − j < window), by index. Rows of padding only qualify."""
    idx = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None]
    real = idx < jnp.sum(segment_ids != 0, axis=1, keepdims=True)
    ok = ((segment_ids != 0) == real) & ((segment_ids == segment_ids[:, :1]) | ~real)
    if windowed:
        ok = ok & ((positions - idx == positions[:, :1]) | ~real)
    return jnp.all(ok)


SPLASH_BLOCK = 128  # the splash kernel's default query/key block: sequence lengths must be multiples of it
SPLASH_INTERPRET = False  # True: the splash kernel runs in Pallas interpret mode (any backend: tests on CPU)


def _splash_attention(q, k, v, segment_ids, cfg: ModelConfig, sliding) -> jax.Array:
    """Pallas splash attention on TPU (``attention_impl='splash'``): causal, segment-aware, per-layer window (by
    index: positions must count up by one within a segment). With :data:`SPLASH_INTERPRET` it runs anywhere.

    Mosaic kernels are not auto-partitioned, so under a mesh (``jax.set_mesh``) the kernel runs per shard in a
    ``shard_map``: batch over ``(data, fsdp)``, heads over ``tensor`` when they divide.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if cfg.attn_logit_softcap is not None or cfg.sliding_window is not None and not isinstance(sliding, bool):
        raise ValueError("splash attention needs a static window per layer and no soft-capping: use scan_layers=False")
    B, L, H, Dh = q.shape
    rep = H // k.shape[2]
    qh = jnp.swapaxes(q * jnp.asarray(cfg.attn_scale, q.dtype), 1, 2)  # [B, H, L, Dh]
    kh = jnp.repeat(jnp.swapaxes(k, 1, 2), rep, axis=1)
    vh = jnp.repeat(jnp.swapaxes(v, 1, 2), rep, axis=1)

    def kernel(qh, kh, vh, seg):
        heads = qh.shape[1]
        if sliding and cfg.sliding_window is not None:
            base = sm.LocalMask((L, L), window_size=(cfg.sliding_window - 1, 0), offset=0)
        else:
            base = sm.CausalMask((L, L))
        attn = sk.make_splash_mha(sm.MultiHeadMask([base] * heads), head_shards=1, q_seq_shards=1,
                                  interpret=SPLASH_INTERPRET)
        return jax.vmap(attn)(qh, kh, vh, segment_ids=sk.SegmentIds(q=seg, kv=seg))

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out = kernel(qh, kh, vh, segment_ids)
    else:
        from jax.sharding import PartitionSpec as P

        batch = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and B % mesh.shape[a] == 0)
        heads = "tensor" if "tensor" in mesh.axis_names and H % mesh.shape["tensor"] == 0 else None
        spec = P(batch or None, heads, None, None)
        out = jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec, P(batch or None, None)), out_specs=spec,
                            check_vma=False)(qh, kh, vh, segment_ids)
    return jnp.swapaxes(out, 1, 2)


class MLP(nnx.Module):
    """down(act(gate(x)) · up(x)); act = SiLU (Llama/Qwen/Mistral) or tanh-GELU (Gemma); each projection with a
    bias when ``cfg.mlp_bias`` (Llama's ``mlp_bias``)."""

    def __init__(self, cfg: ModelConfig, dtype, param_dtype, *, rngs: nnx.Rngs):
        linear = functools.partial(nnx.Linear, use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                   kernel_init=nnx.initializers.normal(0.02))
        self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = jax.nn.silu if cfg.hidden_act == "silu" else functools.partial(jax.nn.gelu, approximate=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.named_scope("mlp"):
            h = checkpoint_name(self.act(self.gate_proj(x)) * self.up_proj(x), "mlp_hidden")
            return self.down_proj(h)

