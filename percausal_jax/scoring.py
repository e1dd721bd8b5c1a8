"""Per-token causal scores of gold responses: the two passes, PIR, PerCE weights, DCE, NextQuill weights, and each
example's CE / PerCE / NextQuill loss on its own.

Used by ``percausal score`` and by the demo's report. Everything is computed in one jitted function per batch shape;
full logits are formed only at response positions (NextQuill's alignment term needs the whole vocabulary there).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from percausal_jax.data.pairing import PairedExample, collate
from percausal_jax.objectives import losses
from percausal_jax.objectives.logprobs import PassOutputs
from percausal_jax.objectives.registry import Requirements, compute_passes

SCORE_OBJECTIVES = ("ce", "perce", "nextquill")
_ROUND = 16  # pad batch lengths up to a multiple of this: few distinct compiled shapes


def _round_up(n: int) -> int:
    return -(-n // _ROUND) * _ROUND


def make_score_fn(objective_cfg):
    """A jitted ``(model, batch) -> dict of per-token [B, R] and per-example [B] arrays`` for these settings."""
    cfgs = {name: objective_cfg[name] for name in SCORE_OBJECTIVES}
    pc, nq = cfgs["perce"], cfgs["nextquill"]
    req = Requirements(counterfactual=True, full_logits=True)

    def per_example(p_logp, c_logp, p_logits, c_logits, ids, weight, seq_weight):
        passes = losses.Passes(PassOutputs(p_logp[None], None, p_logits[None]),
                               PassOutputs(c_logp[None], None, c_logits[None]))
        t = losses.Targets(ids[None], weight[None], seq_weight[None])
        return {f"{name}_loss": losses.total_loss(getattr(losses, name)(passes, t, cfgs[name]))
                for name in SCORE_OBJECTIVES}

    @nnx.jit
    def score(model, batch):
        x = compute_passes(model, batch, req)
        r = batch["response"]
        pir = x.p.logp - x.c.logp
        dce = jnp.exp(x.p.logp) - jnp.exp(x.c.logp)
        out = {
            "logp_personal": x.p.logp,
            "logp_counterfactual": x.c.logp,
            "pir": pir,
            "perce_weight": jnp.clip(pir, pc.clip_min, pc.clip_max),
            "dce": dce,
            "nextquill_weight": jnp.where(dce > nq.delta, nq.high, nq.low),
        }
        out.update(jax.vmap(per_example)(x.p.logp, x.c.logp, x.p.logits, x.c.logits, r["ids"], r["weight"],
                                         r["seq_weight"]))
        return out

    return score


def score_examples(model, examples: Sequence[PairedExample], objective_cfg, batch_size: int = 4,
                   progress: Iterable | None = None) -> Iterator[dict]:
    """Yields one dict per example (same order) with per-token lists and per-example losses."""
    score = make_score_fn(objective_cfg)
    starts = range(0, len(examples), batch_size)
    for start in (progress(starts) if progress else starts):
        chunk = list(examples[start:start + batch_size])
        rows = [[ex] for ex in chunk] + [[chunk[-1]]] * (batch_size - len(chunk))  # fixed batch size
        batch = collate(rows, _round_up(max(e.personal_len for e in chunk)),
                        _round_up(max(e.counterfactual_len for e in chunk)),
                        _round_up(max(len(e.response_ids) for e in chunk)))
        out = jax.device_get(score(model, batch.as_dict()))
        for i, ex in enumerate(chunk):
            n = len(ex.response_ids)
            rec = {k: np.asarray(v[i][:n], np.float64).tolist() for k, v in out.items() if np.ndim(v) == 2}
            rec.update({k: float(v[i]) for k, v in out.items() if np.ndim(v) == 1})
            yield rec
