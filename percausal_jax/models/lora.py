"""LoRA adapters on the decoder's Linear layers (our own small module; it keeps HF paths intact).

:func:`apply_lora` replaces each targeted ``nnx.Linear`` (``q_proj``, ``v_proj``, ...) by a :class:`LoRALinear`
that keeps the base ``kernel`` (and ``bias``) at the same path and adds ``lora_a`` [in, r] and ``lora_b`` [r, out]
as :class:`nnx.LoRAParam` (``lora_b`` starts at zero, so the model is unchanged at step 0). Scanned layers get
adapters with the same leading layer axis. Only ``LoRAParam`` train; the base may be stored in bfloat16.

    y = x W (+ b) + (alpha / r) · (x A) B
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nnx.Module):
    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.kernel = base.kernel
        self.bias = base.bias if getattr(base, "bias", None) is not None else None
        self.dtype = base.dtype
        self.scale = alpha / rank
        k = base.kernel[...]
        lead, (d_in, d_out) = k.shape[:-2], k.shape[-2:]
        self.lora_a = nnx.LoRAParam(jax.random.normal(rngs.params(), (*lead, d_in, rank), dtype) / d_in**0.5)
        self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, rank, d_out), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] → [..., out]."""
        dt = self.dtype or x.dtype
        x = x.astype(dt)
        y = x @ self.kernel[...].astype(dt)
        if self.bias is not None:
            y = y + self.bias[...].astype(dt)
        delta = (x @ self.lora_a[...].astype(dt)) @ self.lora_b[...].astype(dt)
        return y + (self.scale * delta).astype(dt)


def apply_lora(model: nnx.Module, rank: int, alpha: float, targets=DEFAULT_TARGETS, seed: int = 0) -> nnx.Module:
    """Wraps every ``nnx.Linear`` attribute named in ``targets`` (in place); returns the model."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    rngs = nnx.Rngs(seed)
    n = 0
    for _, module in list(nnx.iter_graph(model)):
        if not isinstance(module, nnx.Module):
            continue
        for name in targets:
            child = getattr(module, name, None)
            if isinstance(child, nnx.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha, rngs=rngs))
                n += 1
    if n == 0:
        raise ValueError(f"no Linear layer named any of {targets} in the model")
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every adapter into its base kernel (W += scale · A B) and restores plain ``nnx.Linear``-compatible
    paths (``kernel``/``bias`` only); returns the model."""
    for _, module in list(nnx.iter_graph(model)):
        if not isinstance(module, nnx.Module):
            continue
        for name, child in list(vars(module).items()):
            if isinstance(child, LoRALinear):
                w = child.kernel[...]
                delta = jnp.einsum("...ir,...ro->...io", child.lora_a[...].astype(jnp.float32),
                                   child.lora_b[...].astype(jnp.float32)) * child.scale
                child.kernel[...] = (w.astype(jnp.float32) + delta).astype(w.dtype)
                setattr(module, name, _PlainLinear(child.kernel, child.bias, child.dtype))
    return model


class _PlainLinear(nnx.Module):
    """A Linear that reuses existing kernel/bias variables (after merging)."""

    def __init__(self, kernel: nnx.Param, bias: nnx.Param | None, dtype):
        self.kernel, self.bias, self.dtype = kernel, bias, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype or x.dtype
        y = x.astype(dt) @ self.kernel[...].astype(dt)
        return y if self.bias is None else y + self.bias[...].astype(dt)
