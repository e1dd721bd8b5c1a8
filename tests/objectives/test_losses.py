"""Token-level objectives on small literal logits, checked against independent numpy computations.

Every expected number is computed here from the formulas in the specs (perce.md §1–3, nextquill.md §3/§8) and the
docstrings of ``percausal_jax.objectives.losses``; the library is only called to produce the values under test.
Shapes: B=2 sequences, R=3 response slots, V=4; slot (1, 2) is padding (weight 0).
"""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from percausal_jax.objectives import losses
from percausal_jax.objectives.logprobs import outputs_from_logits

TOL = dict(rtol=1e-5, atol=1e-5)

# ----------------------------------------------------------------------------------------------------------------
# Literal inputs
# ----------------------------------------------------------------------------------------------------------------

IDS = np.array([[0, 2, 1],
                [3, 1, 0]], np.int32)
WEIGHT = np.array([[1.0, 1.0, 1.0],
                   [1.0, 1.0, 0.0]], np.float32)  # slot (1, 2) is padding
SEQ_WEIGHT = np.array([[1 / 3, 1 / 3, 1 / 3],
                       [1 / 2, 1 / 2, 0.0]], np.float32)

# personalized pass (profile + query), [B, R, V]
ZP = np.array([
    [[1.0, 0.5, -0.5, 0.2],    # gold 0: PIR slightly negative        -> below clip_min
     [0.1, -0.2, 4.0, 0.3],    # gold 2: PIR ~ 6.5                     -> above clip_max
     [0.0, 2.0, 0.0, -1.0]],   # gold 1: PIR ~ 1.3                     -> between
    [[0.2, 0.1, -0.3, 1.5],    # gold 3: PIR ~ 0.9                     -> between
     [0.3, -1.0, 0.8, 0.0],    # gold 1: PIR strongly negative         -> below clip_min
     [3.0, -2.0, 0.0, 1.0]],   # padding slot (gold 0, PIR > 5: must not leak into anything)
], np.float32)

# counterfactual pass (query only, same response ids)
ZC = np.array([
    [[1.2, 0.4, -0.3, 0.1],
     [0.5, 0.2, -5.0, 0.1],
     [0.5, 0.0, 0.3, -0.2]],
    [[0.2, 0.1, -0.3, 0.0],
     [0.3, 1.0, 0.8, 0.0],
     [-3.0, 2.0, 0.0, 1.0]],
], np.float32)

# NextQuill: slots (0,0) and (0,1) are given as log-probabilities so that p_h - p_0 = 0.051 (just above δ=0.05)
# and 0.049 (just below); the rest as ZP/ZC.
ZP_NQ = ZP.copy()
ZC_NQ = ZC.copy()
ZP_NQ[0, 0] = np.log(np.array([0.400, 0.200, 0.200, 0.200]))  # gold 0: p_h = 0.400
ZC_NQ[0, 0] = np.log(np.array([0.349, 0.217, 0.217, 0.217]))  # gold 0: p_0 = 0.349 -> DCE = 0.051
ZP_NQ[0, 1] = np.log(np.array([0.100, 0.200, 0.500, 0.200]))  # gold 2: p_h = 0.500
ZC_NQ[0, 1] = np.log(np.array([0.200, 0.100, 0.451, 0.249]))  # gold 2: p_0 = 0.451 -> DCE = 0.049

# frozen reference parameters for LossCE (same personalized input)
ZR = np.array([
    [[0.5, 0.5, -0.5, 0.2],
     [0.1, -0.2, 3.0, 0.3],
     [0.0, 2.5, 0.0, -1.0]],
    [[0.2, 0.1, -0.3, 1.0],
     [0.3, 0.0, 0.8, 0.0],
     [6.0, -2.0, -1.0, 0.0]],
], np.float32)
# LossCE personalized logits: as ZP but the padding slot has by far the largest excess loss (must never be selected)
ZP_L = ZP.copy()
ZP_L[1, 2] = [-6.0, 2.0, 1.0, 0.0]


# ----------------------------------------------------------------------------------------------------------------
# numpy references (float64)
# ----------------------------------------------------------------------------------------------------------------

def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_gold(a, ids=IDS):
    return np.take_along_axis(a, ids[..., None], -1)[..., 0]


def np_logp(z, ids=IDS):
    return np_gold(np_log_softmax(z), ids)


def np_entropy(z):
    ls = np_log_softmax(z)
    return -(np.exp(ls) * ls).sum(-1)


def targets(ids=IDS, weight=WEIGHT, seq_weight=SEQ_WEIGHT):
    return losses.Targets(jnp.asarray(ids), jnp.asarray(weight), jnp.asarray(seq_weight))


def po(z, ids=IDS, with_entropy=False):
    return outputs_from_logits(jnp.asarray(z, jnp.float32), jnp.asarray(ids), with_entropy=with_entropy)


