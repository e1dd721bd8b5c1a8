"""LoRA adapters on the decoder's Linear layers (our own small module; it keeps HF paths intact).

:func:`apply_lora` replaces each targeted ``nnx.Linear`` (``q_proj``, ``v_proj``, ...) by a :class:`LoRALinear`
that keeps the base ``kernel`` (and ``bias``) at the same path and adds ``lora_a`` [in, r] and ``lora_b`` [r, out]
as :class:`nnx.LoRAParam` (``lora_b`` starts at zero, so the model is unchanged at step 0). Scanned layers get
adapters with the same leading layer axis. Only ``LoRAParam`` train; the base may be stored in bfloat16, or quantized
(QLoRA, ``quantize="int8" | "nf4"``: :mod:`~percausal_jax.models.qlora`; the kernel is then ``qkernel`` and
``qscale`` at the same module path).

    y = x W (+ b) + (alpha / r) · (x A) B
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from percausal_jax.models import qlora

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nnx.Module):
    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 quantize: str = "none"):
        k = base.kernel[...]
        lead, (d_in, d_out) = k.shape[:-2], k.shape[-2:]
        self.quantize = quantize
        if quantize == "none":
            self.kernel = base.kernel
        else:  # the float kernel is dropped: only its codes and scales are kept
            codes, scale = qlora.quantize(k, quantize)
            self.qkernel, self.qscale = qlora.QuantWeight(codes), qlora.QuantWeight(scale)
        self.bias = base.bias if getattr(base, "bias", None) is not None else None
        self.dtype = base.dtype
        self.scale = alpha / rank
        self.lora_a = nnx.LoRAParam(jax.random.normal(rngs.params(), (*lead, d_in, rank), dtype) / d_in**0.5)
        self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, rank, d_out), dtype))

    def base_kernel(self, dtype) -> jax.Array:
        """The base kernel in ``dtype`` (dequantized for a quantized base)."""
        if self.quantize == "none":
            return self.kernel[...].astype(dtype)
        return qlora.dequantize(self.qkernel[...], self.qscale[...], self.quantize, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] → [..., out]."""
        dt = self.dtype or x.dtype
        x = x.astype(dt)
        if self.quantize == "none":
            y = x @ self.kernel[...].astype(dt)
        else:
            y = qlora.qmatmul(x, self.qkernel[...], self.qscale[...], self.quantize)
        if self.bias is not None:
            y = y + self.bias[...].astype(dt)
        delta = (x @ self.lora_a[...].astype(dt)) @ self.lora_b[...].astype(dt)
        return y + (self.scale * delta).astype(dt)


def apply_lora(model: nnx.Module, rank: int, alpha: float, targets=DEFAULT_TARGETS, seed: int = 0,
               quantize: str = "none") -> nnx.Module:
    """Wraps every ``nnx.Linear`` attribute named in ``targets`` (in place); returns the model. ``quantize``: how
    the frozen base kernels are stored (``none``, or ``int8`` / ``nf4``: :mod:`~percausal_jax.models.qlora`)."""
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
                setattr(module, name, LoRALinear(child, rank, alpha, rngs=rngs, quantize=quantize))
                n += 1
    if n == 0:
        raise ValueError(f"no Linear layer named any of {targets} in the model")
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every adapter into its base kernel (W += scale · A B; a quantized base is dequantized first, in the
    float32 of its scales) and restores plain ``nnx.Linear``-compatible paths (``kernel``/``bias`` only); returns
    the model."""
    for _, module in list(nnx.iter_graph(model)):
        if not isinstance(module, nnx.Module):
            continue
        for name, child in list(vars(module).items()):
            if isinstance(child, LoRALinear):
                w = child.base_kernel(jnp.float32)
                delta = jnp.einsum("...ir,...ro->...io", child.lora_a[...].astype(jnp.float32),
                                   child.lora_b[...].astype(jnp.float32)) * child.scale
                dtype = child.kernel[...].dtype if child.quantize == "none" else jnp.float32
                kernel = nnx.Param((w + delta).astype(dtype))
                setattr(module, name, _PlainLinear(kernel, child.bias, child.dtype))
    return model


class _PlainLinear(nnx.Module):
    """A Linear that reuses existing kernel/bias variables (after merging)."""

    def __init__(self, kernel: nnx.Param, bias: nnx.Param | None, dtype):
        self.kernel, self.bias, self.dtype = kernel, bias, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype or x.dtype
        y = x.astype(dt) @ self.kernel[...].astype(dt)
        return y if self.bias is None else y + self.bias[...].astype(dt)
