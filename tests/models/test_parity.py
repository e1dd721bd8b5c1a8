"""Our decoder against transformers' PyTorch models on tiny random configs (float32)."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import percausal_jax as pj
from percausal_jax.errors import UserError
from percausal_jax.models.partitioning import make_mesh
from tests.helpers import tiny_hf_model, torch_logits, with_config

FAMILIES = {
    "llama": {},
    "llama_tied": {"tie_word_embeddings": True},
    "llama3_rope": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 16}},
    "llama_linear_rope": {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}},
    "mistral_window": {"sliding_window": 5},
    "qwen2": {},
    "qwen2_window": {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1},
    "qwen3": {"head_dim": 24},
    "gemma": {},
    "gemma2": {"sliding_window": 5},
    "gemma3_text": {"sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"],
                    "rope_parameters": {"full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
}


def _model_type(name: str) -> str:
    return "gemma3_text" if name.startswith("gemma3") else name.split("_")[0].replace("llama3", "llama")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    d = tmp_path_factory.mktemp(name)
    model = tiny_hf_model(_model_type(name), d, **FAMILIES[name])
    ids = np.random.RandomState(1).randint(0, 256, (2, 16))
    return name, d, model, ids


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_logits_match_transformers(family, scan):
    name, d, model, ids = family
    ours = np.asarray(pj.load_pretrained(d, scan_layers=scan)(ids))
    np.testing.assert_allclose(ours, torch_logits(model, ids), atol=1e-4, rtol=0)


def test_export_reloads_in_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    name, d, _, ids = family
    ours = pj.load_pretrained(d, scan_layers=True)
    out = pj.save_pretrained(ours, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    np.testing.assert_allclose(torch_logits(reloaded, ids), np.asarray(ours(ids)), atol=1e-5, rtol=0)


def test_left_padding_with_positions_and_segments(tmp_path):
    """Left-padded rows: our positions/segment ids give what HF gives with an attention mask."""
    model = tiny_hf_model("qwen2", tmp_path)
    ids = np.random.RandomState(2).randint(0, 256, (2, 10))
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ours = np.asarray(pj.load_pretrained(tmp_path)(ids, positions=positions, segment_ids=mask))
    ref = torch_logits(model, ids, attention_mask=mask)
    np.testing.assert_allclose(ours[mask == 1], ref[mask == 1], atol=1e-4, rtol=0)


def test_packed_segments_equal_separate_sequences(tiny_llama_dir):
    """Two sequences packed into one row with segment ids 1, 2 and restarted positions equal running them alone."""
    m = pj.load_pretrained(tiny_llama_dir)
    a, b = np.arange(3, 10)[None], np.arange(20, 25)[None]
    packed = np.concatenate([a, b], 1)
    seg = np.array([[1] * 7 + [2] * 5])
    pos = np.array([list(range(7)) + list(range(5))])
    out = np.asarray(m(packed, positions=pos, segment_ids=seg))
    np.testing.assert_allclose(out[:, :7], np.asarray(m(a)), atol=1e-5)
    np.testing.assert_allclose(out[:, 7:], np.asarray(m(b)), atol=1e-5)


@pytest.mark.parametrize("mesh_shape", [(1, 4, 2), (2, 2, 2), (1, 1, 8)])
def test_sharded_load_matches_single_device(tiny_llama_dir, mesh_shape):
    assert len(jax.devices()) == 8
    mesh = make_mesh(*mesh_shape)
    sharded = pj.load_pretrained(tiny_llama_dir, mesh=mesh, scan_layers=True)
    q = sharded.model.layers.self_attn.q_proj.kernel[...]
    assert len(q.sharding.device_set) == 8
    # Each device holds only its slice: the q_proj kernel is split over fsdp×tensor whenever those are > 1.
    shard_shape = q.addressable_shards[0].data.shape
    assert np.prod(shard_shape) * mesh_shape[1] * mesh_shape[2] == np.prod(q.shape)
    ids = np.random.RandomState(3).randint(0, 256, (2, 16))
    single = pj.load_pretrained(tiny_llama_dir, scan_layers=True)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda m, x: m(x))(sharded, ids)
    np.testing.assert_allclose(np.asarray(out), np.asarray(single(ids)), atol=1e-5)


def test_bfloat16_params_and_compute(tiny_llama_dir):
    m = pj.load_pretrained(tiny_llama_dir, dtype="bfloat16")
    assert m.model.embed_tokens.embedding[...].dtype == np.dtype("bfloat16")
    ids = np.arange(8)[None]
    out = np.asarray(m(ids))
    assert out.dtype == np.float32
    ref = np.asarray(pj.load_pretrained(tiny_llama_dir)(ids))
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()


def test_remat_policies_give_identical_logits_and_grads(tiny_llama_dir):
    ids = np.arange(8)[None]
    base = np.asarray(pj.load_pretrained(tiny_llama_dir)(ids))
    loss = lambda m: (m(ids) ** 2).mean()  # noqa: E731
    ref_grads = jax.tree.leaves(nnx.state(nnx.grad(loss)(pj.load_pretrained(tiny_llama_dir, scan_layers=True))))
    for policy in ("full", "dots", "minimal"):
        m = pj.load_pretrained(tiny_llama_dir, scan_layers=True, remat_policy=policy)
        np.testing.assert_allclose(np.asarray(m(ids)), base, atol=1e-5)
        for g, r in zip(jax.tree.leaves(nnx.state(nnx.grad(loss)(m))), ref_grads):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-6)


def test_sharded_export_with_index(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    m = pj.load_pretrained(tiny_llama_dir)
    out = pj.save_pretrained(m, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ids = np.arange(10)[None]
    np.testing.assert_allclose(np.asarray(pj.load_pretrained(out)(ids)), np.asarray(m(ids)), atol=0)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    np.testing.assert_allclose(torch_logits(reloaded, ids), np.asarray(m(ids)), atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"


# ------------------------------------------------------------------------------ Gemma2 soft-caps that matter
# With tiny weights Gemma2's default caps (50 / 30) move transformers' logits by ~1e-6, so a parity test under a 1e-4
# tolerance cannot see a missing cap. Here q/k are scaled ×4 (raw attention scores reach ~13, cap 5) and the
# final cap of 2 is close to the raw logits (~1.8 max, tanh bends them by up to ~0.4): each cap moves transformers'
# logits by far more than CAP_MARGIN, and the same weights under our config with that cap removed must miss
# transformers by at least CAP_MARGIN.
CAPS = {"attn_logit_softcapping": 5.0, "final_logit_softcapping": 2.0}
CAP_FIELDS = {"attn_logit_softcapping": "attn_logit_softcap", "final_logit_softcapping": "final_logit_softcap"}
CAP_MARGIN = 1e-2
CAP_ATOL = 2e-5  # observed float32 error: ~2e-6
CAP_PREFILL = 16  # decode test: prefill this many tokens, then one token per step


@pytest.fixture(scope="module")
def gemma2_capped(tmp_path_factory):
    """(dir, ids, transformers' logits with both caps, {hf cap key: transformers' logits with that cap off})."""
    import torch
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("gemma2_capped")
    model = tiny_hf_model("gemma2", None, sliding_window=8, query_pre_attn_scalar=16, **CAPS)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    model.save_pretrained(str(d))
    ids = np.random.RandomState(4).randint(0, 256, (2, 20))  # longer than the window of 8 (layer 0 slides)
    uncapped = {}
    for key in CAPS:
        m = AutoModelForCausalLM.from_pretrained(str(d), **{key: None}).eval()
        assert getattr(m.config, key) is None
        uncapped[key] = torch_logits(m, ids)
    return d, ids, torch_logits(model, ids), uncapped


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.parametrize("cap", sorted(CAPS))
def test_gemma2_each_softcap_changes_transformers_logits(gemma2_capped, cap):
    _, _, ref, uncapped = gemma2_capped
    assert _max_diff(uncapped[cap], ref) >= CAP_MARGIN, cap


def _cached_logits(model, ids):
    """Prefill CAP_PREFILL tokens through the KV cache, then one token per step; the logits of every position."""
    seg = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)

    @nnx.jit
    def run(model, ids):
        hidden, cache = model.decode(ids[:, :CAP_PREFILL], model.init_cache(seg, pos), 0)
        chunks = [hidden]
        for t in range(CAP_PREFILL, ids.shape[1]):
            hidden, cache = model.decode(ids[:, t:t + 1], cache, t)
            chunks.append(hidden)
        return model.logits(jax.numpy.concatenate(chunks, axis=1))

    return np.asarray(run(model, ids))


@pytest.mark.parametrize("path", ["forward", "decode"])
@pytest.mark.parametrize("removed", [None, *sorted(CAPS)], ids=["both_caps", "no_attn_cap", "no_final_cap"])
@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_gemma2_softcaps_match_transformers(gemma2_capped, scan, removed, path):
    """Ours with both caps matches transformers; the same weights with one cap removed from our ModelConfig miss
    transformers by >= CAP_MARGIN and match transformers with that cap off (so the cap is the whole difference)."""
    d, ids, ref, uncapped = gemma2_capped
    model = pj.load_pretrained(d, scan_layers=scan)
    assert (model.config.attn_logit_softcap, model.config.final_logit_softcap) == (5.0, 2.0)
    if removed is not None:
        model = with_config(model, **{CAP_FIELDS[removed]: None})
    ours = np.asarray(model(ids)) if path == "forward" else _cached_logits(model, ids)
    if removed is None:
        np.testing.assert_allclose(ours, ref, atol=CAP_ATOL, rtol=0)
    else:
        np.testing.assert_allclose(ours, uncapped[removed], atol=CAP_ATOL, rtol=0)
        assert _max_diff(ours, ref) >= CAP_MARGIN


# ------------------------------------------------------------------------------------------------ bad inputs
def test_missing_dir(tmp_path):
    with pytest.raises(UserError, match="no such model directory"):
        pj.load_pretrained(tmp_path / "nope")


def test_missing_tensor(tiny_llama_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    _copy_config(tiny_llama_dir, tmp_path)
    tensors = load_file(tiny_llama_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        pj.load_pretrained(tmp_path)


def test_unexpected_tensor(tiny_llama_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    _copy_config(tiny_llama_dir, tmp_path)
    tensors = load_file(tiny_llama_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=r"unexpected tensor\(s\) model\.layers\.0\.self_attn\.extra\.weight"):
        pj.load_pretrained(tmp_path)


def test_wrong_shape(tiny_llama_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    _copy_config(tiny_llama_dir, tmp_path)
    tensors = load_file(tiny_llama_dir / "model.safetensors")
    tensors["model.layers.0.mlp.gate_proj.weight"] = np.zeros((100, 64), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight: shape \[100, 64\].*"
                                        r"expected \[128, 64\]"):
        pj.load_pretrained(tmp_path)


def test_unknown_model_type(tiny_llama_dir, tmp_path):
    import shutil

    shutil.copy(tiny_llama_dir / "model.safetensors", tmp_path)
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    cfg["model_type"] = "falcon"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="model_type 'falcon' is not supported"):
        pj.load_pretrained(tmp_path)


def test_pickle_checkpoint_refused(tiny_llama_dir, tmp_path):
    _copy_config(tiny_llama_dir, tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UserError, match="no model.safetensors"):
        pj.load_pretrained(tmp_path)


def _copy_config(src, dst):
    import shutil

    shutil.copy(src / "config.json", dst / "config.json")