def check_result(r, loss_sum, normalizer, metrics):
    np.testing.assert_allclose(np.asarray(r.loss_sum), np.asarray(loss_sum, np.float64), **TOL)
    np.testing.assert_allclose(np.asarray(r.normalizer), np.asarray(normalizer, np.float64), **TOL)
    expected_total = float(np.sum(np.asarray(loss_sum) / np.asarray(normalizer)))
    np.testing.assert_allclose(float(losses.total_loss(r)), expected_total, **TOL)
    for k, v in metrics.items():
        assert k in r.metrics, f"metric {k} missing"
        np.testing.assert_allclose(float(r.metrics[k]), v, err_msg=k, **TOL)


# ----------------------------------------------------------------------------------------------------------------
# config defaults vs the specs
# ----------------------------------------------------------------------------------------------------------------

def test_default_hyperparameters_match_specs():
    cfg = losses.default_config()
    # perce.md §2.1: m = 0.8, M = 5.0
    assert cfg.perce.clip_min == 0.8 and cfg.perce.clip_max == 5.0
    assert cfg.perce.per_sequence is False
    # nextquill.md §3 table: δ = 0.05, λ = 0.9, ε = 0.1, α = 0.1; code-faithful default = unweighted L_p, dynamic DCE
    nq = cfg.nextquill
    assert (nq.delta, nq.high, nq.low, nq.alpha) == (0.05, 0.9, 0.1, 0.1)
    assert nq.weighted_lp is False and nq.fixed_theta_d is False
    # losses.lossce docstring: default keep 60%
    assert cfg.lossce.keep_frac == 0.6


def test_outputs_from_logits_matches_numpy():
    out = po(ZP, with_entropy=True)
    np.testing.assert_allclose(np.asarray(out.logp), np_logp(ZP), **TOL)
    np.testing.assert_allclose(np.asarray(out.entropy), np_entropy(ZP), **TOL)
    np.testing.assert_array_equal(np.asarray(out.logits), ZP)


# ----------------------------------------------------------------------------------------------------------------
# CE
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("per_sequence", [False, True])
def test_ce_hand_computed(per_sequence):
    cfg = losses.default_config().ce
    cfg.per_sequence = per_sequence
    r = losses.ce(losses.Passes(po(ZP)), targets(), cfg)
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
    cfg = losses.default_config().perce
    r = losses.perce(losses.Passes(po(ZP), po(ZC)), targets(), cfg)
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
    cfg = losses.default_config().perce
    cfg.clip_min, cfg.clip_max = 0.2, 2.0
    r = losses.perce(losses.Passes(po(ZP), po(ZC)), targets(), cfg)
    pir, w, nll, loss_sum, n = perce_reference(ZP, ZC, 0.2, 2.0, WEIGHT)
    valid = WEIGHT > 0
    check_result(r, [loss_sum], [n], {
        "weight_sum": (WEIGHT * w).sum(),
        "clip_min_count": float(np.sum((pir <= 0.2) & valid)),
        "clip_max_count": float(np.sum((pir >= 2.0) & valid)),
    })


def test_perce_per_sequence():
    cfg = losses.default_config().perce
    cfg.per_sequence = True
    r = losses.perce(losses.Passes(po(ZP), po(ZC)), targets(), cfg)
    pir, w, nll, _, _ = perce_reference(ZP, ZC, 0.8, 5.0, WEIGHT)
    seq0 = (w[0, :3] * nll[0, :3]).sum() / 3
    seq1 = (w[1, :2] * nll[1, :2]).sum() / 2
    check_result(r, [seq0 + seq1], [2.0], {"tokens": 5.0, "weight_sum": (WEIGHT * w).sum()})
    np.testing.assert_allclose(float(losses.total_loss(r)), (seq0 + seq1) / 2, **TOL)


def test_perce_pir_sign():
    """PIR = log p(y | profile) - log p(y | no profile): swapping the passes negates it (perce.md §1)."""
    cfg = losses.default_config().perce
    r = losses.perce(losses.Passes(po(ZP), po(ZC)), targets(), cfg)
    r_swapped = losses.perce(losses.Passes(po(ZC), po(ZP)), targets(), cfg)
    expected = (WEIGHT * (np_logp(ZP) - np_logp(ZC))).sum()
    assert abs(expected) > 0.5
    np.testing.assert_allclose(float(r.metrics["pir_sum"]), expected, **TOL)
    np.testing.assert_allclose(float(r_swapped.metrics["pir_sum"]), -expected, **TOL)


