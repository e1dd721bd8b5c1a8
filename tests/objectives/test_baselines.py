"""LossCE, EntCE and the data-derived normalizers on small literal logits, checked against independent numpy
computations (see tests/objectives/fixtures.py)."""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from percausal_jax.objectives import losses
from tests.objectives.fixtures import (IDS, TOL, WEIGHT, ZC, ZP, ZP_L, ZR, check_result, np_entropy, np_log_softmax,
                                      np_logp, po, targets)


# ----------------------------------------------------------------------------------------------------------------
# LossCE
# ----------------------------------------------------------------------------------------------------------------

def lossce_reference(zp, zr, keep_frac, weight=WEIGHT, ids=IDS):
    nll = -np_logp(zp, ids)
    excess = nll + np_logp(zr, ids)  # nll_θ - nll_ref
    valid = weight > 0
    n = int(weight.sum())
    k = math.ceil(keep_frac * n)
    vals = excess[valid]
    order = np.argsort(-vals, kind="stable")
    sel_valid = np.zeros(vals.shape, bool)
    sel_valid[order[:k]] = True
    selected = np.zeros(weight.shape, bool)
    selected[valid] = sel_valid
    return nll, excess, selected, k


def test_lossce_fixture_properties():
    nll = -np_logp(ZP_L)
    excess = nll + np_logp(ZR)
    valid = WEIGHT > 0
    assert len(np.unique(np.round(excess[valid], 6))) == 5  # no ties among valid tokens
    assert excess[1, 2] > excess[valid].max() + 1.0  # the padding slot would be picked first if it leaked


def run_lossce(zp, zr, t, obj, jit):
    """A LossCE objective eagerly or under jax.jit (as in the training step): XLA may rewrite float arithmetic."""
    fn = lambda zp, zr, t: obj(losses.Passes(po(zp, t.ids), ref_p=po(zr, t.ids)), t)  # noqa: E731
    return (jax.jit(fn) if jit else fn)(jnp.asarray(zp), jnp.asarray(zr), t)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("keep_frac, k", [(0.5, 3), (0.1, 1), (0.3, 2), (0.6, 3), (0.7, 4), (1.0, 5)])
def test_lossce_hand_computed(keep_frac, k, jit):
    # ceil matters: 0.5·5 = 2.5 -> 3 (floor/round give 2); 0.1·5 = 0.5 -> 1 (floor gives 0); 0.7·5 = 3.5 -> 4;
    # 0.6·5 = 3 exactly -> 3
    r = run_lossce(ZP_L, ZR, targets(), losses.LossCE(keep_frac=keep_frac), jit)
    nll, excess, selected, k_ref = lossce_reference(ZP_L, ZR, keep_frac)
    assert k_ref == k
    assert not selected[1, 2]
    check_result(r, [(selected * nll).sum()], [float(k)], {
        "tokens": 5.0,
        "nll_sum": (WEIGHT * nll).sum(),
        "excess_sum": (WEIGHT * excess).sum(),
        "selected_count": float(k),
    })


@pytest.mark.parametrize("keep_frac", [0.1, 0.5, 0.6, 1.0])
def test_lossce_diagnostics(keep_frac):
    """``diagnostics``: excess loss e_t and the 0/1 selection mask (never a padding slot)."""
    d = losses.LossCE(keep_frac=keep_frac).diagnostics(losses.Passes(po(ZP_L), ref_p=po(ZR)), targets())
    assert set(d) == {"excess", "lossce_selected"}
    _, excess, selected, k = lossce_reference(ZP_L, ZR, keep_frac)
    valid = WEIGHT > 0  # padding slots of the excess are unspecified
    for key in d:
        assert d[key].shape == WEIGHT.shape, key
    np.testing.assert_allclose(np.asarray(d["excess"])[valid], excess[valid], **TOL)
    np.testing.assert_array_equal(np.asarray(d["lossce_selected"]), selected.astype(np.float32))  # padding: 0
    assert selected.sum() == k


def test_lossce_gradient_only_on_selected_tokens():
    lossce = losses.LossCE(keep_frac=0.5)
    t = targets()
    g = jax.grad(lambda zp, zr: losses.total_loss(lossce(losses.Passes(po(zp), ref_p=po(zr)), t)),
                 argnums=(0, 1))(jnp.asarray(ZP_L), jnp.asarray(ZR))
    nll, _, selected, k = lossce_reference(ZP_L, ZR, 0.5)
    onehot = np.eye(4)[IDS]
    expected = (selected / k)[..., None] * (np.exp(np_log_softmax(ZP_L)) - onehot)
    np.testing.assert_allclose(np.asarray(g[0]), expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(g[1]) == 0.0)  # the reference pass is a constant


