"""The FLOP model of a train step (analytic, from the model config and the objective's requirements): what MFU
is measured against, in training logs, AOT plans and benchmarks alike."""

from __future__ import annotations

import numpy as np

from percausal_jax.models.config import ModelConfig
from percausal_jax.objectives import Requirements


def forward_flops(mc: ModelConfig, batch: int, seq: int, response: int, *,
                  attended_sq: float | None = None) -> float:
    """One forward pass: 2·(layer params)·tokens + causal attention scores (4·layers·heads·head_dim·S², over each
    row: ``batch·seq²``; or ``attended_sq`` = Σ S² over the rows' segments, see :func:`attended_sq`) + the LM head at
    response positions only."""
    n_layer_params = mc.num_params() - mc.vocab_size * mc.hidden_size * (1 if mc.tie_word_embeddings else 2)
    sq = batch * seq * seq if attended_sq is None else attended_sq
    attn = 4 * mc.num_hidden_layers * mc.num_attention_heads * mc.head_dim * sq
    return batch * (2 * n_layer_params * seq + 2 * mc.hidden_size * mc.vocab_size * response) + attn


def attended_sq(segment_ids) -> float:
    """Σ over rows and their non-zero segments of (segment length)²: the attention term of a packed row, whose
    examples do not attend to each other (the blocked kernel skips those tiles, splash its blocks)."""
    seg = np.asarray(segment_ids)
    return float(sum(np.sum(np.bincount(row[row > 0]).astype(np.float64) ** 2) for row in seg))


def step_flops(mc: ModelConfig, req: Requirements, batch: int, personal_len: int, counterfactual_len: int,
               response_len: int, *, attended_sq: tuple[float, float] | None = None) -> float:
    """Model FLOPs of one optimizer step on a (padded) batch of these shapes: backward = 2× forward; the
    counterfactual pass forward-only unless differentiated; reference passes forward-only; rematerialization and
    NextQuill's Σω pre-pass not counted (they are overhead, not model FLOPs). ``attended_sq``: the personalized and
    counterfactual arrays' :func:`attended_sq` (packed rows), else each row attends densely."""
    sq_p, sq_c = attended_sq or (None, None)
    fp = forward_flops(mc, batch, personal_len, response_len, attended_sq=sq_p)
    fc = forward_flops(mc, batch, counterfactual_len, response_len, attended_sq=sq_c)
    total = 3 * fp
    if req.counterfactual:
        total += 3 * fc if req.counterfactual_grad else fc
    return total + fp * ("p" in req.reference) + fc * ("c" in req.reference)