def test_perce_gradient_treats_weights_as_constants():
    """d loss / d z_p = w·weight/n · (softmax(z_p) - onehot(y)) with w constant; d loss / d z_c == 0 exactly."""
    cfg = losses.default_config().perce
    t = targets()

    def lib_loss(zp, zc):
        return losses.total_loss(losses.perce(losses.Passes(po(zp), po(zc)), t, cfg))

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
    cfg = losses.default_config().nextquill
    r = losses.nextquill(losses.Passes(po(ZP_NQ), po(ZC_NQ)), targets(), cfg)
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
    cfg = losses.default_config().nextquill
    cfg.weighted_lp = True
    r = losses.nextquill(losses.Passes(po(ZP_NQ), po(ZC_NQ)), targets(), cfg)
    ref = nextquill_reference(ZP_NQ, ZC_NQ, ZP_NQ, ZC_NQ, weighted_lp=True)
    check_result(r, ref["loss_sum"], ref["normalizer"], {"alignment_ce_sum": (WEIGHT * ref["ce_diff"]).sum()})
    # and it differs from the unweighted variant on these inputs
    unweighted = nextquill_reference(ZP_NQ, ZC_NQ, ZP_NQ, ZC_NQ)["total"]
    assert abs(ref["total"] - unweighted) > 1e-3


def test_nextquill_fixed_theta_d_uses_reference_passes():
    cfg = losses.default_config().nextquill
    cfg.fixed_theta_d = True
    # reference passes: personalized and counterfactual swapped -> DCE_ref = -DCE
    passes = losses.Passes(po(ZP_NQ), po(ZC_NQ), ref_p=po(ZC_NQ), ref_c=po(ZP_NQ))
    r = losses.nextquill(passes, targets(), cfg)
    ref = nextquill_reference(ZP_NQ, ZC_NQ, ZC_NQ, ZP_NQ)
    dyn = nextquill_reference(ZP_NQ, ZC_NQ, ZP_NQ, ZC_NQ)
    assert not np.array_equal(ref["omega"], dyn["omega"])  # the fixture distinguishes the two DCE sources
    valid = WEIGHT > 0
    check_result(r, ref["loss_sum"], ref["normalizer"], {
        "dce_sum": (WEIGHT * ref["dce"]).sum(),
        "upweighted_count": float(np.sum((ref["dce"] > 0.05) & valid)),
    })


def test_nextquill_gradient_flows_through_both_passes():
    cfg = losses.default_config().nextquill
    t = targets()

    def lib_loss(zp, zc):
        return losses.total_loss(losses.nextquill(losses.Passes(po(zp), po(zc)), t, cfg))

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
    cfg = losses.default_config().nextquill
    t = targets()
    gp, gc = jax.grad(lambda zp, zc: losses.total_loss(losses.nextquill(losses.Passes(po(zp), po(zc)), t, cfg)),
                      argnums=(0, 1))(jnp.asarray(ZP_NQ), jnp.asarray(ZC_NQ))
    assert np.all(np.asarray(gp)[1, 2] == 0.0) and np.all(np.asarray(gc)[1, 2] == 0.0)


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


def run_lossce(zp, zr, t, cfg, jit):
    """losses.lossce eagerly or under jax.jit (as in the training step): XLA may rewrite float arithmetic."""
    fn = lambda zp, zr, t: losses.lossce(losses.Passes(po(zp, t.ids), ref_p=po(zr, t.ids)), t, cfg)  # noqa: E731
    return (jax.jit(fn) if jit else fn)(jnp.asarray(zp), jnp.asarray(zr), t)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("keep_frac, k", [(0.5, 3), (0.1, 1), (0.3, 2), (0.6, 3), (0.7, 4), (1.0, 5)])
def test_lossce_hand_computed(keep_frac, k, jit):
    # ceil matters: 0.5·5 = 2.5 -> 3 (floor/round give 2); 0.1·5 = 0.5 -> 1 (floor gives 0); 0.7·5 = 3.5 -> 4;
    # 0.6·5 = 3 exactly -> 3
    cfg = losses.default_config().lossce
    cfg.keep_frac = keep_frac
    r = run_lossce(ZP_L, ZR, targets(), cfg, jit)
    nll, excess, selected, k_ref = lossce_reference(ZP_L, ZR, keep_frac)
    assert k_ref == k
    assert not selected[1, 2]
    check_result(r, [(selected * nll).sum()], [float(k)], {
        "tokens": 5.0,
        "nll_sum": (WEIGHT * nll).sum(),
        "excess_sum": (WEIGHT * excess).sum(),
        "selected_count": float(k),
    })


