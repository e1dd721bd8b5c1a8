"""The decoder: ``CausalLM.model`` (embed → layers → norm) and the LM head, one module for every family.

Two layer layouts, chosen by ``scan_layers``:
- loop: ``model.layers`` is an ``nnx.List`` of :class:`DecoderLayer` (``model.layers[i].self_attn.q_proj``);
- scan: ``model.layers`` is one :class:`DecoderLayer` whose parameters carry a leading layer axis, applied with
  ``jax.lax.scan`` (one compiled layer body, constant compile time in depth).
Per-layer differences (Gemma2/3 sliding vs global attention, Gemma3's local RoPE base) are data, not structure: a
boolean per layer selects the mask and the RoPE table, so both layouts hold identical parameters.

The head is separate from the trunk on purpose: objectives gather response positions from
:meth:`CausalLM.hidden_states` and apply :meth:`CausalLM.logits` (or a vocabulary-chunked log-softmax) only there.

:meth:`CausalLM.decode` is the incremental forward pass over a :class:`~percausal_jax.models.kv_cache.KVCache`
(prefill a chunk, then one token per step); in the scan layout the cache's layer axis is scanned with the parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from percausal_jax.models.config import ModelConfig, rope_inv_freq
from percausal_jax.models.kv_cache import KVCache, init_cache
from percausal_jax.models.layers import (DENSE_MASK_IMPLEMENTATIONS, MLP, Attention, RMSNorm, attention_mask,
                                        chunk_attention_mask, rope_cos_sin)
from percausal_jax.models.softcap import soft_cap

# name -> jax.checkpoint policy (None: no rematerialization). Names tagged in layers.py with checkpoint_name.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
    "minimal": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "attention_out", "mlp_hidden"),
}


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, param_dtype, attention_impl: str, *, rngs: nnx.Rngs,
                 backend: str | None = None, scan_layers: bool = False):
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one, param_dtype)  # noqa: E731
        self.sandwich_norm = cfg.sandwich_norm
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, dtype, param_dtype, attention_impl, rngs=rngs, backend=backend,
                                   scan_layers=scan_layers)
        self.post_attention_layernorm = norm()
        if cfg.sandwich_norm:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(cfg, dtype, param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, segment_ids, sliding, positions=None) -> jax.Array:
        """x [B, L, D] → [B, L, D] (``mask`` None: the attention kernel masks from segment ids and positions)."""
        with jax.named_scope("norm"):
            xn = self.input_layernorm(x)
        h = self.self_attn(xn, cos, sin, mask, segment_ids, sliding, positions)
        return self._residual(x, h)

    def decode(self, x, cos, sin, mask, kv, start) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """KV-cached layer: x [B, L, D], kv (k, v) [B, S, K, Dh] → [B, L, D] and the updated kv."""
        h, kv = self.self_attn.decode(self.input_layernorm(x), cos, sin, mask, kv, start)
        return self._residual(x, h), kv

    def _residual(self, x: jax.Array, h: jax.Array) -> jax.Array:
        """Adds the attention branch h [B, L, D] to the residual stream x, then the MLP block."""
        if self.sandwich_norm:  # Gemma2/3: norm the branch output, and a separate pre-FFN norm
            with jax.named_scope("norm"):
                x = x + self.post_attention_layernorm(h)
                xn = self.pre_feedforward_layernorm(x)
            h = self.mlp(xn)
            with jax.named_scope("norm"):
                return x + self.post_feedforward_layernorm(h)
        with jax.named_scope("norm"):
            x = x + h
            xn = self.post_attention_layernorm(x)
        return x + self.mlp(xn)


class DecoderModel(nnx.Module):
    """HF's ``model.*`` subtree: ``embed_tokens``, ``layers``, ``norm``."""

    def __init__(self, cfg: ModelConfig, dtype, param_dtype, scan_layers: bool, remat_policy: str,
                 attention_impl: str, *, rngs: nnx.Rngs, backend: str | None = None):
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {remat_policy!r}")
        self.cfg = cfg
        self.dtype = dtype
        self.scan_layers = scan_layers
        self.remat_policy = remat_policy
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        make = lambda r: DecoderLayer(cfg, dtype, param_dtype, attention_impl, rngs=r,  # noqa: E731
                                      backend=backend, scan_layers=scan_layers)
        if scan_layers:
            self.layers = nnx.vmap(make, in_axes=0, out_axes=0)(rngs.split(cfg.num_hidden_layers))
        else:
            self.layers = nnx.List([make(rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one, param_dtype)

    def __call__(self, input_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """input_ids, positions, segment_ids int[B, L] → final-normed hidden states [B, L, D] (compute dtype)."""
        cfg = self.cfg
        with jax.named_scope("embed"):
            x = self._embed(input_ids)
        flags = cfg.sliding_layers
        uniform = all(f == flags[0] for f in flags)
        with jax.named_scope("masks_rope"):
            rope = self._rope_tables(positions)
            # dense [B, 1, L, L] masks only for the kernels that take one ("blocked"/"splash" mask per tile)
            masks = None
            if self.attention_impl in DENSE_MASK_IMPLEMENTATIONS:
                masks = (attention_mask(segment_ids, positions, False, None),
                         attention_mask(segment_ids, positions, True, cfg.sliding_window))

        def layer_fn(layer_state, graphdef, x, sliding):
            layer = nnx.merge(graphdef, layer_state)
            static = flags[0] if uniform else sliding
            with jax.named_scope("masks_rope"):
                (cos, sin), mask = _per_layer(rope, masks, static, cfg.sliding_window is not None)
            return layer(x, cos, sin, mask, segment_ids, static, positions)

        policy = REMAT_POLICIES[self.remat_policy]
        if self.remat_policy != "none":
            layer_fn = jax.checkpoint(layer_fn, policy=policy, static_argnums=(1,))

        if self.scan_layers:
            graphdef, state = nnx.split(self.layers)

            def body(h, xs):
                layer_state, sliding = xs
                return layer_fn(layer_state, graphdef, h, sliding), None

            x, _ = jax.lax.scan(body, x, (state, jnp.asarray(flags)))
        else:
            for layer, sliding in zip(self.layers, flags):
                graphdef, state = nnx.split(layer)
                x = layer_fn(state, graphdef, x, sliding)
        with jax.named_scope("norm"):
            return self.norm(x)

    def decode(self, input_ids: jax.Array, cache: KVCache, start: jax.Array | int) -> tuple[jax.Array, KVCache]:
        """input_ids int[B, L] at buffer slots ``start .. start+L-1`` → hidden [B, L, D] and the updated cache."""
        cfg = self.cfg
        L = input_ids.shape[1]
        x = self._embed(input_ids)
        rope = self._rope_tables(jax.lax.dynamic_slice_in_dim(cache.positions, start, L, axis=1))
        masks = (chunk_attention_mask(cache.segment_ids, cache.positions, start, L, False, None),
                 chunk_attention_mask(cache.segment_ids, cache.positions, start, L, True, cfg.sliding_window))
        flags = cfg.sliding_layers
        uniform = all(f == flags[0] for f in flags)

        def layer_fn(layer: DecoderLayer, x, kv, sliding):
            (cos, sin), mask = _per_layer(rope, masks, flags[0] if uniform else sliding,
                                          cfg.sliding_window is not None)
            return layer.decode(x, cos, sin, mask, kv, start)

        if self.scan_layers:
            graphdef, state = nnx.split(self.layers)

            def body(h, xs):
                layer_state, sliding, k, v = xs
                return layer_fn(nnx.merge(graphdef, layer_state), h, (k, v), sliding)

            x, (k, v) = jax.lax.scan(body, x, (state, jnp.asarray(cfg.sliding_layers), cache.k, cache.v))
        else:
            kvs = []
            for i, (layer, sliding) in enumerate(zip(self.layers, cfg.sliding_layers)):
                x, kv = layer_fn(layer, x, (cache.k[i], cache.v[i]), sliding)
                kvs.append(kv)
            k, v = (jnp.stack(t) for t in zip(*kvs))
        return self.norm(x), cache._replace(k=k, v=v)

    @property
    def attention_impl(self) -> str:
        """The (resolved) attention kernel of the layers."""
        return (self.layers if self.scan_layers else self.layers[0]).self_attn.attention_impl

    def _embed(self, input_ids: jax.Array) -> jax.Array:
        """int[B, L] → embeddings [B, L, D] (Gemma: scaled by √D)."""
        x = self.embed_tokens(input_ids)
        if self.cfg.embed_scale:
            x = x * jnp.asarray(self.cfg.hidden_size**0.5, dtype=x.dtype)
        return x

    def _rope_tables(self, positions: jax.Array) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
        """int[B, L] → ((cos, sin) global, (cos, sin) sliding-layer) f32[B, L, Dh]."""
        # The inverse frequencies are compile-time constants of the config (float32, as HF computes them).
        cfg = self.cfg
        return (rope_cos_sin(positions, np.float32(rope_inv_freq(cfg.rope, cfg.head_dim))),
                rope_cos_sin(positions, np.float32(rope_inv_freq(cfg.rope_local or cfg.rope, cfg.head_dim))))


class CausalLM(nnx.Module):
    """A decoder-only LM whose parameter tree is the HF state dict (renamed, kernels transposed)."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, scan_layers: bool = False,
                 remat_policy: str = "none", attention_impl: str = "xla", rngs: nnx.Rngs | None = None,
                 backend: str | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.model = DecoderModel(cfg, dtype, param_dtype, scan_layers, remat_policy, attention_impl, rngs=rngs,
                                  backend=backend)
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype,
                                      param_dtype=param_dtype, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

    @property
    def scan_layers(self) -> bool:
        return self.model.scan_layers

    # ``objectives.passes.LanguageModel``: what the objectives see of a model (with hidden_states, head_weight)
    @property
    def compute_dtype(self):
        return self.model.dtype

    @property
    def logit_softcap(self) -> float | None:
        return self.config.final_logit_softcap

    def hidden_states(self, input_ids: jax.Array, positions: jax.Array | None = None,
                      segment_ids: jax.Array | None = None) -> jax.Array:
        """int[B, L] → hidden [B, L, D]. Defaults: positions 0..L-1, one segment (no padding)."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(input_ids, dtype=jnp.int32)
        return self.model(input_ids, positions, segment_ids)

    def init_cache(self, segment_ids: jax.Array, positions: jax.Array) -> KVCache:
        """An empty KV cache (compute dtype) for a buffer with segment_ids, positions int[B, S]."""
        return init_cache(self.config, segment_ids, positions, self.model.dtype)

    def decode(self, input_ids: jax.Array, cache: KVCache, start: jax.Array | int) -> tuple[jax.Array, KVCache]:
        """Incremental forward: input_ids int[B, L] at buffer slots ``start ..`` → hidden [B, L, D] (apply
        :meth:`logits`) and the cache with their keys/values; the rows :meth:`hidden_states` gives for those slots
        when run on the whole buffer (with the cache's positions and segment ids)."""
        return self.model.decode(input_ids, cache, start)

    def head_weight(self) -> jax.Array:
        """The LM head as ``[D, V]`` (the tied embedding transposed, or ``lm_head.kernel``)."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] → float32 logits [..., V] (with Gemma2's final soft-capping)."""
        w = self.head_weight().astype(self.compute_dtype)
        logits = jnp.einsum("...d,dv->...v", hidden.astype(self.compute_dtype), w,
                            preferred_element_type=jnp.float32)
        return soft_cap(logits, self.config.final_logit_softcap)

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """int[B, L] → float32 logits [B, L, V]."""
        return self.logits(self.hidden_states(input_ids, positions, segment_ids))


def _per_layer(rope, masks, sliding, windowed: bool):
    """One layer's RoPE table and dense mask (None without masks) from the global/sliding pairs: chosen in Python
    when ``sliding`` is static (every layer alike), else selected by the traced flag (scanned Gemma2/3 layers)."""
    (cos_g, sin_g), (cos_l, sin_l) = rope
    if isinstance(sliding, bool):
        cos, sin = (cos_l, sin_l) if sliding else (cos_g, sin_g)
        mask = None if masks is None else masks[1 if sliding and windowed else 0]
        return (cos, sin), mask
    cos, sin = jnp.where(sliding, cos_l, cos_g), jnp.where(sliding, sin_l, sin_g)
    mask = None if masks is None else (jnp.where(sliding, masks[1], masks[0]) if windowed else masks[0])
    return (cos, sin), mask
