"""The analytic FLOP model: a row's attention term over its segments (packed rows) against hand-counted values,
and the dense default equal to one segment per row."""

import numpy as np

from percausal_jax.models.config import ModelConfig
from percausal_jax.training.flops import attended_sq, forward_flops

MC = ModelConfig(model_type="llama", vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=4)

def test_attended_sq_counts_each_segment_and_no_padding():
    seg = np.array([[1, 1, 1, 2, 2, 0],   # 3² + 2²
                    [5, 5, 5, 5, 5, 5],   # 6²
                    [1, 1, 2, 1, 0, 0]])  # segment 1 twice: 3 tokens of one example, 3² + 1²
    assert attended_sq(seg) == 9 + 4 + 36 + 9 + 1

def test_forward_flops_attention_term():
    dense = forward_flops(MC, 2, 6, 3)
    linear = forward_flops(MC, 2, 6, 3, attended_sq=0.0)
    per_sq = 4 * MC.num_hidden_layers * MC.num_attention_heads * MC.head_dim
    assert dense - linear == per_sq * 2 * 36  # two dense rows of 6
    packed = forward_flops(MC, 2, 6, 3, attended_sq=attended_sq(np.array([[1, 1, 1, 2, 2, 2], [1] * 6])))
    assert packed - linear == per_sq * (9 + 9 + 36)
    assert forward_flops(MC, 2, 6, 3, attended_sq=attended_sq(np.ones((2, 6), np.int32))) == dense
