"""Exact gradient accumulation as its own transform.

The objective's loss is ``Σ_t loss_sum_t / N_t``. Accumulating over k micro-batches divides every micro-batch's
``loss_sum`` by the **global** normalizers ``N_t`` of the whole optimizer step and sums the gradients, so the result
equals one step on the whole batch: never a mean of means.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from percausal_jax.objectives import Result

# value_and_grad(params, micro_batch, normalizer) -> ((loss, Result), grads); normalizer None = the Result's own
GradFn = Callable[[Any, Any, jax.Array | None], tuple[tuple[jax.Array, Result], Any]]


def split_micro(batch, k: int):
    """Leaves [k·b, ...] → [k, b, ...] with row i in micro-batch i mod k (so each device keeps its share of every
    micro-batch when the batch axis is sharded)."""
    def f(x):
        b = x.shape[0] // k
        return jnp.swapaxes(x.reshape(b, k, *x.shape[1:]), 0, 1)
    return jax.tree.map(f, batch)


def accumulate(grad_fn: GradFn, params, micro, normalizer: jax.Array | None):
    """Sums ``grad_fn`` over the leading (micro-batch) axis of ``micro`` with one ``normalizer`` for all of them.

    Returns ``(loss, grads, metrics, normalizer)``: the loss of the whole batch, its gradient, and the sums over
    micro-batches of the metrics and of the objective's own normalizers (equal to ``normalizer`` when that is the
    global one; the divisor of a deferred normalization when ``normalizer`` is ones). ``normalizer=None`` is allowed
    for one micro-batch only (the objective's own, from the forward pass)."""
    k = jax.tree.leaves(micro)[0].shape[0]
    if k == 1:
        (loss, res), grads = grad_fn(params, jax.tree.map(lambda x: x[0], micro), normalizer)
        return loss, grads, res.metrics, res.normalizer
    if normalizer is None:
        raise ValueError("accumulating over several micro-batches needs the global normalizer")

    def body(acc, mb):
        (loss, res), grads = grad_fn(params, mb, normalizer)
        return jax.tree.map(jnp.add, acc, (loss, grads, res.metrics, res.normalizer)), None

    first = jax.tree.map(lambda x: x[0], micro)
    (_, res_shape), _ = jax.eval_shape(grad_fn, params, first, normalizer)
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)  # noqa: E731
    init = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params),  # gradients: shaped as params
            zeros(res_shape.metrics), zeros(res_shape.normalizer))
    (loss, grads, metrics, norm), _ = jax.lax.scan(body, init, micro)
    return loss, grads, metrics, norm