def test_lossce_gradient_only_on_selected_tokens():
    cfg = losses.default_config().lossce
    cfg.keep_frac = 0.5
    t = targets()
    g = jax.grad(lambda zp, zr: losses.total_loss(losses.lossce(losses.Passes(po(zp), ref_p=po(zr)), t, cfg)),
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
    cfg = losses.default_config().lossce
    cfg.keep_frac = keep_frac
    r = run_lossce(zp, zr, targets(ids, w, w / n), cfg, jit)
    nll, excess, _, _ = lossce_reference(zp, zr, keep_frac, w, ids)
    top = np.argsort(-excess[0], kind="stable")[:k]
    assert float(r.metrics["selected_count"]) == k
    np.testing.assert_allclose(float(losses.total_loss(r)), nll[0, top].sum() / k, **TOL)


# ----------------------------------------------------------------------------------------------------------------
# normalizers known from the data (gradient accumulation divides by these)
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, overrides", [
    ("ce", {}), ("ce", {"per_sequence": True}), ("perce", {}), ("perce", {"per_sequence": True}),
    ("entce", {}), ("entce", {"per_sequence": True}), ("lossce", {}), ("lossce", {"keep_frac": 0.5}),
])
def test_data_normalizer_matches_objective_normalizer(name, overrides):
    cfg = losses.default_config()[name]
    for key, v in overrides.items():
        cfg[key] = v
    passes = losses.Passes(po(ZP_L, with_entropy=True), po(ZC), ref_p=po(ZR))
    r = getattr(losses, name)(passes, targets(), cfg)
    if name == "lossce":
        expected = float(math.ceil(Fraction(str(cfg.keep_frac)) * 5))  # 5 response tokens
    else:
        expected = 2.0 if overrides.get("per_sequence") else 5.0  # 2 sequences / 5 response tokens
    np.testing.assert_allclose(np.asarray(r.normalizer), [expected], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(losses.data_normalizer(name, cfg, targets())), [expected], rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_data_normalizer_lossce_per_micro_batch(jit):
    """With a leading micro-batch axis [k, b, R], LossCE selects within each micro-batch: Σ_k ceil(frac · n_k)."""
    w = np.array([[[1, 1, 1, 0]], [[1, 1, 0, 0]], [[1, 1, 1, 1]]], np.float32)  # n_k = 3, 2, 4
    seq_w = w / np.maximum(w.sum(-1, keepdims=True), 1)
    t = losses.Targets(jnp.zeros(w.shape, jnp.int32), jnp.asarray(w), jnp.asarray(seq_w))
    cfg = losses.default_config().lossce
    cfg.keep_frac = 0.5

    def fn(t, cfg):
        f = lambda t: losses.data_normalizer("lossce", cfg, t)  # noqa: E731
        return (jax.jit(f) if jit else f)(t)

    np.testing.assert_allclose(np.asarray(fn(t, cfg)), [5.0])  # ceil(1.5) + ceil(1.0) + ceil(2.0) = 2 + 1 + 2
    # default keep_frac 0.6 on micro-batches of 5, 10 and 25 tokens: 3 + 6 + 15 (exact products stay exact)
    w = np.zeros((3, 1, 25), np.float32)
    for i, n in enumerate((5, 10, 25)):
        w[i, 0, :n] = 1.0
    t = losses.Targets(jnp.zeros(w.shape, jnp.int32), jnp.asarray(w), jnp.asarray(w / w.sum(-1, keepdims=True)))
    np.testing.assert_allclose(np.asarray(fn(t, losses.default_config().lossce)), [24.0])


def test_data_normalizer_none_for_nextquill():
    """NextQuill's Σω depends on the parameters: no data normalizer."""
    assert losses.data_normalizer("nextquill", losses.default_config().nextquill, targets()) is None


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
    cfg = losses.default_config().entce
    cfg.max_weight = max_weight
    r = losses.entce(losses.Passes(po(ZP, with_entropy=True)), targets(), cfg)
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


def test_entce_per_sequence_and_constant_weights():
    cfg = losses.default_config().entce
    cfg.per_sequence = True
    t = targets()
    r = losses.entce(losses.Passes(po(ZP, with_entropy=True)), t, cfg)
    h, w, nll, _, _ = entce_reference(ZP, 5.0, WEIGHT)
    seq0 = (w[0, :3] * nll[0, :3]).sum() / 3
    seq1 = (w[1, :2] * nll[1, :2]).sum() / 2
    check_result(r, [seq0 + seq1], [2.0], {"weight_sum": (WEIGHT * w).sum()})
    # gradient: entropy weights are constants
    cfg.per_sequence = False
    g = jax.grad(lambda zp: losses.total_loss(losses.entce(losses.Passes(po(zp, with_entropy=True)), t, cfg)))(
        jnp.asarray(ZP))
    onehot = np.eye(4)[IDS]
    expected = (WEIGHT * w / 5)[..., None] * (np.exp(np_log_softmax(ZP)) - onehot)
    np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-5, atol=1e-6)


def test_total_loss_sums_terms():
    r = losses.Result(jnp.asarray([3.0, 1.0]), jnp.asarray([2.0, 4.0]), {})
    np.testing.assert_allclose(float(losses.total_loss(r)), 3.0 / 2.0 + 1.0 / 4.0, rtol=1e-7)
