"""The one soft-capping rule (:mod:`percausal_jax.models.softcap`): its value is the written-out formula bit for bit,
and its hand-written derivative is JAX's."""

import jax
import jax.numpy as jnp
import numpy as np

from percausal_jax.models.softcap import soft_cap, soft_cap_grad, soft_cap_with_tanh


def test_value_is_the_formula_and_none_is_identity():
    x = jax.random.normal(jax.random.key(0), (4, 33), jnp.float32) * 80
    np.testing.assert_array_equal(soft_cap(x, 30.0), jnp.tanh(x / 30.0) * 30.0)
    capped, t = soft_cap_with_tanh(x, 30.0)
    np.testing.assert_array_equal(capped, soft_cap(x, 30.0))
    np.testing.assert_array_equal(t, jnp.tanh(x / 30.0))
    assert soft_cap(x, None) is x and soft_cap_with_tanh(x, None) == (x, None)


def test_grad_matches_autodiff():
    x = jax.random.normal(jax.random.key(1), (5, 7), jnp.float32) * 40
    g = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)
    _, vjp = jax.vjp(lambda a: soft_cap(a, 20.0), x)
    np.testing.assert_allclose(soft_cap_grad(g, soft_cap_with_tanh(x, 20.0)[1]), vjp(g)[0], rtol=1e-6, atol=1e-6)
    assert soft_cap_grad(g, None) is g
