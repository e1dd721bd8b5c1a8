"""Token-level objectives as values: one frozen dataclass per method, its hyper-parameters typed fields.

Each objective owns, in one place, everything the rest of the library needs to know about it:

- ``requirements``: which passes to run (counterfactual with or without gradient, their logits' contrast, entropy,
  passes under frozen reference parameters);
- ``__call__(passes, targets) -> Result(loss_sum, normalizer, metrics)``, where ``loss_sum`` and ``normalizer`` are
  float32 vectors of the same length T (one entry per loss term, coefficients folded into ``loss_sum``) and

      loss = Σ_t loss_sum[t] / normalizer[t];

  gradient accumulation and multi-device reduction sum numerators and denominators over the global batch and
  divide once; ``metrics`` are sums over response tokens (``tokens`` among them), divided by ``tokens`` when logged;
- ``data_normalizer(targets)``: the normalizer when it is known from the data alone (else ``None``);
- ``diagnostics(passes, targets)``: its per-token quantities ``[B, R]`` (PIR and weights, DCE, ...), which
  ``percausal score`` prints.

Inputs (all at response positions, shapes ``[B, R]``), bundled in :class:`Passes` and :class:`Targets`:
- ``p``: personalized pass (profile + query → response), with gradient.
- ``c``: counterfactual pass (query only → the same response ids).
- ``ref_p`` / ``ref_c``: the same passes under frozen reference parameters (LossCE; NextQuill "fixed θ_D").
- ``contrast``: ``log softmax(z_p − z_c)`` at the gold token, the contrast of the two passes' logits (NextQuill's
  alignment term), computed in the same vocabulary-chunked scan as the two passes (no ``[B, R, V]``).
- ``ids``: gold response ids; ``weight``: 1.0 on response tokens, 0.0 on padding;
  ``seq_weight = weight / tokens-in-its-sequence`` (per-sequence normalization).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from percausal_jax.objectives.logprobs import PassOutputs
from percausal_jax.schema import NONNEGATIVE, POSITIVE, UNIT, Bound, key

sg = jax.lax.stop_gradient


class Passes(NamedTuple):
    p: PassOutputs
    c: PassOutputs | None = None
    ref_p: PassOutputs | None = None
    ref_c: PassOutputs | None = None
    contrast: jax.Array | None = None  # f32[B, R]


class Targets(NamedTuple):
    """The gold response of a batch (leaves may carry a leading micro-batch axis ``[k, b, R]``)."""

    ids: jax.Array  # int32[B, R]
    weight: jax.Array  # f32[B, R]
    seq_weight: jax.Array  # f32[B, R]
    segment_ids: jax.Array | None = None  # int32[B, R], packed segment of each slot (None: one sequence per row)

    @classmethod
    def of(cls, batch) -> Targets:
        """The one place targets are taken from a :class:`~percausal_jax.data.pairing.PairedBatch`."""
        r = batch.response
        return cls(r.ids, r.weight, r.seq_weight, r.segment_ids)

    def sequence_total(self, values: jax.Array) -> jax.Array:
        """f32[B, R] → f32[B, R]: at each slot, the sum of ``values`` over the slots of its own sequence."""
        seg = (self.weight > 0).astype(jnp.int32) if self.segment_ids is None else self.segment_ids
        B, R = seg.shape
        ids = (jnp.arange(B, dtype=jnp.int32)[:, None] * (R + 1) + seg).reshape(-1)
        sums = jax.ops.segment_sum(values.reshape(-1), ids, num_segments=B * (R + 1))
        return sums[ids].reshape(B, R)


class Result(NamedTuple):
    loss_sum: jax.Array  # f32[T]
    normalizer: jax.Array  # f32[T]
    metrics: dict[str, jax.Array]  # scalar sums


@dataclasses.dataclass(frozen=True, kw_only=True)
class Requirements:
    """What an objective needs of the passes (:func:`~percausal_jax.objectives.passes.compute_passes` runs exactly
    that)."""

    counterfactual: bool = False  # run the counterfactual pass
    counterfactual_grad: bool = False  # differentiate through it
    contrast: bool = False  # log softmax(z_p − z_c) at the gold token (needs the counterfactual pass)
    entropy: bool = False
    reference: tuple[str, ...] = ()  # passes to run under frozen reference parameters: "p", "c"

    def __post_init__(self):
        if (self.contrast or self.counterfactual_grad) and not self.counterfactual:
            raise ValueError("contrast and counterfactual_grad need the counterfactual pass (counterfactual=True)")

    def union(self, other: Requirements) -> Requirements:
        return Requirements(counterfactual=self.counterfactual or other.counterfactual,
                            counterfactual_grad=self.counterfactual_grad or other.counterfactual_grad,
                            contrast=self.contrast or other.contrast, entropy=self.entropy or other.entropy,
                            reference=tuple(sorted(set(self.reference) | set(other.reference))))


NORMALIZER_EPS = 1e-12  # a normalizer of 0 (no tokens, or Σω = 0) divides an all-zero loss_sum: 0, not NaN


def normalized_loss(loss_sum: jax.Array, normalizer: jax.Array) -> jax.Array:
    """loss = Σ_t loss_sum[t] / normalizer[t]: the one division every caller of :class:`Result` makes (after
    summing numerators and denominators over micro-batches and devices), guarded by :data:`NORMALIZER_EPS`."""
    return jnp.sum(loss_sum / jnp.maximum(normalizer, NORMALIZER_EPS))


def total_loss(r: Result) -> jax.Array:
    return normalized_loss(r.loss_sum, r.normalizer)


def _vec(*xs) -> jax.Array:
    return jnp.stack([jnp.asarray(x, jnp.float32) for x in xs])


@dataclasses.dataclass(frozen=True, kw_only=True)
class Objective:
    """Base of the five methods. Subclasses set ``name`` and define :meth:`__call__`. Hyper-parameters are
    declared with :func:`~percausal_jax.schema.key` (default, help, bound: the config reads and checks them from
    there); ``ordered`` names pairs of them that must satisfy low ≤ high."""

    name: ClassVar[str]
    ordered: ClassVar[tuple[tuple[str, str], ...]] = ()

    @property
    def requirements(self) -> Requirements:
        return Requirements()

    def __call__(self, x: Passes, t: Targets) -> Result:
        raise NotImplementedError

    def data_normalizer(self, t: Targets) -> jax.Array | None:
        """Normalizers known from the data alone, so gradient accumulation can divide every micro-batch by the
        global value in one pass; ``None`` when a term's normalizer depends on the parameters."""
        return None

    @property
    def shared_normalizer(self) -> bool:
        """True when every term divides by one and the same (parameter-dependent, stop-gradient) number: then
        accumulation sums unnormalized gradients and divides once at the end, with no pre-pass."""
        return False

    @property
    def normalizer_requirements(self) -> Requirements:
        """The passes :meth:`normalizer` needs (a forward-only pre-pass computes exactly these)."""
        return self.requirements

    def normalizer(self, x: Passes, t: Targets) -> jax.Array:
        """The normalizers of :meth:`__call__` from the passes :attr:`normalizer_requirements` asks for."""
        return self(x, t).normalizer

    def diagnostics(self, x: Passes, t: Targets) -> dict[str, jax.Array]:
        """Per-token quantities ``[B, R]`` of this method (for ``percausal score``)."""
        return {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class _TokenNormalized(Objective):
    """Objectives normalized per response token, or per sequence (each sequence counts 1) with ``per_sequence``."""

    per_sequence: bool = key(False, "normalize per sequence (each sequence counts 1), not per response token")

    def _coef(self, t: Targets) -> jax.Array:
        return t.seq_weight if self.per_sequence else t.weight

    def data_normalizer(self, t: Targets) -> jax.Array:
        return _vec(jnp.sum(self._coef(t)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CE(_TokenNormalized):
    """Plain token CE on the personalized pass: Σ nll / n_tokens."""

    name: ClassVar[str] = "ce"

    def __call__(self, x: Passes, t: Targets) -> Result:
        coef, nll = self._coef(t), -x.p.logp
        return Result(_vec(jnp.sum(coef * nll)), _vec(jnp.sum(coef)),
                      {"tokens": jnp.sum(t.weight), "nll_sum": jnp.sum(t.weight * nll)})


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerCE(_TokenNormalized):
    """PerCE (Zhang et al. 2026): PIR_t = log p(y_t | profile, x, y<t) − log p(y_t | x, y<t), both from the current
    parameters (bootstrap), w_t = clip(PIR_t, m, M) under stop_gradient; loss = Σ w·nll / n_tokens."""

    name: ClassVar[str] = "perce"
    ordered: ClassVar[tuple[tuple[str, str], ...]] = (("clip_min", "clip_max"),)
    clip_min: float = key(0.8, "m: PIR weights are clipped to [clip_min, clip_max]", bound=NONNEGATIVE)
    clip_max: float = key(5.0, "M: upper clip of the PIR weights", bound=POSITIVE)

    @property
    def requirements(self) -> Requirements:
        return Requirements(counterfactual=True)

    def diagnostics(self, x: Passes, t: Targets) -> dict[str, jax.Array]:
        pir = sg(x.p.logp - x.c.logp)
        return {"pir": pir, "perce_weight": jnp.clip(pir, self.clip_min, self.clip_max)}

    def __call__(self, x: Passes, t: Targets) -> Result:
        d = self.diagnostics(x, t)
        pir, w = d["pir"], d["perce_weight"]
        weight, coef, nll = t.weight, self._coef(t), -x.p.logp
        return Result(_vec(jnp.sum(coef * w * nll)), _vec(jnp.sum(coef)), {
            "tokens": jnp.sum(weight),
            "nll_sum": jnp.sum(weight * nll),
            "pir_sum": jnp.sum(weight * pir),
            "weight_sum": jnp.sum(weight * w),
            "clip_min_count": jnp.sum(weight * (pir <= self.clip_min)),
            "clip_max_count": jnp.sum(weight * (pir >= self.clip_max)),
        })


@dataclasses.dataclass(frozen=True, kw_only=True)
class NextQuill(Objective):
    """NextQuill (code-faithful default). Data-side effect DCE_t = p_h(y_t) − p_0(y_t) (gold-token probabilities,
    from the current parameters, or from frozen initial ones with ``fixed_theta_d``); ω_t = high if DCE_t > δ else
    low (stop_gradient). L_n = Σ ω·nll / Σ ω. Model-side alignment L_p = Σ CE(z_h − z_0, y) / n_tokens, gradient
    through BOTH passes (``weighted_lp``: Σ ω·CE / Σ ω, the paper's Eq. 7). loss = L_n + α·L_p.

    ``per_sequence`` (the reference's semantics: batch 1 per device, ``compute_loss`` normalizes each sequence by
    its own Σω and its own token count): loss = mean over sequences of (L_n,s + α·L_p,s). Both terms are then
    normalized by the number of sequences, known from the data, so accumulation needs no Σω pre-pass. Default
    (pooled): Σω over the whole global batch, so long sequences weigh more; with ``weighted_lp`` both terms divide
    by that one Σω (accumulated unnormalized, divided once), else gradient accumulation runs a forward-only pre-pass
    of gold-token probabilities for Σω (:attr:`normalizer_requirements`).

    The alignment term never materializes ``[B, R, V]``: ``Passes.contrast`` comes from the vocabulary-chunked scan
    that computes both passes' log-probs (:func:`~percausal_jax.objectives.logprobs.chunked_pair_outputs`)."""

    name: ClassVar[str] = "nextquill"
    ordered: ClassVar[tuple[tuple[str, str], ...]] = (("low", "high"),)
    delta: float = key(0.05, "δ: tokens with DCE > delta get weight high, the others low", bound=NONNEGATIVE)
    high: float = key(0.9, "ω of tokens with DCE > delta", bound=UNIT)
    low: float = key(0.1, "ω of the other tokens", bound=UNIT)
    alpha: float = key(0.1, "α: weight of the model-side alignment term L_p", bound=NONNEGATIVE)
    weighted_lp: bool = key(False, "L_p weighted by ω and divided by Σω (the paper's Eq. 7), not per token")
    fixed_theta_d: bool = key(False, "DCE from frozen parameters θ_D (reference_model, or the initial ones)")
    per_sequence: bool = key(False, "each sequence normalized by its own Σω and token count (the reference's)")
    reference_model: str = key("", "θ_D of fixed_theta_d: a model that has seen the data (path / hub id); "
                                   "\"\" = the initial model")

    def __post_init__(self):
        if self.reference_model and not self.fixed_theta_d:
            raise ValueError("nextquill.reference_model is θ_D of fixed_theta_d=True; set both or neither")

    @property
    def requirements(self) -> Requirements:
        return Requirements(counterfactual=True, counterfactual_grad=True, contrast=True,
                            reference=("p", "c") if self.fixed_theta_d else ())

    def data_normalizer(self, t: Targets) -> jax.Array | None:
        """Per sequence: both terms divide by the number of sequences. Pooled: Σω depends on the parameters."""
        return _vec(jnp.sum(t.seq_weight), jnp.sum(t.seq_weight)) if self.per_sequence else None

    @property
    def shared_normalizer(self) -> bool:
        """Pooled with ``weighted_lp``: loss = (Σω·nll + α·Σω·CE) / Σω, one normalizer for both terms."""
        return self.weighted_lp and not self.per_sequence

    @property
    def normalizer_requirements(self) -> Requirements:
        """Σω needs only the gold-token probabilities of both passes: no gradient, no contrast."""
        return Requirements(counterfactual=True, reference=self.requirements.reference)

    def normalizer(self, x: Passes, t: Targets) -> jax.Array:
        omega = self.diagnostics(x, t)["nextquill_weight"] * t.weight
        return self._normalizers(omega, t)

    def _normalizers(self, omega: jax.Array, t: Targets) -> jax.Array:
        """(N_n, N_p): #sequences twice (per sequence), Σω twice (weighted_lp), else Σω and the token count."""
        if self.per_sequence:
            return self.data_normalizer(t)
        return _vec(jnp.sum(omega), jnp.sum(omega) if self.weighted_lp else jnp.sum(t.weight))

    def diagnostics(self, x: Passes, t: Targets) -> dict[str, jax.Array]:
        src_p, src_c = (x.ref_p, x.ref_c) if self.fixed_theta_d else (x.p, x.c)
        dce = sg(jnp.exp(src_p.logp) - jnp.exp(src_c.logp))
        return {"dce": dce, "nextquill_weight": jnp.where(dce > self.delta, self.high, self.low)}

    def __call__(self, x: Passes, t: Targets) -> Result:
        d = self.diagnostics(x, t)
        dce = d["dce"]
        weight, nll = t.weight, -x.p.logp
        omega = d["nextquill_weight"] * weight
        ce_diff = -x.contrast  # CE(z_h − z_0, y)
        if self.per_sequence:  # each sequence: its own Σω and token count; the batch averages sequences
            n_coef = omega / jnp.maximum(t.sequence_total(omega), NORMALIZER_EPS)
            p_coef = n_coef if self.weighted_lp else t.seq_weight
        else:
            n_coef, p_coef = omega, omega if self.weighted_lp else weight
        return Result(_vec(jnp.sum(n_coef * nll), self.alpha * jnp.sum(p_coef * ce_diff)),
                      self._normalizers(omega, t), {
            "tokens": jnp.sum(weight),
            "nll_sum": jnp.sum(weight * nll),
            "dce_sum": jnp.sum(weight * dce),
            "upweighted_count": jnp.sum(weight * (dce > self.delta)),
            "alignment_ce_sum": jnp.sum(weight * ce_diff),
        })


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossCE(Objective):
    """LossCE (Rho-1-style selective LM; Lin et al. 2024). Excess loss e_t = nll_θ(t) − nll_ref(t) with a frozen
    reference model on the same personalized input; keep the top ``keep_frac`` (default 60%) tokens of the batch by
    e_t (stop_gradient), loss = Σ_selected nll / n_selected. Selection is within the (micro-)batch, as Rho-1 does;
    n_selected = ceil(keep_frac · n_tokens) is known from the data, so accumulation stays exact.

    ``reference_model``: Rho-1's reference is a separately trained model (path / hub id); "" = the initial model,
    whose excess loss is exactly 0 everywhere at step 0. Ties in excess loss (all of them, then) are broken by a
    pseudo-random permutation of the slots seeded by the batch's own token ids, never by position."""

    name: ClassVar[str] = "lossce"
    keep_frac: float = key(0.6, "fraction of the batch's tokens kept, by excess loss",
                           bound=Bound(0, 1, low_open=True))
    reference_model: str = key("", "the reference model (path / hub id); \"\" = the initial model")

    @property
    def requirements(self) -> Requirements:
        return Requirements(reference=("p",))

    def diagnostics(self, x: Passes, t: Targets) -> dict[str, jax.Array]:
        excess = sg(-x.p.logp + x.ref_p.logp)
        flat_ex = jnp.where(t.weight > 0, excess, -jnp.inf).reshape(-1)
        k = keep_count(self.keep_frac, jnp.sum(t.weight))
        ids = t.ids.reshape(-1).astype(jnp.uint32)
        key = jax.random.fold_in(jax.random.key(0), jnp.sum(ids * (jnp.arange(ids.size, dtype=jnp.uint32) | 1)))
        tie_break = jax.random.uniform(key, flat_ex.shape)
        order = jnp.lexsort((tie_break, -flat_ex))  # by excess loss (descending), ties in a data-seeded order
        rank = jnp.argsort(order).reshape(t.weight.shape)  # 0 = largest excess loss
        return {"excess": excess, "lossce_selected": (rank < k) * t.weight}

    def __call__(self, x: Passes, t: Targets) -> Result:
        d = self.diagnostics(x, t)
        weight, nll, selected = t.weight, -x.p.logp, d["lossce_selected"]
        return Result(_vec(jnp.sum(selected * nll)), _vec(jnp.sum(selected)), {
            "tokens": jnp.sum(weight), "nll_sum": jnp.sum(weight * nll), "excess_sum": jnp.sum(weight * d["excess"]),
            "selected_count": jnp.sum(selected)})

    def data_normalizer(self, t: Targets) -> jax.Array:
        per_mb = jnp.sum(t.weight, axis=(-2, -1)) if t.weight.ndim == 3 else jnp.sum(t.weight)
        return _vec(jnp.sum(keep_count(self.keep_frac, per_mb)))


def keep_count(frac: float, n: jax.Array) -> jax.Array:
    """ceil(frac · n) in exact integer arithmetic (``frac`` to 1e-4): float32 gives 0.6 · 25 = 15.0000006 → 16.
    n · q is split as (n // D)·q + (n % D)·q so nothing overflows int32."""
    D = 10_000
    q = round(frac * D)
    n = jnp.round(n).astype(jnp.int32)
    return ((n // D) * q + ((n % D) * q + D - 1) // D).astype(jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EntCE(_TokenNormalized):
    """EntCE (entropy-based token weighting; Wang et al. 2025). w_t = H_t / mean(H) over the batch's response tokens
    (stop_gradient), H_t the personalized pass's predictive entropy at t, clipped at ``max_weight``: tokens where the
    model is uncertain (the "forking" tokens) weigh more, and the mean weight is 1, so the step size matches CE.
    loss = Σ w·nll / n_tokens."""

    name: ClassVar[str] = "entce"
    max_weight: float = key(5.0, "upper clip of the entropy weights H_t / mean(H)", bound=POSITIVE)

    @property
    def requirements(self) -> Requirements:
        return Requirements(entropy=True)

    def diagnostics(self, x: Passes, t: Targets) -> dict[str, jax.Array]:
        ent = sg(x.p.entropy)
        mean_h = jnp.sum(t.weight * ent) / jnp.maximum(jnp.sum(t.weight), 1.0)
        return {"entropy": ent, "entce_weight": jnp.minimum(ent / jnp.maximum(mean_h, 1e-6), self.max_weight)}

    def __call__(self, x: Passes, t: Targets) -> Result:
        d = self.diagnostics(x, t)
        ent, w = d["entropy"], d["entce_weight"]
        weight, coef, nll = t.weight, self._coef(t), -x.p.logp
        return Result(_vec(jnp.sum(coef * w * nll)), _vec(jnp.sum(coef)), {
            "tokens": jnp.sum(weight), "nll_sum": jnp.sum(weight * nll), "entropy_sum": jnp.sum(weight * ent),
            "weight_sum": jnp.sum(weight * w)})
