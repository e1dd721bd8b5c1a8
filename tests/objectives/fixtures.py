"""Shared literal inputs and independent numpy references for the objective tests.

Shapes: B=2 sequences, R=3 response slots, V=4; slot (1, 2) is padding (weight 0).
"""

import jax
import jax.numpy as jnp
import numpy as np

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


def contrast(zp, zc, ids=IDS):
    """log softmax(z_p − z_c) at the gold token (jnp, differentiable): ``Passes.contrast`` from full logits."""
    d = jnp.asarray(zp, jnp.float32) - jnp.asarray(zc, jnp.float32)
    return jnp.take_along_axis(jax.nn.log_softmax(d, axis=-1), jnp.asarray(ids)[..., None], axis=-1)[..., 0]


def two_passes(zp, zc, ref_p=None, ref_c=None, ids=IDS):
    """Personalized and counterfactual passes from full logits, with their contrast (what NextQuill reads)."""
    return losses.Passes(po(zp, ids), po(zc, ids), ref_p, ref_c, contrast(zp, zc, ids))


def all_passes():
    """Every pass the objectives can ask for, each with entropy (ZP_L / ZC / ZR / ZC_NQ as the personalized /
    counterfactual / reference passes) and the contrast; :func:`restrict` keeps what a ``Requirements`` asks."""
    return losses.Passes(po(ZP_L, with_entropy=True), po(ZC, with_entropy=True), ref_p=po(ZR, with_entropy=True),
                         ref_c=po(ZC_NQ, with_entropy=True), contrast=contrast(ZP_L, ZC))


def restrict(x, req):
    """The passes ``compute_passes`` would produce under ``req``: absent passes are None, each present pass has
    entropy only with ``entropy``, and the contrast is there only with ``contrast``."""
    def keep(out):
        return out._replace(entropy=out.entropy if req.entropy else None)

    return losses.Passes(keep(x.p), keep(x.c) if req.counterfactual else None,
                         keep(x.ref_p) if "p" in req.reference else None,
                         keep(x.ref_c) if "c" in req.reference else None,
                         x.contrast if req.contrast else None)


def check_result(r, loss_sum, normalizer, metrics):
    np.testing.assert_allclose(np.asarray(r.loss_sum), np.asarray(loss_sum, np.float64), **TOL)
    np.testing.assert_allclose(np.asarray(r.normalizer), np.asarray(normalizer, np.float64), **TOL)
    expected_total = float(np.sum(np.asarray(loss_sum) / np.asarray(normalizer)))
    np.testing.assert_allclose(float(losses.total_loss(r)), expected_total, **TOL)
    for k, v in metrics.items():
        assert k in r.metrics, f"metric {k} missing"
        np.testing.assert_allclose(float(r.metrics[k]), v, err_msg=k, **TOL)
