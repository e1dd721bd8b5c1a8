"""Linear biases as transformers builds them: Llama's ``attention_bias`` (q, k, v *and* o_proj) and ``mlp_bias``
(gate, up, down), Qwen3's ``attention_bias`` (also o_proj), Qwen2's q/k/v-only bias (never o_proj).

Every bias is perturbed well away from zero, and each test that checks parity also checks that dropping that
bias breaks it, so a bias that is loaded but not applied (or applied to the wrong projection) fails.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import percausal_jax as pj
from percausal_jax.errors import UserError
from percausal_jax.hf.checkpoint import hf_state_dict
from percausal_jax.models.config import ModelConfig
from percausal_jax.models.lora import apply_lora, merge_lora
from percausal_jax.models.partitioning import logical_axes, make_mesh, param_sharding
from tests.helpers import tiny_hf_model, torch_logits

SMALL = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
CASES = {
    "attn": ({"attention_bias": True}, ATTN),
    "mlp": ({"mlp_bias": True}, MLP),
    "both": ({"attention_bias": True, "mlp_bias": True}, ATTN + MLP),
}
IDS = np.random.RandomState(1).randint(0, 256, (2, 12))


def _biased_model(model_type, d, **overrides):
    """A tiny random HF model whose biases are large (σ 0.5 on top of helpers' perturbation), saved to ``d``."""
    import torch

    model = tiny_hf_model(model_type, None, **{**SMALL, **overrides})
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(str(d))
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    name = request.param
    overrides, biased = CASES[name]
    d = tmp_path_factory.mktemp(f"llama_{name}")
    model = _biased_model("llama", d, **overrides)
    return name, d, model, biased


def _bias_paths(model) -> dict[str, list]:
    """{module name: [flat state paths of its bias]} over the whole model."""
    out: dict[str, list] = {}
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if str(path[-1]) == "bias":
            out.setdefault(str(path[-2]), []).append(tuple(path))
    return out


def _zero_biases(model, modules) -> None:
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if str(path[-1]) == "bias" and str(path[-2]) in modules:
            var[...] = jnp.zeros_like(var[...])


def _hf_bias_names(torch_model) -> set[str]:
    return {n for n, _ in torch_model.named_parameters() if n.endswith(".bias")}


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_llama_biases_match_transformers(case, scan):
    name, d, torch_model, biased = case
    ref = torch_logits(torch_model, IDS)
    model = pj.load_pretrained(d, scan_layers=scan)
    cfg = model.config
    assert cfg.attention_bias == cfg.attention_out_bias == ("q_proj" in biased)
    assert cfg.mlp_bias == ("gate_proj" in biased)
    assert set(_bias_paths(model)) == set(biased)
    # the parameters sit at the HF paths: export names are exactly transformers' bias tensors
    assert {n for n, _ in hf_state_dict(model) if n.endswith(".bias")} == _hf_bias_names(torch_model)
    np.testing.assert_allclose(np.asarray(model(IDS)), ref, atol=1e-4, rtol=0)
    # every single bias matters: zeroing any one projection's bias breaks parity
    for module in biased:
        m = pj.load_pretrained(d, scan_layers=scan)
        _zero_biases(m, {module})
        assert np.abs(np.asarray(m(IDS)) - ref).max() > 1e-3, f"{module} bias has no effect"


def test_num_params_counts_biases(case):
    name, d, torch_model, _ = case
    model = pj.load_pretrained(d)
    ours = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert model.config.num_params() == ours == sum(p.numel() for p in torch_model.parameters())


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_cached_decode_uses_biases(case, scan):
    """Prefill + single-token steps through the KV cache equal the full forward pass (same biased modules)."""
    _, d, _, _ = case
    model = pj.load_pretrained(d, scan_layers=scan)
    seg = jnp.ones_like(IDS, dtype=jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(IDS.shape[1], dtype=jnp.int32), IDS.shape)
    P = 8
    hidden, cache = model.decode(IDS[:, :P], model.init_cache(seg, pos), 0)
    chunks = [hidden]
    for t in range(P, IDS.shape[1]):
        hidden, cache = model.decode(IDS[:, t:t + 1], cache, t)
        chunks.append(hidden)
    cached = model.logits(jnp.concatenate(chunks, axis=1))
    np.testing.assert_allclose(np.asarray(cached), np.asarray(model(IDS)), atol=1e-5, rtol=0)


def test_export_round_trip_in_transformers(case, tmp_path):
    from transformers import AutoModelForCausalLM

    name, d, torch_model, biased = case
    ours = pj.load_pretrained(d, scan_layers=True)
    out = pj.save_pretrained(ours, tmp_path / "export")
    hf = json.loads((out / "config.json").read_text())
    assert hf["attention_bias"] is ("q_proj" in biased) and hf["mlp_bias"] is ("gate_proj" in biased)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert _hf_bias_names(reloaded) == _hf_bias_names(torch_model)
    attn = reloaded.model.layers[0].self_attn
    assert (attn.o_proj.bias is not None) == ("o_proj" in biased)
    np.testing.assert_allclose(torch_logits(reloaded, IDS), np.asarray(ours(IDS)), atol=1e-5, rtol=0)
    np.testing.assert_allclose(torch_logits(reloaded, IDS), torch_logits(torch_model, IDS), atol=1e-5, rtol=0)
    again = pj.load_pretrained(out, scan_layers=False)
    assert again.config == ours.config
    np.testing.assert_allclose(np.asarray(again(IDS)), np.asarray(ours(IDS)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_lora_keeps_base_biases(case, scan):
    _, d, torch_model, biased = case
    ref = torch_logits(torch_model, IDS)
    model = apply_lora(pj.load_pretrained(d, scan_layers=scan), rank=2, alpha=4.0)
    assert set(_bias_paths(model)) == set(biased)  # LoRALinear keeps the base bias at the same path
    np.testing.assert_allclose(np.asarray(model(IDS)), ref, atol=1e-4, rtol=0)  # lora_b = 0: unchanged
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        if str(path[-1]) == "lora_b":
            var[...] = jax.random.normal(jax.random.key(len(path)), var.shape) * 0.05
    adapted = np.asarray(model(IDS))
    assert np.abs(adapted - ref).max() > 1e-3
    merge_lora(model)
    assert set(_bias_paths(model)) == set(biased)
    np.testing.assert_allclose(np.asarray(model(IDS)), adapted, atol=1e-4, rtol=0)
    assert {n for n, _ in hf_state_dict(model) if n.endswith(".bias")} == _hf_bias_names(torch_model)


def test_bias_sharding():
    mesh = make_mesh(1, 4, 2)
    D, F = SMALL["hidden_size"], SMALL["intermediate_size"]
    want = {"o_proj": (("embed",), D, "fsdp"), "gate_proj": (("mlp",), F, "tensor"),
            "up_proj": (("mlp",), F, "tensor"), "down_proj": (("embed",), D, "fsdp")}
    for module, (axes, dim, mesh_axis) in want.items():
        loop_path = ("model", "layers", 0, "self_attn" if module == "o_proj" else "mlp", module, "bias")
        assert logical_axes(loop_path, 1, scanned=False) == axes
        assert param_sharding(loop_path, (dim,), mesh, scanned=False).spec == jax.sharding.PartitionSpec(mesh_axis)
        scan_path = tuple(k for k in loop_path if k != 0)
        assert logical_axes(scan_path, 2, scanned=True) == ("layers",) + axes
        assert param_sharding(scan_path, (2, dim), mesh, scanned=True).spec == \
            jax.sharding.PartitionSpec(None, mesh_axis)


def test_sharded_load_with_biases(tmp_path):
    d = tmp_path / "both"
    _biased_model("llama", d, attention_bias=True, mlp_bias=True)
    mesh = make_mesh(1, 4, 2)
    sharded = pj.load_pretrained(d, mesh=mesh, scan_layers=True)
    o_bias = sharded.model.layers.self_attn.o_proj.bias[...]
    assert o_bias.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert sharded.model.layers.mlp.up_proj.bias[...].sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
    single = pj.load_pretrained(d, scan_layers=True)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda m, x: m(x))(sharded, IDS)
    np.testing.assert_allclose(np.asarray(out), np.asarray(single(IDS)), atol=1e-5)


# --------------------------------------------------------------------------------------- other families
def test_qwen2_has_no_o_proj_bias(tmp_path):
    torch_model = _biased_model("qwen2", tmp_path)
    assert torch_model.model.layers[0].self_attn.o_proj.bias is None  # transformers' Qwen2
    model = pj.load_pretrained(tmp_path)
    cfg = model.config
    assert cfg.attention_bias and not cfg.attention_out_bias and not cfg.mlp_bias
    assert set(_bias_paths(model)) == {"q_proj", "k_proj", "v_proj"}
    assert model.model.layers[0].self_attn.o_proj.bias is None
    np.testing.assert_allclose(np.asarray(model(IDS)), torch_logits(torch_model, IDS), atol=1e-4, rtol=0)
    assert cfg.num_params() == sum(p.numel() for p in torch_model.parameters())
    hf = cfg.to_hf()
    assert hf["attention_bias"] is True and "mlp_bias" not in hf
    assert ModelConfig.from_hf(hf) == cfg


def test_qwen3_attention_bias_includes_o_proj(tmp_path):
    torch_model = _biased_model("qwen3", tmp_path, attention_bias=True, head_dim=8)
    assert torch_model.model.layers[0].self_attn.o_proj.bias is not None
    model = pj.load_pretrained(tmp_path, scan_layers=True)
    assert model.config.attention_out_bias
    ref = torch_logits(torch_model, IDS)
    np.testing.assert_allclose(np.asarray(model(IDS)), ref, atol=1e-4, rtol=0)
    _zero_biases(model, {"o_proj"})
    assert np.abs(np.asarray(model(IDS)) - ref).max() > 1e-3


def test_unexpected_bias_tensors_are_refused(tmp_path):
    """A checkpoint carrying MLP biases its config.json does not declare is refused, not silently mis-modelled."""
    _biased_model("llama", tmp_path, mlp_bias=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["mlp_bias"] = False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"unexpected tensor\(s\) model\.layers\.0\.mlp\.down_proj\.bias"):
        pj.load_pretrained(tmp_path)


def test_config_bias_rules():
    base = dict(model_type="llama", vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    assert ModelConfig(**base, attention_bias=True).attention_out_bias is True  # the family's rule by default
    assert ModelConfig(**base).attention_out_bias is False
    assert ModelConfig(**{**base, "model_type": "qwen2"}, attention_bias=True).attention_out_bias is False
    with pytest.raises(UserError, match="o_proj bias exactly when attention_bias"):
        ModelConfig(**base, attention_bias=True, attention_out_bias=False)
    with pytest.raises(UserError, match="never has an o_proj bias"):
        ModelConfig(**{**base, "model_type": "qwen2"}, attention_bias=True, attention_out_bias=True)
    with pytest.raises(UserError, match="mlp_bias is only supported"):
        ModelConfig(**{**base, "model_type": "qwen3"}, mlp_bias=True)
    with pytest.raises(UserError, match="no attention biases"):
        ModelConfig(**{**base, "model_type": "mistral"}, attention_bias=True)
    # keys a family ignores in transformers stay as read (extra) and are written back unchanged
    hf = {**base, "model_type": "mistral", "attention_bias": True, "mlp_bias": True}
    cfg = ModelConfig.from_hf(hf)
    assert not (cfg.attention_bias or cfg.attention_out_bias or cfg.mlp_bias)
    assert cfg.to_hf()["attention_bias"] is True and cfg.to_hf()["mlp_bias"] is True
    both = ModelConfig.from_hf({**base, "attention_bias": True, "mlp_bias": True})
    assert both.attention_bias and both.attention_out_bias and both.mlp_bias
    assert ModelConfig.from_hf(both.to_hf()) == both
