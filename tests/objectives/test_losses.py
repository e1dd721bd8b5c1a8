"""Token-level objectives on small literal logits, checked against independent numpy computations.

Every expected number is computed here from the formulas in the specs (perce.md §1–3, nextquill.md §3/§8) and the
docstrings of ``percausal_jax.objectives.losses``; the library is only called to produce the values under test.
Shapes: B=2 sequences, R=3 response slots, V=4; slot (1, 2) is padding (weight 0).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from percausal_jax.objectives import losses
from tests.objectives.fixtures import (IDS, TOL, WEIGHT, ZC, ZC_NQ, ZP, ZP_NQ, check_result, np_entropy, np_gold,
                                      np_log_softmax, np_logp, po, targets, two_passes)


# ----------------------------------------------------------------------------------------------------------------
# config defaults vs the specs
# ----------------------------------------------------------------------------------------------------------------

def test_default_hyperparameters_match_specs():
    # perce.md §2.1: m = 0.8, M = 5.0
    perce = losses.PerCE()
    assert perce.clip_min == 0.8 and perce.clip_max == 5.0
    assert perce.per_sequence is False
    # nextquill.md §3 table: δ = 0.05, λ = 0.9, ε = 0.1, α = 0.1; code-faithful default = unweighted L_p, dynamic DCE
    nq = losses.NextQuill()
    assert (nq.delta, nq.high, nq.low, nq.alpha) == (0.05, 0.9, 0.1, 0.1)
    assert nq.weighted_lp is False and nq.fixed_theta_d is False
    # LossCE docstring: default keep 60%
    assert losses.LossCE().keep_frac == 0.6
    # EntCE docstring: weights clipped at 5, per-token normalization; CE per token
    assert losses.EntCE().max_weight == 5.0 and losses.EntCE().per_sequence is False
    assert losses.CE().per_sequence is False


def test_objectives_are_frozen_keyword_only_values():
    """Hyper-parameters are typed, keyword-only, immutable fields: a positional or misspelled argument is an error,
    and equal hyper-parameters give equal (hashable) objectives, so one can close over them in a jitted function."""
    with pytest.raises(TypeError):
        losses.PerCE(0.5, 4.0)
    with pytest.raises(TypeError):
        losses.PerCE(clip_mx=4.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        losses.PerCE().clip_min = 0.5
    assert losses.PerCE(clip_min=0.5) == losses.PerCE(clip_min=0.5) != losses.PerCE()
    assert hash(losses.NextQuill(fixed_theta_d=True)) == hash(losses.NextQuill(fixed_theta_d=True))


def test_outputs_from_logits_matches_numpy():
    out = po(ZP, with_entropy=True)
    np.testing.assert_allclose(np.asarray(out.logp), np_logp(ZP), **TOL)
    np.testing.assert_allclose(np.asarray(out.entropy), np_entropy(ZP), **TOL)


# ----------------------------------------------------------------------------------------------------------------
# CE
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("per_sequence", [False, True])
def test_ce_hand_computed(per_sequence):
    r = losses.CE(per_sequence=per_sequence)(losses.Passes(po(ZP)), targets())
    nll = -np_logp(ZP)
    n_tok = 5.0
    if per_sequence:
        # each sequence's mean nll, averaged over the 2 sequences
        seq0 = nll[0, :3].mean()
        seq1 = nll[1, :2].mean()
        loss_sum, norm = (seq0 + seq1), 2.0
        np.testing.assert_allclose(float(losses.total_loss(r)), (seq0 + seq1) / 2, **TOL)
    else:
        loss_sum, norm = (WEIGHT * nll).sum(), n_tok
    check_result(r, [loss_sum], [norm], {"tokens": n_tok, "nll_sum": (WEIGHT * nll).sum()})


# ----------------------------------------------------------------------------------------------------------------
# PerCE
# ----------------------------------------------------------------------------------------------------------------

def perce_reference(zp, zc, clip_min, clip_max, coef):
    lp_p, lp_c = np_logp(zp), np_logp(zc)
    pir = lp_p - lp_c
    w = np.minimum(np.maximum(pir, clip_min), clip_max)
    nll = -lp_p
    return pir, w, nll, (coef * w * nll).sum(), coef.sum()


def test_perce_fixture_covers_all_clip_regions():
    pir = np_logp(ZP) - np_logp(ZC)
    valid = WEIGHT > 0
    assert np.sum((pir < 0.8) & valid) == 2
    assert np.sum((pir > 5.0) & valid) == 1
    assert np.sum((pir > 0.8) & (pir < 5.0) & valid) == 2
    assert pir[1, 2] > 5.0  # the padding slot would count as clipped-at-max if it leaked


def test_perce_hand_computed_default():
    r = losses.PerCE()(losses.Passes(po(ZP), po(ZC)), targets())
    pir, w, nll, loss_sum, n = perce_reference(ZP, ZC, 0.8, 5.0, WEIGHT)
    assert n == 5.0
    check_result(r, [loss_sum], [n], {
        "tokens": 5.0,
        "nll_sum": (WEIGHT * nll).sum(),
        "pir_sum": (WEIGHT * pir).sum(),
        "weight_sum": (WEIGHT * w).sum(),
        "clip_min_count": 2.0,
        "clip_max_count": 1.0,
    })
    # the weights: clip_min for the two low-PIR tokens, clip_max for the high one, PIR itself in between
    np.testing.assert_allclose(w[0, 0], 0.8)
    np.testing.assert_allclose(w[1, 1], 0.8)
    np.testing.assert_allclose(w[0, 1], 5.0)
    np.testing.assert_allclose(w[0, 2], pir[0, 2])


def test_perce_other_clip_bounds():
    r = losses.PerCE(clip_min=0.2, clip_max=2.0)(losses.Passes(po(ZP), po(ZC)), targets())
    pir, w, nll, loss_sum, n = perce_reference(ZP, ZC, 0.2, 2.0, WEIGHT)
    valid = WEIGHT > 0
    check_result(r, [loss_sum], [n], {
        "weight_sum": (WEIGHT * w).sum(),
        "clip_min_count": float(np.sum((pir <= 0.2) & valid)),
        "clip_max_count": float(np.sum((pir >= 2.0) & valid)),
    })


def test_perce_per_sequence():
    r = losses.PerCE(per_sequence=True)(losses.Passes(po(ZP), po(ZC)), targets())
    pir, w, nll, _, _ = perce_reference(ZP, ZC, 0.8, 5.0, WEIGHT)
    seq0 = (w[0, :3] * nll[0, :3]).sum() / 3
    seq1 = (w[1, :2] * nll[1, :2]).sum() / 2
    check_result(r, [seq0 + seq1], [2.0], {"tokens": 5.0, "weight_sum": (WEIGHT * w).sum()})
    np.testing.assert_allclose(float(losses.total_loss(r)), (seq0 + seq1) / 2, **TOL)


@pytest.mark.parametrize("clip_min, clip_max", [(0.8, 5.0), (0.2, 2.0)])
def test_perce_diagnostics(clip_min, clip_max):
    """``diagnostics``: PIR_t and w_t = clip(PIR_t, m, M) per token (what ``percausal score`` prints)."""
    d = losses.PerCE(clip_min=clip_min, clip_max=clip_max).diagnostics(losses.Passes(po(ZP), po(ZC)), targets())
    assert set(d) == {"pir", "perce_weight"}
    pir, w, *_ = perce_reference(ZP, ZC, clip_min, clip_max, WEIGHT)
    valid = WEIGHT > 0  # padding slots are unspecified
    for k in d:
        assert d[k].shape == WEIGHT.shape, k
    np.testing.assert_allclose(np.asarray(d["pir"])[valid], pir[valid], **TOL)
    np.testing.assert_allclose(np.asarray(d["perce_weight"])[valid], w[valid], **TOL)
    # every clip region is present among the valid tokens (the weights are not all clipped, nor all unclipped)
    wv = w[valid]
    assert np.any(wv == clip_min) and np.any(wv == clip_max) and np.any((wv > clip_min) & (wv < clip_max))


def test_ce_has_no_diagnostics():
    assert losses.CE().diagnostics(losses.Passes(po(ZP)), targets()) == {}


def test_perce_pir_sign():
    """PIR = log p(y | profile) - log p(y | no profile): swapping the passes negates it (perce.md §1)."""
    perce = losses.PerCE()
    r = perce(losses.Passes(po(ZP), po(ZC)), targets())
    r_swapped = perce(losses.Passes(po(ZC), po(ZP)), targets())
    expected = (WEIGHT * (np_logp(ZP) - np_logp(ZC))).sum()
    assert abs(expected) > 0.5
    np.testing.assert_allclose(float(r.metrics["pir_sum"]), expected, **TOL)
    np.testing.assert_allclose(float(r_swapped.metrics["pir_sum"]), -expected, **TOL)


def test_perce_gradient_treats_weights_as_constants():
    """d loss / d z_p = w·weight/n · (softmax(z_p) - onehot(y)) with w constant; d loss / d z_c == 0 exactly."""
    perce = losses.PerCE()
    t = targets()

    def lib_loss(zp, zc):
        return losses.total_loss(perce(losses.Passes(po(zp), po(zc)), t))

    gp, gc = jax.grad(lib_loss, argnums=(0, 1))(jnp.asarray(ZP), jnp.asarray(ZC))

    _, w_const, _, _, n = perce_reference(ZP, ZC, 0.8, 5.0, WEIGHT)
    onehot = np.eye(4)[IDS]
    probs = np.exp(np_log_softmax(ZP))
    analytic = (WEIGHT * w_const / n)[..., None] * (probs - onehot)
    np.testing.assert_allclose(np.asarray(gp), analytic, rtol=1e-5, atol=1e-6)

    # the same via jax.grad of Σ w·nll / n with w a numpy constant
    w_c = jnp.asarray(w_const, jnp.float32)

    def const_w_loss(zp):
        nll = -jnp.take_along_axis(jax.nn.log_softmax(zp), jnp.asarray(IDS)[..., None], -1)[..., 0]
        return jnp.sum(jnp.asarray(WEIGHT) * w_c * nll) / n

    np.testing.assert_allclose(np.asarray(gp), np.asarray(jax.grad(const_w_loss)(jnp.asarray(ZP))),
                               rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(gc) == 0.0)


# ----------------------------------------------------------------------------------------------------------------
# NextQuill
# ----------------------------------------------------------------------------------------------------------------

def nextquill_reference(zp, zc, dce_src_p, dce_src_c, *, delta=0.05, high=0.9, low=0.1, alpha=0.1,
                        weighted_lp=False):
    """nextquill.md §8: DCE on gold-token probabilities, ω = high/low by DCE > δ, L_n = Σ ω nll / Σ ω,
    L_p = CE(z_h - z_0, y) mean over valid tokens (or ω-weighted), loss = L_n + α L_p."""
    dce = np.exp(np_logp(dce_src_p)) - np.exp(np_logp(dce_src_c))
    omega = np.where(dce > delta, high, low) * WEIGHT
    nll = -np_logp(zp)
    diff = np.asarray(zp, np.float64) - np.asarray(zc, np.float64)
    ce_diff = -np_gold(np_log_softmax(diff))
    ln_sum, ln_norm = (omega * nll).sum(), omega.sum()
    if weighted_lp:
        lp_sum, lp_norm = (omega * ce_diff).sum(), omega.sum()
    else:
        lp_sum, lp_norm = (WEIGHT * ce_diff).sum(), WEIGHT.sum()
    return dict(dce=dce, omega=omega, nll=nll, ce_diff=ce_diff, loss_sum=[ln_sum, alpha * lp_sum],
                normalizer=[ln_norm, lp_norm], total=ln_sum / ln_norm + alpha * lp_sum / lp_norm)


def test_nextquill_fixture_straddles_delta():
    dce = np.exp(np_logp(ZP_NQ)) - np.exp(np_logp(ZC_NQ))
    np.testing.assert_allclose(dce[0, 0], 0.051, atol=1e-9)
    np.testing.assert_allclose(dce[0, 1], 0.049, atol=1e-9)


def test_nextquill_hand_computed_default():
    r = losses.NextQuill()(two_passes(ZP_NQ, ZC_NQ), targets())
    ref = nextquill_reference(ZP_NQ, ZC_NQ, ZP_NQ, ZC_NQ)
    # just above δ -> high, just below -> low
    assert ref["omega"][0, 0] == 0.9 and ref["omega"][0, 1] == 0.1
    valid = WEIGHT > 0
    check_result(r, ref["loss_sum"], ref["normalizer"], {
        "tokens": 5.0,
        "nll_sum": (WEIGHT * ref["nll"]).sum(),
        "dce_sum": (WEIGHT * ref["dce"]).sum(),
        "upweighted_count": float(np.sum((ref["dce"] > 0.05) & valid)),
        "alignment_ce_sum": (WEIGHT * ref["ce_diff"]).sum(),
    })
    np.testing.assert_allclose(float(losses.total_loss(r)), ref["total"], **TOL)


def test_nextquill_weighted_lp():
    r = losses.NextQuill(weighted_lp=True)(two_passes(ZP_NQ, ZC_NQ), targets())
    ref = nextquill_reference(ZP_NQ, ZC_NQ, ZP_NQ, ZC_NQ, weighted_lp=True)
    check_result(r, ref["loss_sum"], ref["normalizer"], {"alignment_ce_sum": (WEIGHT * ref["ce_diff"]).sum()})
    # and it differs from the unweighted variant on these inputs
    unweighted = nextquill_reference(ZP_NQ, ZC_NQ, ZP_NQ, ZC_NQ)["total"]
    assert abs(ref["total"] - unweighted) > 1e-3


def test_nextquill_fixed_theta_d_uses_reference_passes():
    # reference passes: personalized and counterfactual swapped -> DCE_ref = -DCE
    passes = two_passes(ZP_NQ, ZC_NQ, ref_p=po(ZC_NQ), ref_c=po(ZP_NQ))
    r = losses.NextQuill(fixed_theta_d=True)(passes, targets())
    ref = nextquill_reference(ZP_NQ, ZC_NQ, ZC_NQ, ZP_NQ)
    dyn = nextquill_reference(ZP_NQ, ZC_NQ, ZP_NQ, ZC_NQ)
    assert not np.array_equal(ref["omega"], dyn["omega"])  # the fixture distinguishes the two DCE sources
    valid = WEIGHT > 0
    check_result(r, ref["loss_sum"], ref["normalizer"], {
        "dce_sum": (WEIGHT * ref["dce"]).sum(),
        "upweighted_count": float(np.sum((ref["dce"] > 0.05) & valid)),
    })


@pytest.mark.parametrize("fixed_theta_d", [False, True], ids=["dynamic", "fixed_theta_d"])
@pytest.mark.parametrize("hp", [{}, {"delta": 0.0, "high": 2.0, "low": 0.5}], ids=["default", "custom"])
def test_nextquill_diagnostics(fixed_theta_d, hp):
    """``diagnostics``: DCE_t = p_h(y_t) − p_0(y_t) (from the reference passes with fixed_theta_d) and ω_t."""
    nq = losses.NextQuill(fixed_theta_d=fixed_theta_d, **hp)
    passes = two_passes(ZP_NQ, ZC_NQ, ref_p=po(ZC_NQ), ref_c=po(ZP_NQ))  # reference: DCE_ref = -DCE
    d = nq.diagnostics(passes, targets())
    assert set(d) == {"dce", "nextquill_weight"}
    src = (ZC_NQ, ZP_NQ) if fixed_theta_d else (ZP_NQ, ZC_NQ)
    ref = nextquill_reference(ZP_NQ, ZC_NQ, *src, delta=nq.delta, high=nq.high, low=nq.low)
    valid = WEIGHT > 0  # padding slots are unspecified
    for k in d:
        assert d[k].shape == WEIGHT.shape, k
    np.testing.assert_allclose(np.asarray(d["dce"])[valid], ref["dce"][valid], **TOL)
    np.testing.assert_array_equal(np.asarray(d["nextquill_weight"])[valid], np.float32(ref["omega"][valid]))
    # both weight levels occur among the valid tokens
    assert set(np.unique(ref["omega"][valid])) == {nq.high, nq.low}


def test_nextquill_gradient_flows_through_both_passes():
    nq = losses.NextQuill()
    t = targets()

    def lib_loss(zp, zc):
        return losses.total_loss(nq(two_passes(zp, zc), t))

    gp, gc = jax.grad(lib_loss, argnums=(0, 1))(jnp.asarray(ZP_NQ), jnp.asarray(ZC_NQ))
    ref = nextquill_reference(ZP_NQ, ZC_NQ, ZP_NQ, ZC_NQ)
    onehot = np.eye(4)[IDS]
    diff = ZP_NQ.astype(np.float64) - ZC_NQ.astype(np.float64)
    sm_diff = np.exp(np_log_softmax(diff))
    n = WEIGHT.sum()
    # only α·L_p depends on z_0 (ω is a constant): d/dz_0 = -α/n · (softmax(z_h - z_0) - onehot(y)) on valid tokens
    expected_gc = -(0.1 / n) * WEIGHT[..., None] * (sm_diff - onehot)
    assert np.abs(np.asarray(gc)).max() > 1e-3
    np.testing.assert_allclose(np.asarray(gc), expected_gc, rtol=1e-5, atol=1e-6)
    # d/dz_h = ω/Σω (softmax(z_h) - onehot) + α/n (softmax(z_h - z_0) - onehot)
    sm_p = np.exp(np_log_softmax(ZP_NQ))
    expected_gp = (ref["omega"] / ref["omega"].sum())[..., None] * (sm_p - onehot) - expected_gc
    np.testing.assert_allclose(np.asarray(gp), expected_gp, rtol=1e-5, atol=1e-6)

    # perturbing the counterfactual logits (without changing ω) changes the gradient w.r.t. z_h
    zc2 = ZC_NQ.copy()
    zc2[1, 0] += np.array([0.0, 0.7, -0.4, 0.0], np.float32)  # non-gold entries: p_0(y) changes a little
    assert np.array_equal(nextquill_reference(ZP_NQ, zc2, ZP_NQ, zc2)["omega"], ref["omega"])
    gp2 = jax.grad(lib_loss)(jnp.asarray(ZP_NQ), jnp.asarray(zc2))
    assert np.abs(np.asarray(gp2) - np.asarray(gp)).max() > 1e-3


def test_nextquill_padding_slot_gets_no_gradient():
    nq = losses.NextQuill()
    t = targets()
    gp, gc = jax.grad(lambda zp, zc: losses.total_loss(nq(two_passes(zp, zc), t)),
                      argnums=(0, 1))(jnp.asarray(ZP_NQ), jnp.asarray(ZC_NQ))
    assert np.all(np.asarray(gp)[1, 2] == 0.0) and np.all(np.asarray(gc)[1, 2] == 0.0)
