"""Per-token causal scores of gold responses: both passes' log-probs, every scorable objective's per-token
diagnostics (PerCE's PIR and weight, NextQuill's DCE and weight, EntCE's entropy and weight), and each example's
loss under each objective on its own.

Used by ``percausal score`` and by the demo's report. The objectives scored are the registry's (those that need no
frozen reference model), each with its own ``diagnostics``: nothing here re-derives a weight formula. Everything is
computed in one jitted function per batch shape, per example (a row's diagnostics never depend on the other rows).

With ``contrast=(β, α)`` each token also gets ``argmax_personal`` / ``argmax_contrast``: the token greedy decoding
would pick at that step (teacher-forced on the gold prefix) from ``z_h`` and from the profile-contrasted logits
(:func:`percausal_jax.evaluation.contrast.contrast_argmax`): where they differ, contrastive decoding changes the
choice.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from percausal_jax.data.pairing import PairedExample, collate_examples
from percausal_jax.evaluation.contrast import contrast_argmax
from percausal_jax.objectives import OBJECTIVES, Objective, Passes, Requirements, Targets, compute_passes, total_loss
from percausal_jax.objectives.passes import response_hidden

_ROUND = 16  # pad batch lengths up to a multiple of this: few distinct compiled shapes


def scorable(objectives: Iterable[Objective] | None = None) -> tuple[Objective, ...]:
    """The objectives to score: those given, or every registered one at its defaults, minus any that needs a frozen
    reference model (there is none when scoring a model)."""
    objectives = [cls() for cls in OBJECTIVES.values()] if objectives is None else list(objectives)
    return tuple(o for o in objectives if not o.requirements.reference)


CONTRAST_KEYS = ("argmax_personal", "argmax_contrast")  # per-token int ids, with ``contrast`` given


def output_keys(objectives: Sequence[Objective], contrast: tuple[float, float] | None = None) -> tuple[str, ...]:
    """Per-token keys (both passes, then each objective's diagnostics in its own order, then the contrastive
    argmaxes when ``contrast`` is given), then per-example losses."""
    from percausal_jax.objectives.logprobs import PassOutputs

    one = np.zeros((1, 1), np.float32)
    x = Passes(*[PassOutputs(one, one)] * 2, contrast=one)
    t = Targets(np.zeros((1, 1), np.int32), one + 1, one + 1)
    keys = ["logp_personal", "logp_counterfactual"]
    for o in objectives:
        keys += [k for k in o.diagnostics(x, t) if k not in keys]
    keys += list(CONTRAST_KEYS) if contrast is not None else []
    return tuple(keys + [f"{o.name}_loss" for o in objectives])


def make_score_fn(objectives: Sequence[Objective], contrast: tuple[float, float] | None = None):
    """A jitted ``(model, batch) -> dict of per-token [B, R] and per-example [B] arrays``; ``contrast`` = (β, α)
    adds the argmaxes of ``CONTRAST_KEYS``."""
    req = Requirements(counterfactual=True)
    for o in objectives:
        req = req.union(o.requirements)

    def per_example(x: Passes, t: Targets) -> dict:
        x, t = jax.tree.map(lambda a: a[None], (x, t))  # one example as a batch of one
        out = {}
        for o in objectives:
            out.update({k: v[0] for k, v in o.diagnostics(x, t).items()})
        out.update({f"{o.name}_loss": total_loss(o(x, t)) for o in objectives})
        return out

    @nnx.jit
    def score(model, batch):
        x = compute_passes(model, batch, req)
        out = {"logp_personal": x.p.logp, "logp_counterfactual": x.c.logp}
        out.update(jax.vmap(per_example)(x, Targets.of(batch)))
        if contrast is not None:
            r = batch.response
            h_h = response_hidden(model, batch.personal, r.index_personal)  # [B, R, D]
            h_0 = response_hidden(model, batch.counterfactual, r.index_counterfactual)
            out.update(zip(CONTRAST_KEYS, contrast_argmax(model, h_h, h_0, *contrast)))
        return out

    return score


def score_examples(model, examples: Sequence[PairedExample], objectives: Sequence[Objective], batch_size: int = 4,
                   progress: Iterable | None = None, contrast: tuple[float, float] | None = None) -> Iterator[dict]:
    """Yields one dict per example (same order) with per-token lists (int ids for ``CONTRAST_KEYS``) and per-example
    losses."""
    score = make_score_fn(objectives, contrast)
    starts = range(0, len(examples), batch_size)
    for start in (progress(starts) if progress else starts):
        chunk = list(examples[start:start + batch_size])
        # fixed batch size; each row is scored on its own, so the spare rows repeat a real example (never read)
        batch = collate_examples(chunk, batch_size, _ROUND, fill=chunk[-1])
        out = jax.device_get(score(model, batch))
        for i, ex in enumerate(chunk):
            n = len(ex.response_ids)
            rec = {k: np.asarray(v[i][:n], np.int64 if k in CONTRAST_KEYS else np.float64).tolist()
                   for k, v in out.items() if np.ndim(v) == 2}
            rec.update({k: float(v[i]) for k, v in out.items() if np.ndim(v) == 1})
            yield rec
