"""Vocabulary-chunked gold log-probs / entropy vs a full softmax (numpy float64 and analytic gradients)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from percausal_jax.objectives.logprobs import chunked_outputs, gather_rows, head_logits, outputs_from_logits

# CPU compile time dominates these tiny computations; XLA's backend optimizations are not what is under test.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

B, R, D, V = 2, 3, 8, 37  # V prime: not divisible by any chunk size below except itself


def make_inputs(seed=0, scale=1.0):
    rng = np.random.RandomState(seed)
    hidden = (rng.normal(size=(B, R, D)) * scale).astype(np.float32)
    head = rng.normal(size=(D, V)).astype(np.float32)
    ids = rng.randint(0, V, size=(B, R)).astype(np.int32)
    ids[0, 0] = V - 1  # a gold token in the last (partial) chunk
    ids[1, 2] = 0  # and one in the first chunk
    return hidden, head, ids


def np_reference(hidden, head, ids, softcap):
    """Full-softmax log-probs, entropy, and the analytic d logp / d z factor, in float64."""
    z = np.einsum("brd,dv->brv", hidden.astype(np.float64), head.astype(np.float64))
    dcap = np.ones_like(z)
    if softcap is not None:
        t = np.tanh(z / softcap)
        z = t * softcap
        dcap = 1.0 - t**2  # d(cap·tanh(u/cap))/du
    m = z.max(-1, keepdims=True)
    ls = z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))
    p = np.exp(ls)
    logp = np.take_along_axis(ls, ids[..., None], -1)[..., 0]
    ent = -(p * ls).sum(-1)
    onehot = np.eye(V)[ids]
    return logp, ent, p, onehot, dcap


CHUNKS = (1, 8, 37, 64)
SOFTCAPS = (None, 3.0)
GRAD_CHUNKS = (5, 37)
FWD_CASES = [(c, sc) for c in CHUNKS for sc in SOFTCAPS]
GRAD_CASES = [(c, sc) for c in GRAD_CHUNKS for sc in SOFTCAPS]


@pytest.fixture(scope="module")
def forward_results():
    """chunked_outputs for every (chunk, softcap), in one jitted function (one compile)."""
    hidden, head, ids = make_inputs(scale=1.5)

    def f(h, w):
        return [chunked_outputs(h, w, jnp.asarray(ids), softcap=sc, chunk_size=c, with_entropy=True)
                for c, sc in FWD_CASES]

    return hidden, head, ids, dict(zip(FWD_CASES, fast_jit(f)(jnp.asarray(hidden), jnp.asarray(head))))


@pytest.mark.parametrize("softcap", SOFTCAPS)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_matches_full_softmax(forward_results, chunk, softcap):
    hidden, head, ids, results = forward_results
    out = results[(chunk, softcap)]
    logp, ent, *_ = np_reference(hidden, head, ids, softcap)
    if softcap is not None:
        z = np.einsum("brd,dv->brv", hidden, head)
        assert np.abs(z).max() > 2 * softcap  # the cap is active on these inputs
    np.testing.assert_allclose(np.asarray(out.logp), logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.entropy), ent, rtol=1e-5, atol=1e-5)


def test_chunked_without_entropy():
    hidden, head, ids = make_inputs(scale=1.5)
    out = chunked_outputs(jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(ids), chunk_size=8)
    logp, *_ = np_reference(hidden, head, ids, None)
    np.testing.assert_allclose(np.asarray(out.logp), logp, rtol=1e-5, atol=1e-5)
    assert out.entropy is None


@pytest.fixture(scope="module")
def grad_results():
    """Gradients of Σ c·logp (chunked) w.r.t. hidden and head for every (chunk, softcap), one jitted function."""
    hidden, head, ids = make_inputs(seed=1, scale=1.5)
    coef = np.random.RandomState(2).uniform(0.5, 2.0, size=(B, R)).astype(np.float32)  # arbitrary cotangent

    def f(h, w):
        def loss(h, w, c, sc):
            return jnp.sum(jnp.asarray(coef) * chunked_outputs(h, w, jnp.asarray(ids), softcap=sc, chunk_size=c).logp)

        return [jax.grad(loss, argnums=(0, 1))(h, w, c, sc) for c, sc in GRAD_CASES]

    return hidden, head, ids, coef, dict(zip(GRAD_CASES, fast_jit(f)(jnp.asarray(hidden), jnp.asarray(head))))


@pytest.mark.parametrize("softcap", SOFTCAPS)
@pytest.mark.parametrize("chunk", GRAD_CHUNKS)
def test_chunked_gradients_match_full_softmax(grad_results, chunk, softcap):
    hidden, head, ids, coef, results = grad_results
    gh, gw = results[(chunk, softcap)]
    _, _, p, onehot, dcap = np_reference(hidden, head, ids, softcap)
    gz = coef[..., None] * (onehot - p) * dcap  # d Σ c·logp / d (pre-cap) z
    exp_gh = np.einsum("brv,dv->brd", gz, head.astype(np.float64))
    exp_gw = np.einsum("brd,brv->dv", hidden.astype(np.float64), gz)
    np.testing.assert_allclose(np.asarray(gh), exp_gh, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), exp_gw, rtol=1e-5, atol=1e-5)


def test_chunked_entropy_gradient_matches_full():
    hidden, head, ids = make_inputs(seed=3)

    def chunked(h, w, sc):
        return jnp.sum(chunked_outputs(h, w, jnp.asarray(ids), softcap=sc, chunk_size=8, with_entropy=True).entropy)

    def full(h, w, sc):
        z = jnp.einsum("brd,dv->brv", h, w)
        if sc is not None:
            z = jnp.tanh(z / sc) * sc
        ls = jax.nn.log_softmax(z, -1)
        return jnp.sum(-jnp.exp(ls) * ls)

    def f(h, w):
        return [(jax.grad(chunked, argnums=(0, 1))(h, w, sc), jax.grad(full, argnums=(0, 1))(h, w, sc))
                for sc in SOFTCAPS]

    for sc, (gc, gf) in zip(SOFTCAPS, fast_jit(f)(jnp.asarray(hidden), jnp.asarray(head))):
        for a, b in zip(gc, gf):
            assert np.abs(np.asarray(b)).max() > 1e-3
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=f"softcap={sc}")


def test_chunked_is_stable_for_large_logits():
    """All logits shifted by +200 (exp overflows float32): log-probs are shift-invariant."""
    hidden, head, ids = make_inputs(seed=4)
    h_aug = np.concatenate([hidden, np.ones((B, R, 1), np.float32)], -1)
    w_aug = np.concatenate([head, np.full((1, V), 200.0, np.float32)], 0)
    out = chunked_outputs(jnp.asarray(h_aug), jnp.asarray(w_aug), jnp.asarray(ids), chunk_size=8, with_entropy=True)
    logp, ent, *_ = np_reference(hidden, head, ids, None)
    assert np.all(np.isfinite(np.asarray(out.logp)))
    # float32 logits near 200 carry ~1e-5 absolute rounding error each
    np.testing.assert_allclose(np.asarray(out.logp), logp, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.entropy), ent, atol=1e-3)


def test_head_logits_and_outputs_from_logits():
    hidden, head, ids = make_inputs(seed=5, scale=1.5)
    z = np.asarray(head_logits(jnp.asarray(hidden), jnp.asarray(head), softcap=3.0))
    z_np = np.tanh(np.einsum("brd,dv->brv", hidden.astype(np.float64), head.astype(np.float64)) / 3.0) * 3.0
    np.testing.assert_allclose(z, z_np, rtol=1e-5, atol=1e-5)
    out = outputs_from_logits(jnp.asarray(z), jnp.asarray(ids), with_entropy=True)
    logp, ent, *_ = np_reference(hidden, head, ids, 3.0)
    np.testing.assert_allclose(np.asarray(out.logp), logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.entropy), ent, rtol=1e-5, atol=1e-5)


def test_gather_rows():
    h = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    idx = np.array([[4, 0, 2], [1, 1, 3]], np.int32)
    got = np.asarray(gather_rows(jnp.asarray(h), jnp.asarray(idx)))
    expected = np.stack([h[b, idx[b]] for b in range(2)])
    np.testing.assert_array_equal(got, expected)
