"""Token-level objectives: pure functions of the two passes' outputs at response positions.

Every objective returns ``Result(loss_sum, normalizer, metrics)`` where ``loss_sum`` and ``normalizer`` are
float32 vectors of the same length T (one entry per loss term, coefficients folded into ``loss_sum``) and

    loss = Σ_t loss_sum[t] / normalizer[t].

Gradient accumulation and multi-device reduction sum numerators and denominators over the global batch and divide
once. ``metrics`` are sums over response tokens (``tokens`` is among them), divided by ``tokens`` when logged.

Inputs (all at response positions, shapes ``[B, R]``), bundled in :class:`Passes` and :class:`Targets`:
- ``p``: personalized pass (profile + query → response), with gradient.
- ``c``: counterfactual pass (query only → the same response ids).
- ``ref_p`` / ``ref_c``: the same passes under frozen reference parameters (LossCE; NextQuill "fixed θ_D").
- ``ids``: gold response ids; ``weight``: 1.0 on response tokens, 0.0 on padding;
  ``seq_weight = weight / tokens-in-its-sequence`` (per-sequence normalization).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from percausal_jax.objectives.logprobs import PassOutputs

sg = jax.lax.stop_gradient


class Passes(NamedTuple):
    p: PassOutputs
    c: PassOutputs | None = None
    ref_p: PassOutputs | None = None
    ref_c: PassOutputs | None = None


class Targets(NamedTuple):
    ids: jax.Array  # int32[B, R]
    weight: jax.Array  # f32[B, R]
    seq_weight: jax.Array  # f32[B, R]


class Result(NamedTuple):
    loss_sum: jax.Array  # f32[T]
    normalizer: jax.Array  # f32[T]
    metrics: dict[str, jax.Array]  # scalar sums


def total_loss(r: Result) -> jax.Array:
    return jnp.sum(r.loss_sum / jnp.maximum(r.normalizer, 1e-12))


def _norm(t: Targets, cfg):
    """Token coefficients and normalizer: per response token (default) or per sequence (each sequence counts 1)."""
    coef = t.seq_weight if cfg.get("per_sequence", False) else t.weight
    return coef, jnp.sum(coef)


def _vec(*xs) -> jax.Array:
    return jnp.stack([jnp.asarray(x, jnp.float32) for x in xs])


def ce(x: Passes, t: Targets, cfg) -> Result:
    """Plain token CE on the personalized pass: Σ nll / n_tokens."""
    coef, n = _norm(t, cfg)
    weight, nll = t.weight, -x.p.logp
    return Result(_vec(jnp.sum(coef * nll)), _vec(n), {"tokens": jnp.sum(weight), "nll_sum": jnp.sum(weight * nll)})


def perce(x: Passes, t: Targets, cfg) -> Result:
    """PerCE (Zhang et al. 2026): PIR_t = log p(y_t | profile, x, y<t) − log p(y_t | x, y<t), both from the current
    parameters (bootstrap), w_t = clip(PIR_t, m, M) under stop_gradient; loss = Σ w·nll / n_tokens."""
    pir = sg(x.p.logp - x.c.logp)
    w = jnp.clip(pir, cfg.clip_min, cfg.clip_max)
    coef, n = _norm(t, cfg)
    weight, nll = t.weight, -x.p.logp
    return Result(_vec(jnp.sum(coef * w * nll)), _vec(n), {
        "tokens": jnp.sum(weight),
        "nll_sum": jnp.sum(weight * nll),
        "pir_sum": jnp.sum(weight * pir),
        "weight_sum": jnp.sum(weight * w),
        "clip_min_count": jnp.sum(weight * (pir <= cfg.clip_min)),
        "clip_max_count": jnp.sum(weight * (pir >= cfg.clip_max)),
    })


def nextquill(x: Passes, t: Targets, cfg) -> Result:
    """NextQuill (code-faithful default). Data-side effect DCE_t = p_h(y_t) − p_0(y_t) (gold-token probabilities,
    from the current parameters, or from frozen initial ones with ``fixed_theta_d``); ω_t = high if DCE_t > δ else
    low (stop_gradient). L_n = Σ ω·nll / Σ ω. Model-side alignment L_p = Σ CE(z_h − z_0, y) / n_tokens, gradient
    through BOTH passes (``weighted_lp``: Σ ω·CE / Σ ω, the paper's Eq. 7). loss = L_n + α·L_p."""
    src_p, src_c = (x.ref_p, x.ref_c) if cfg.get("fixed_theta_d", False) else (x.p, x.c)
    dce = sg(jnp.exp(src_p.logp) - jnp.exp(src_c.logp))
    weight, nll = t.weight, -x.p.logp
    omega = jnp.where(dce > cfg.delta, cfg.high, cfg.low) * weight
    diff = x.p.logits - x.c.logits  # [B, R, V]
    gold = jnp.take_along_axis(diff, t.ids[..., None], axis=-1)[..., 0]
    ce_diff = jax.nn.logsumexp(diff, axis=-1) - gold
    if cfg.get("weighted_lp", False):
        lp_sum, lp_norm = jnp.sum(omega * ce_diff), jnp.sum(omega)
    else:
        lp_sum, lp_norm = jnp.sum(weight * ce_diff), jnp.sum(weight)
    return Result(_vec(jnp.sum(omega * nll), cfg.alpha * lp_sum), _vec(jnp.sum(omega), lp_norm), {
        "tokens": jnp.sum(weight),
        "nll_sum": jnp.sum(weight * nll),
        "dce_sum": jnp.sum(weight * dce),
        "upweighted_count": jnp.sum(weight * (dce > cfg.delta)),
        "alignment_ce_sum": jnp.sum(weight * ce_diff),
    })


def lossce(x: Passes, t: Targets, cfg) -> Result:
    """LossCE (Rho-1-style selective LM; Lin et al. 2024). Excess loss e_t = nll_θ(t) − nll_ref(t) with a frozen
    reference model on the same personalized input; keep the top ``keep_frac`` (default 60%) tokens of the batch by
    e_t (stop_gradient), loss = Σ_selected nll / n_selected. Selection is within the (micro-)batch, as Rho-1 does;
    n_selected = ceil(keep_frac · n_tokens) is known from the data, so accumulation stays exact."""
    weight, nll = t.weight, -x.p.logp
    excess = sg(nll + x.ref_p.logp)
    flat_ex = jnp.where(weight > 0, excess, -jnp.inf).reshape(-1)
    n_tok = jnp.sum(weight)
    k = keep_count(cfg.keep_frac, n_tok)
    rank = jnp.argsort(jnp.argsort(-flat_ex)).reshape(weight.shape)  # 0 = largest excess loss
    selected = (rank < k) * weight
    return Result(_vec(jnp.sum(selected * nll)), _vec(jnp.sum(selected)), {
        "tokens": n_tok, "nll_sum": jnp.sum(weight * nll), "excess_sum": jnp.sum(weight * excess),
        "selected_count": jnp.sum(selected)})


def keep_count(frac: float, n: jax.Array) -> jax.Array:
    """ceil(frac · n) in exact integer arithmetic (``frac`` to 1e-4): float32 gives 0.6 · 25 = 15.0000006 → 16.
    n · q is split as (n // D)·q + (n % D)·q so nothing overflows int32."""
    D = 10_000
    q = round(frac * D)
    n = jnp.round(n).astype(jnp.int32)
    return ((n // D) * q + ((n % D) * q + D - 1) // D).astype(jnp.float32)


def entce(x: Passes, t: Targets, cfg) -> Result:
    """EntCE (entropy-based token weighting; Wang et al. 2025). w_t = H_t / mean(H) over the batch's response tokens
    (stop_gradient), H_t the personalized pass's predictive entropy at t, clipped at ``max_weight``: tokens where the
    model is uncertain (the "forking" tokens) weigh more, and the mean weight is 1, so the step size matches CE.
    loss = Σ w·nll / n_tokens."""
    weight, nll = t.weight, -x.p.logp
    ent = sg(x.p.entropy)
    n_tok = jnp.sum(weight)
    mean_h = jnp.sum(weight * ent) / jnp.maximum(n_tok, 1.0)
    w = jnp.minimum(ent / jnp.maximum(mean_h, 1e-6), cfg.max_weight)
    coef, n = _norm(t, cfg)
    return Result(_vec(jnp.sum(coef * w * nll)), _vec(n), {
        "tokens": n_tok, "nll_sum": jnp.sum(weight * nll), "entropy_sum": jnp.sum(weight * ent),
        "weight_sum": jnp.sum(weight * w)})


def default_config() -> ml_collections.ConfigDict:
    """Hyper-parameters of every objective (the ``objective`` block of a training config)."""
    return ml_collections.ConfigDict({
        "name": "perce",
        "vocab_chunk_size": 8192,
        "ce": {"per_sequence": False},
        "perce": {"clip_min": 0.8, "clip_max": 5.0, "per_sequence": False},
        "nextquill": {"delta": 0.05, "high": 0.9, "low": 0.1, "alpha": 0.1, "weighted_lp": False,
                      "fixed_theta_d": False},
        "lossce": {"keep_frac": 0.6},
        "entce": {"max_weight": 5.0, "per_sequence": False},
    })


def data_normalizer(name: str, cfg, t: Targets) -> jax.Array | None:
    """Normalizers known from the data alone (``t`` leaves may carry a leading micro-batch axis [k, b, R]), so
    gradient accumulation can divide every micro-batch by the global value in one pass. ``None`` when a term's
    normalizer depends on the parameters (NextQuill's Σω): the step then sums it in a forward-only pre-pass."""
    if name in ("ce", "perce", "entce"):
        return _vec(jnp.sum(t.seq_weight if cfg.get("per_sequence", False) else t.weight))
    if name == "lossce":
        per_mb = jnp.sum(t.weight, axis=(-2, -1)) if t.weight.ndim == 3 else jnp.sum(t.weight)
        return _vec(jnp.sum(keep_count(cfg.keep_frac, per_mb)))
    return None
