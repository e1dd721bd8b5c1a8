"""Objective registry and the two-pass forward that feeds it.

Each objective declares what it needs of the passes (:class:`Requirements`); :func:`compute_passes` runs exactly
that: the personalized pass with gradient, the counterfactual pass with or without gradient (stop_gradient cuts its
backward entirely), gold log-probs via the vocabulary-chunked head unless full logits are needed (NextQuill), and
passes under frozen reference parameters when the objective compares against a reference.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from percausal_jax.objectives import losses
from percausal_jax.objectives.logprobs import PassOutputs, chunked_outputs, gather_rows, outputs_from_logits


@dataclasses.dataclass(frozen=True)
class Requirements:
    counterfactual: bool = False  # run the counterfactual pass
    counterfactual_grad: bool = False  # differentiate through it
    full_logits: bool = False  # [B, R, V] at response positions (else chunked gold log-probs)
    entropy: bool = False
    reference: tuple[str, ...] = ()  # passes to run under frozen reference parameters: "p", "c"


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    fn: Callable[..., losses.Result]
    requirements: Callable[[object], Requirements]


OBJECTIVES: dict[str, Objective] = {
    o.name: o for o in [
        Objective("ce", losses.ce, lambda cfg: Requirements()),
        Objective("perce", losses.perce, lambda cfg: Requirements(counterfactual=True)),
        Objective("nextquill", losses.nextquill, lambda cfg: Requirements(
            counterfactual=True, counterfactual_grad=True, full_logits=True,
            reference=("p", "c") if cfg.get("fixed_theta_d", False) else ())),
        Objective("lossce", losses.lossce, lambda cfg: Requirements(reference=("p",))),
        Objective("entce", losses.entce, lambda cfg: Requirements(entropy=True)),
    ]
}


def get(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r} (choose from {', '.join(OBJECTIVES)})")
    return OBJECTIVES[name]


def pass_outputs(model, seq, index, ids, req: Requirements, chunk_size: int) -> PassOutputs:
    """One pass: hidden states of ``seq`` (tokens/positions/segment_ids), gathered at ``index`` [B, R]."""
    hidden = model.hidden_states(seq["tokens"], seq["positions"], seq["segment_ids"])
    h = gather_rows(hidden, index)
    if req.full_logits:
        return outputs_from_logits(model.logits(h), ids, with_entropy=req.entropy)
    return chunked_outputs(h.astype(model.model.dtype), model.head_weight().astype(model.model.dtype), ids,
                           softcap=model.config.final_logit_softcap, chunk_size=chunk_size, with_entropy=req.entropy)


def compute_passes(model, batch: dict, req: Requirements, chunk_size: int = 8192, ref_model=None) -> losses.Passes:
    """``batch`` is a :class:`~percausal_jax.data.pairing.PairedBatch` as a dict of arrays."""
    r = batch["response"]
    p = pass_outputs(model, batch["personal"], r["index_personal"], r["ids"], req, chunk_size)
    c = None
    if req.counterfactual:
        c = pass_outputs(model, batch["counterfactual"], r["index_counterfactual"], r["ids"], req, chunk_size)
        if not req.counterfactual_grad:
            c = jax.lax.stop_gradient(c)
    ref_p = ref_c = None
    if req.reference:
        if ref_model is None:
            raise ValueError("this objective needs a frozen reference model")
        if "p" in req.reference:
            ref_p = jax.lax.stop_gradient(
                pass_outputs(ref_model, batch["personal"], r["index_personal"], r["ids"], req, chunk_size))
        if "c" in req.reference:
            ref_c = jax.lax.stop_gradient(pass_outputs(
                ref_model, batch["counterfactual"], r["index_counterfactual"], r["ids"], req, chunk_size))
    return losses.Passes(p, c, ref_p, ref_c)


def evaluate(name: str, model, batch: dict, cfg, ref_model=None, chunk_size: int = 8192) -> losses.Result:
    """Runs the passes ``name`` needs and returns its ``Result`` (loss_sum, normalizer, metrics)."""
    obj = get(name)
    passes = compute_passes(model, batch, obj.requirements(cfg), chunk_size, ref_model)
    r = batch["response"]
    return obj.fn(passes, losses.Targets(r["ids"], r["weight"], r["seq_weight"]), cfg)
