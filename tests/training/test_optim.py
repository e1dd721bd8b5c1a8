"""The optimizer chain: weight decay by parameter role, identical for the scanned and the looped layer layout."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from percausal_jax.models import CausalLM, ModelConfig
from percausal_jax.models.lora import apply_lora
from percausal_jax.training.optim import decay_mask

CFG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_bias=True)


def _roles(scan: bool, lora: bool = False) -> dict[str, bool]:
    """``{parameter name without layer index: decayed}`` (asserting every layer agrees)."""
    model = CausalLM(CFG, scan_layers=scan, rngs=nnx.Rngs(0))
    if lora:
        apply_lora(model, 2, 4.0, ("q_proj", "down_proj"))
    params = nnx.state(model, nnx.LoRAParam if lora else nnx.Param)
    out: dict[str, bool] = {}
    for path, decayed in jax.tree_util.tree_leaves_with_path(decay_mask(params)):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        name = "/".join(k for k in keys if not k.isdigit() and k != "value")
        assert out.setdefault(name, decayed) == decayed, name
    return out


def test_decay_by_role_in_both_layouts():
    loop, scan = _roles(False), _roles(True)
    assert loop == scan  # the layer layout changes shapes, never which parameters decay
    no_decay = {n for n, d in loop.items() if not d}  # HF Trainer: everything but biases and norm scales
    assert {"model/norm/weight", "model/layers/input_layernorm/weight", "model/layers/post_attention_layernorm/weight",
            "model/layers/self_attn/q_proj/bias", "model/layers/self_attn/v_proj/bias"} <= no_decay
    assert all(n.endswith("/bias") or "norm" in n for n in no_decay)
    assert loop["model/embed_tokens/embedding"] and loop["lm_head/kernel"]  # the scanned layout skipped these
    assert loop["model/layers/self_attn/q_proj/kernel"] and not loop["model/layers/self_attn/q_proj/bias"]
    assert _roles(False, lora=True) == _roles(True, lora=True) and all(_roles(True, lora=True).values())


@pytest.mark.parametrize("scan", [False, True])
def test_adamw_decays_exactly_the_masked_parameters(scan):
    """One AdamW step with zero gradients moves decayed parameters by -lr·wd·p and leaves the others."""
    model = CausalLM(CFG, scan_layers=scan, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    params = jax.tree.map(lambda x: x + 1.0, params)  # norm scales start at 1 and biases at 0: make all non-zero
    tx = optax.adamw(0.1, weight_decay=0.5, mask=decay_mask)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    for (path, u), (_, p), (_, m) in zip(jax.tree_util.tree_leaves_with_path(updates),
                                         jax.tree_util.tree_leaves_with_path(params),
                                         jax.tree_util.tree_leaves_with_path(decay_mask(params))):
        np.testing.assert_allclose(np.asarray(u), -0.05 * np.asarray(p) if m else 0.0, rtol=1e-6, err_msg=str(path))
