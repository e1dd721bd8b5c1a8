"""A frozen LoRA base stored quantized (QLoRA, ``lora.quantize_base``): int8 or NF4 weights, adapters in float.

- **int8**: one absmax scale per output column, ``q = round(w / s)`` in [-127, 127]; ``scale`` [..., 1, out].
- **nf4** (Dettmers et al., 2023): blocks of :data:`NF4_BLOCK` consecutive input rows per output column, each
  scaled by its absmax and rounded to the nearest of the 16 NormalFloat-4 code values; two 4-bit codes per byte
  (rows ``2i`` and ``2i + 1``), so the stored kernel is ``uint8 [..., in / 2, out]`` on every backend, with
  ``scale`` f32 ``[..., in / NF4_BLOCK, out]``: 0.56 bytes per weight against 2 for bfloat16.

The base is quantized once, when the model is built, and stays frozen (:class:`QuantWeight` is neither
``nnx.Param`` nor ``nnx.LoRAParam``, so no optimizer or filter of trainable state sees it). :func:`qmatmul`
dequantizes inside the matmul and again in its backward pass, so only the quantized arrays are kept between the two:
a plain dequantize-then-matmul under ``jax.grad`` would keep every layer's float kernel alive for the backward
pass, and the memory saving would be gone. Double quantization of the scales is not implemented.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from percausal_jax.errors import UserError

QUANTIZE_BASE = ("none", "int8", "nf4")
NF4_BLOCK = 64
# The NormalFloat-4 code values (QLoRA, Dettmers et al. 2023, appendix E): quantiles of N(0, 1) scaled to [-1, 1]
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
_NF4_MID = (NF4[1:] + NF4[:-1]) / 2  # decision boundaries: the nearest code by searchsorted


class QuantWeight(nnx.Variable):
    """Frozen quantized storage of a base kernel (codes or scales)."""


def quantize(w: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:
    """``w`` [..., in, out] → ``(codes, scale)`` as the module docstring lays them out."""
    w = w.astype(jnp.float32)
    if kind == "int8":
        scale = _nonzero(jnp.max(jnp.abs(w), axis=-2, keepdims=True) / 127.0)
        return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale
    if kind != "nf4":
        raise ValueError(f"quantize: kind {kind!r} is not one of int8, nf4")
    *lead, d_in, d_out = w.shape
    if d_in % NF4_BLOCK:
        raise UserError(f"lora.quantize_base=nf4: an adapted kernel has input dimension {d_in}, not a multiple of "
                        f"the block of {NF4_BLOCK} rows; use int8, or leave that projection out of lora.targets")
    blocks = w.reshape(*lead, d_in // NF4_BLOCK, NF4_BLOCK, d_out)
    scale = _nonzero(jnp.max(jnp.abs(blocks), axis=-2))
    codes = jnp.searchsorted(jnp.asarray(_NF4_MID), blocks / scale[..., None, :]).astype(jnp.uint8)
    pairs = codes.reshape(*lead, d_in // 2, 2, d_out)
    return pairs[..., 0, :] | (pairs[..., 1, :] << 4), scale


def dequantize(codes: jax.Array, scale: jax.Array, kind: str, dtype) -> jax.Array:
    """The kernel ``[..., in, out]`` in ``dtype`` that ``(codes, scale)`` stand for."""
    if kind == "int8":
        return (codes.astype(jnp.float32) * scale).astype(dtype)
    *lead, half, d_out = codes.shape
    pairs = jnp.stack([codes & 0xF, codes >> 4], axis=-2)  # [..., in/2, 2, out]
    blocks = pairs.reshape(*lead, half * 2 // NF4_BLOCK, NF4_BLOCK, d_out)
    w = jnp.asarray(NF4)[blocks.astype(jnp.int32)] * scale[..., None, :]
    return w.reshape(*lead, half * 2, d_out).astype(dtype)


def _nonzero(scale: jax.Array) -> jax.Array:
    return jnp.where(scale == 0, 1.0, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def qmatmul(x: jax.Array, codes: jax.Array, scale: jax.Array, kind: str) -> jax.Array:
    """``x [..., in] @ dequantize(codes, scale) [in, out]``; no gradient reaches the frozen base."""
    return x @ dequantize(codes, scale, kind, x.dtype)


def _qmatmul_fwd(x, codes, scale, kind):
    return qmatmul(x, codes, scale, kind), (codes, scale)


def _qmatmul_bwd(kind, residuals, g):
    codes, scale = residuals
    dx = g @ dequantize(codes, scale, kind, g.dtype).T  # dequantized again rather than kept from the forward pass
    return dx, np.zeros(codes.shape, jax.dtypes.float0), jnp.zeros_like(scale)


qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)