@pytest.mark.parametrize("keep_frac, n, k", [
    (0.6, 25, 15),  # default keep_frac; float32 0.6·25 = 15.0000006 (a plain float32 ceil gives 16)
    (0.6, 10, 6),  # exact integer products must not round up
    (0.5, 6, 3),
    (0.5, 7, 4),  # 3.5 -> 4
    (0.7, 10, 7),  # float32 0.7·10 = 6.9999999 -> must stay 7
    (0.2501, 4, 2),  # 1.0004 -> 2: a fractional part below 1e-3 must still round up
    (0.0001, 5, 1),  # 0.0005 -> 1: any positive fraction keeps at least one token
])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_lossce_keep_count_is_exact_ceil(keep_frac, n, k, jit):
    """n_selected = ceil(keep_frac · n_tokens) (lossce docstring), exactly, for decimal keep_frac."""
    assert math.ceil(Fraction(str(keep_frac)) * n) == k
    rng = np.random.RandomState(n)
    V = 4
    zp = rng.normal(size=(1, n, V)).astype(np.float32)
    zr = rng.normal(size=(1, n, V)).astype(np.float32)
    ids = rng.randint(0, V, size=(1, n)).astype(np.int32)
    w = np.ones((1, n), np.float32)
    r = run_lossce(zp, zr, targets(ids, w, w / n), losses.LossCE(keep_frac=keep_frac), jit)
    nll, excess, _, _ = lossce_reference(zp, zr, keep_frac, w, ids)
    top = np.argsort(-excess[0], kind="stable")[:k]
    assert float(r.metrics["selected_count"]) == k
    np.testing.assert_allclose(float(losses.total_loss(r)), nll[0, top].sum() / k, **TOL)


