"""NextQuill's head without ``[B, R, V]``: :func:`chunked_pair_outputs` (both passes and log softmax(z_p − z_c) in
one vocabulary-chunked scan) against the full-logit computation the objective used before, values and gradients
with respect to both hidden states and the head, with and without a final soft-cap; and its compiled memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from percausal_jax.objectives.logprobs import chunked_pair_outputs

B, R, D, V = 2, 3, 8, 37  # V prime: chunk 5 leaves a partial last chunk
CASES = [(chunk, cap) for chunk in (5, 37) for cap in (None, 3.0)]


def inputs(seed=0):
    rng = np.random.RandomState(seed)
    h_p, h_c = (rng.normal(size=(B, R, D)).astype(np.float32) * 1.5 for _ in range(2))
    head = rng.normal(size=(D, V)).astype(np.float32)
    ids = rng.randint(0, V, size=(B, R)).astype(np.int32)
    ids[0, 0], ids[1, 1] = V - 1, 0
    coef = rng.uniform(0.1, 1.0, size=(3, B, R)).astype(np.float32)  # distinct weights for the three outputs
    return h_p, h_c, head, ids, coef


def full_logit_outputs(h_p, h_c, head, ids, cap):
    """The computation NextQuill did before: full float32 logits of both passes, then their difference."""
    def logits(h):
        z = jnp.einsum("brd,dv->brv", h, head, preferred_element_type=jnp.float32)
        return z if cap is None else jnp.tanh(z / cap) * cap

    def gold_log_softmax(z):
        return jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), ids[..., None], axis=-1)[..., 0]

    zp, zc = logits(h_p), logits(h_c)
    return gold_log_softmax(zp), gold_log_softmax(zc), gold_log_softmax(zp - zc)


def chunked(h_p, h_c, head, ids, cap, chunk):
    p, c, contrast = chunked_pair_outputs(h_p, h_c, head, ids, softcap=cap, chunk_size=chunk)
    return p.logp, c.logp, contrast


@pytest.fixture(scope="module")
def results():
    h_p, h_c, head, ids, coef = inputs()

    def value_and_grads(fn):
        def scalar(hp, hc, w):
            return sum(jnp.sum(k * o) for k, o in zip(coef, fn(hp, hc, w)))
        return fn(h_p, h_c, head), jax.grad(scalar, argnums=(0, 1, 2))(h_p, h_c, head)

    @jax.jit  # (not at XLA:CPU optimization level 0: there its backward of the soft-capped difference is NaN)
    def run():
        return [(value_and_grads(lambda hp, hc, w: chunked(hp, hc, w, ids, cap, chunk)),
                 value_and_grads(lambda hp, hc, w: full_logit_outputs(hp, hc, w, ids, cap))) for chunk, cap in CASES]

    return dict(zip(CASES, jax.device_get(run())))


@pytest.mark.parametrize("chunk,cap", CASES)
def test_pair_equals_full_logits(results, chunk, cap):
    (values, grads), (want_values, want_grads) = results[(chunk, cap)]
    for name, got, want in zip(("logp_p", "logp_c", "contrast"), values, want_values):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
    for name, got, want in zip(("h_p", "h_c", "head"), grads, want_grads):
        assert np.abs(want).max() > 1e-3, name  # every input really receives gradient
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)


def test_contrast_is_not_the_difference_of_log_probs(results):
    """log softmax(z_p − z_c) ≠ log p_p − log p_c: the contrast really is a third softmax."""
    (values, _), _ = results[(5, None)]
    assert np.abs(values[2] - (values[0] - values[1])).max() > 1e-2


def test_softcap_contrast_differs_from_the_hidden_difference(results):
    """Under a soft-cap z_p − z_c is not (h_p − h_c)·W: the exact path is needed (and is what is computed)."""
    h_p, h_c, head, ids, _ = inputs()
    (values, _), _ = results[(37, 3.0)]
    z = np.einsum("brd,dv->brv", h_p - h_c, head)
    ls = z - z.max(-1, keepdims=True)
    ls = ls - np.log(np.exp(ls).sum(-1, keepdims=True))
    linear = np.take_along_axis(ls, ids[..., None], -1)[..., 0]
    assert np.abs(values[2] - linear).max() > 1e-2


def test_compiled_memory_does_not_grow_with_the_vocabulary():
    """Forward + backward of the three outputs keep O(B·R·chunk) temporaries: doubling V adds well under one
    f32 [B, R, V] buffer (only [D, V]-sized head copies and gradient grow), where the full-logit computation adds
    several."""
    b, r, d, chunk = 2, 128, 16, 100

    def temp_bytes(fn, v):
        h = jax.ShapeDtypeStruct((b, r, d), jnp.float32)
        w = jax.ShapeDtypeStruct((d, v), jnp.float32)
        ids = jax.ShapeDtypeStruct((b, r), jnp.int32)
        loss = lambda hp, hc, w, y: sum(jnp.sum(o) for o in fn(hp, hc, w, y))  # noqa: E731
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(h, h, w, ids).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    ours = lambda hp, hc, w, y: chunked(hp, hc, w, y, None, chunk)  # noqa: E731
    full = lambda hp, hc, w, y: full_logit_outputs(hp, hc, w, y, None)  # noqa: E731
    v = 1000
    one_buffer = b * r * v * 4  # f32 [B, R, V]
    grown_full = temp_bytes(full, 2 * v) - temp_bytes(full, v)
    grown_ours = temp_bytes(ours, 2 * v) - temp_bytes(ours, v)
    assert grown_full >= 2 * one_buffer, (grown_full, one_buffer)
    assert grown_ours < 0.25 * one_buffer, (grown_ours, one_buffer)
