"""The two-pass forward that feeds an objective, and the small model interface it needs.

:func:`compute_passes` runs exactly what an objective's :class:`~percausal_jax.objectives.losses.Requirements` ask:
the personalized pass with gradient, the counterfactual pass with or without gradient (stop_gradient cuts its
backward entirely), gold log-probs via the vocabulary-chunked head (never ``[B, R, V]``), the contrast of the two
passes' logits in the same chunked scan when asked (NextQuill), and passes under frozen reference parameters when the
objective compares against a reference.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax

from percausal_jax.data.pairing import PairedBatch, Sequences
from percausal_jax.objectives.logprobs import PassOutputs, chunked_outputs, chunked_pair_outputs, gather_rows
from percausal_jax.objectives.losses import Objective, Passes, Requirements, Result, Targets


class LanguageModel(Protocol):
    """What a pass needs of a model (:class:`~percausal_jax.models.decoder.CausalLM` implements it)."""

    @property
    def compute_dtype(self) -> Any: ...

    @property
    def logit_softcap(self) -> float | None: ...

    def hidden_states(self, input_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """int[B, L] ×3 → final-normed hidden states [B, L, D]."""

    def head_weight(self) -> jax.Array:
        """The LM head as [D, V]."""


def response_hidden(model: LanguageModel, seq: Sequences, index: jax.Array) -> jax.Array:
    """Hidden states of ``seq`` gathered at ``index`` int[B, R] (the rows predicting each response id) → [B, R, D]."""
    hidden = model.hidden_states(seq.tokens, seq.positions, seq.segment_ids)
    return gather_rows(hidden, index).astype(model.compute_dtype)


def pass_outputs(model: LanguageModel, seq: Sequences, index: jax.Array, ids: jax.Array, req: Requirements,
                 chunk_size: int) -> PassOutputs:
    """One pass: gold log-probs (entropy if asked) of ``ids`` at the rows ``index`` of ``seq``."""
    head = model.head_weight().astype(model.compute_dtype)
    return chunked_outputs(response_hidden(model, seq, index), head, ids, softcap=model.logit_softcap,
                           chunk_size=chunk_size, with_entropy=req.entropy)


def compute_passes(model: LanguageModel, batch: PairedBatch, req: Requirements, chunk_size: int = 8192,
                   ref_model: LanguageModel | None = None) -> Passes:
    r = batch.response
    contrast = c = None
    if req.contrast:  # both passes and log softmax(z_p − z_c) from one vocabulary-chunked scan
        h_p = response_hidden(model, batch.personal, r.index_personal)
        h_c = response_hidden(model, batch.counterfactual, r.index_counterfactual)
        if not req.counterfactual_grad:
            h_c = jax.lax.stop_gradient(h_c)
        head = model.head_weight().astype(model.compute_dtype)
        p, c, contrast = chunked_pair_outputs(h_p, h_c, head, r.ids, softcap=model.logit_softcap,
                                              chunk_size=chunk_size, with_entropy=req.entropy)
    else:
        p = pass_outputs(model, batch.personal, r.index_personal, r.ids, req, chunk_size)
        if req.counterfactual:
            c = pass_outputs(model, batch.counterfactual, r.index_counterfactual, r.ids, req, chunk_size)
    if c is not None and not req.counterfactual_grad:
        c = jax.lax.stop_gradient(c)
    ref_p = ref_c = None
    if req.reference:
        if ref_model is None:
            raise ValueError("this objective needs a frozen reference model")
        if "p" in req.reference:
            ref_p = jax.lax.stop_gradient(
                pass_outputs(ref_model, batch.personal, r.index_personal, r.ids, req, chunk_size))
        if "c" in req.reference:
            ref_c = jax.lax.stop_gradient(
                pass_outputs(ref_model, batch.counterfactual, r.index_counterfactual, r.ids, req, chunk_size))
    return Passes(p, c, ref_p, ref_c, contrast)


def evaluate(objective: Objective, model: LanguageModel, batch: PairedBatch, ref_model: LanguageModel | None = None,
             chunk_size: int = 8192) -> Result:
    """Runs the passes ``objective`` needs and returns its ``Result`` (loss_sum, normalizer, metrics)."""
    return evaluate_with_passes(objective, model, batch, ref_model, chunk_size)[0]


def evaluate_with_passes(objective: Objective, model: LanguageModel, batch: PairedBatch,
                         ref_model: LanguageModel | None = None, chunk_size: int = 8192) -> tuple[Result, Passes]:
    """:func:`evaluate` and the passes it ran (evaluation also reads the personalized pass's log-probs)."""
    passes = compute_passes(model, batch, objective.requirements, chunk_size, ref_model)
    return objective(passes, Targets.of(batch)), passes