# ----------------------------------------------------------------------------------------------------------------
# normalizers known from the data (gradient accumulation divides by these)
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("obj", [
    losses.CE(), losses.CE(per_sequence=True), losses.PerCE(), losses.PerCE(per_sequence=True),
    losses.EntCE(), losses.EntCE(per_sequence=True), losses.LossCE(), losses.LossCE(keep_frac=0.5),
], ids=repr)
def test_data_normalizer_matches_objective_normalizer(obj):
    passes = losses.Passes(po(ZP_L, with_entropy=True), po(ZC), ref_p=po(ZR))
    r = obj(passes, targets())
    if isinstance(obj, losses.LossCE):
        expected = float(math.ceil(Fraction(str(obj.keep_frac)) * 5))  # 5 response tokens
    else:
        expected = 2.0 if obj.per_sequence else 5.0  # 2 sequences / 5 response tokens
    np.testing.assert_allclose(np.asarray(r.normalizer), [expected], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(obj.data_normalizer(targets())), [expected], rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_data_normalizer_lossce_per_micro_batch(jit):
    """With a leading micro-batch axis [k, b, R], LossCE selects within each micro-batch: Σ_k ceil(frac · n_k)."""
    w = np.array([[[1, 1, 1, 0]], [[1, 1, 0, 0]], [[1, 1, 1, 1]]], np.float32)  # n_k = 3, 2, 4
    seq_w = w / np.maximum(w.sum(-1, keepdims=True), 1)
    t = losses.Targets(jnp.zeros(w.shape, jnp.int32), jnp.asarray(w), jnp.asarray(seq_w))

    def fn(t, obj):
        f = lambda t: obj.data_normalizer(t)  # noqa: E731
        return (jax.jit(f) if jit else f)(t)

    # ceil(1.5) + ceil(1.0) + ceil(2.0) = 2 + 1 + 2
    np.testing.assert_allclose(np.asarray(fn(t, losses.LossCE(keep_frac=0.5))), [5.0])
    # default keep_frac 0.6 on micro-batches of 5, 10 and 25 tokens: 3 + 6 + 15 (exact products stay exact)
    w = np.zeros((3, 1, 25), np.float32)
    for i, n in enumerate((5, 10, 25)):
        w[i, 0, :n] = 1.0
    t = losses.Targets(jnp.zeros(w.shape, jnp.int32), jnp.asarray(w), jnp.asarray(w / w.sum(-1, keepdims=True)))
    np.testing.assert_allclose(np.asarray(fn(t, losses.LossCE())), [24.0])


@pytest.mark.parametrize("obj", [losses.NextQuill(), losses.NextQuill(weighted_lp=True, fixed_theta_d=True)],
                         ids=repr)
def test_data_normalizer_none_for_nextquill(obj):
    """NextQuill's Σω depends on the parameters: no data normalizer."""
    assert obj.data_normalizer(targets()) is None


# ----------------------------------------------------------------------------------------------------------------
# EntCE
# ----------------------------------------------------------------------------------------------------------------

def entce_reference(zp, max_weight, coef):
    h = np_entropy(zp)
    mean_h = (WEIGHT * h).sum() / WEIGHT.sum()
    w = np.minimum(h / mean_h, max_weight)
    nll = -np_logp(zp)
    return h, w, nll, (coef * w * nll).sum(), coef.sum()


@pytest.mark.parametrize("max_weight", [5.0, 1.05])
def test_entce_hand_computed(max_weight):
    r = losses.EntCE(max_weight=max_weight)(losses.Passes(po(ZP, with_entropy=True)), targets())
    h, w, nll, loss_sum, n = entce_reference(ZP, max_weight, WEIGHT)
    if max_weight < 2:
        assert np.sum((h / ((WEIGHT * h).sum() / 5) > max_weight) & (WEIGHT > 0)) >= 1  # clipping is exercised
    else:
        # unclipped: mean weight over valid tokens is exactly 1 (step size matches CE)
        np.testing.assert_allclose((WEIGHT * w).sum() / 5, 1.0, atol=1e-12)
    check_result(r, [loss_sum], [n], {
        "tokens": 5.0,
        "nll_sum": (WEIGHT * nll).sum(),
        "entropy_sum": (WEIGHT * h).sum(),
        "weight_sum": (WEIGHT * w).sum(),
    })


@pytest.mark.parametrize("max_weight", [5.0, 1.05])
def test_entce_diagnostics(max_weight):
    """``diagnostics``: predictive entropy H_t and w_t = min(H_t / mean H, max_weight), the mean over valid tokens."""
    d = losses.EntCE(max_weight=max_weight).diagnostics(losses.Passes(po(ZP, with_entropy=True)), targets())
    assert set(d) == {"entropy", "entce_weight"}
    h, w, *_ = entce_reference(ZP, max_weight, WEIGHT)
    valid = WEIGHT > 0  # padding slots are unspecified
    for key in d:
        assert d[key].shape == WEIGHT.shape, key
    np.testing.assert_allclose(np.asarray(d["entropy"])[valid], h[valid], **TOL)
    np.testing.assert_allclose(np.asarray(d["entce_weight"])[valid], w[valid], **TOL)
    # the padding slot's entropy is not in the mean: including it would change every weight
    h_all_mean = h.mean()
    assert abs(h_all_mean - (WEIGHT * h).sum() / 5) > 1e-3


def test_entce_per_sequence_and_constant_weights():
    t = targets()
    r = losses.EntCE(per_sequence=True)(losses.Passes(po(ZP, with_entropy=True)), t)
    h, w, nll, _, _ = entce_reference(ZP, 5.0, WEIGHT)
    seq0 = (w[0, :3] * nll[0, :3]).sum() / 3
    seq1 = (w[1, :2] * nll[1, :2]).sum() / 2
    check_result(r, [seq0 + seq1], [2.0], {"weight_sum": (WEIGHT * w).sum()})
    # gradient: entropy weights are constants
    entce = losses.EntCE()
    g = jax.grad(lambda zp: losses.total_loss(entce(losses.Passes(po(zp, with_entropy=True)), t)))(
        jnp.asarray(ZP))
    onehot = np.eye(4)[IDS]
    expected = (WEIGHT * w / 5)[..., None] * (np.exp(np_log_softmax(ZP)) - onehot)
    np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-5, atol=1e-6)


def test_total_loss_sums_terms():
    r = losses.Result(jnp.asarray([3.0, 1.0]), jnp.asarray([2.0, 4.0]), {})
    np.testing.assert_allclose(float(losses.total_loss(r)), 3.0 / 2.0 + 1.0 / 4.0, rtol=1e-7)
