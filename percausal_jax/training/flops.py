"""The FLOP model of a train step (analytic, from the model config and the objective's requirements): what MFU
is measured against, in training logs, AOT plans and benchmarks alike."""

from __future__ import annotations

from percausal_jax.models.config import ModelConfig
from percausal_jax.objectives import Requirements


def forward_flops(mc: ModelConfig, batch: int, seq: int, response: int) -> float:
    """One forward pass: 2·(layer params)·tokens + causal attention scores (4·layers·heads·head_dim·S², computed
    densely) + the LM head at response positions only."""
    n_layer_params = mc.num_params() - mc.vocab_size * mc.hidden_size * (1 if mc.tie_word_embeddings else 2)
    attn = 4 * mc.num_hidden_layers * mc.num_attention_heads * mc.head_dim * seq * seq
    return batch * (2 * n_layer_params * seq + attn + 2 * mc.hidden_size * mc.vocab_size * response)


def step_flops(mc: ModelConfig, req: Requirements, batch: int, personal_len: int, counterfactual_len: int,
               response_len: int) -> float:
    """Model FLOPs of one optimizer step on a (padded) batch of these shapes: backward = 2× forward; the
    counterfactual pass forward-only unless differentiated; reference passes forward-only; rematerialization and
    NextQuill's Σω pre-pass not counted (they are overhead, not model FLOPs)."""
    fp = forward_flops(mc, batch, personal_len, response_len)
    fc = forward_flops(mc, batch, counterfactual_len, response_len)
    total = 3 * fp
    if req.counterfactual:
        total += 3 * fc if req.counterfactual_grad else fc
    return total + fp * ("p" in req.reference) + fc * ("c" in req.reference)
