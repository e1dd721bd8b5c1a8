"""The train step against PyTorch (one SGD step), gradient accumulation, meshes, LoRA and the NaN guard."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import percausal_jax as pj
from percausal_jax.data.pairing import PairedExample, collate
from percausal_jax.hf.checkpoint import hf_state_dict
from percausal_jax.models.lora import apply_lora
from percausal_jax.models.partitioning import make_mesh
from percausal_jax.objectives import default_config, from_config
from percausal_jax.training.step import init_state, jit_train_step, make_train_step
from tests.helpers import tiny_hf_model

LR = 0.5


def _examples(n=8, seed=0):
    rs = np.random.RandomState(seed)
    out = []
    for i in range(n):
        p = rs.randint(3, 256, rs.randint(6, 14)).tolist()
        c = p[-rs.randint(2, 5):]  # the counterfactual prompt: the query without the "profile" prefix
        r = rs.randint(3, 256, rs.randint(3, 8)).tolist() + [2]
        out.append(PairedExample(tuple(p), tuple(c), tuple(r)))
    return out


def _batch(examples):
    b = collate([[e] for e in examples], 24, 16, 10)
    return jax.tree.map(jnp.asarray, b)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("step_model")
    return d, tiny_hf_model("llama", d)


def _sgd_step(model_dir, objective, batch, k=1, mesh=None, obj_cfg=None, lora=0):
    model = pj.load_pretrained(model_dir, mesh=mesh)
    if lora:
        apply_lora(model, lora, 2 * lora, seed=1)
    trainable = nnx.LoRAParam if lora else nnx.Param
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    tx = optax.sgd(LR)
    obj_cfg = obj_cfg or default_config()
    obj_cfg.name = objective
    step = make_train_step(graphdef, tx, optax.constant_schedule(LR), from_config(obj_cfg), grad_accum_steps=k,
                           chunk_size=100)
    state = init_state(params, tx, mesh)
    ref = jax.tree.map(jnp.copy, params)
    if mesh is not None:
        with jax.set_mesh(mesh):
            new, metrics = jit_train_step(step, state)(state, frozen, ref, batch)
    else:
        new, metrics = jit_train_step(step, state)(state, frozen, ref, batch)
    return nnx.merge(graphdef, new.params, frozen), metrics, new


def _torch_step(torch_model, examples, objective, alpha=0.1):
    import copy

    import torch

    m = copy.deepcopy(torch_model).train()
    lpp, lpc, zp, zc = [], [], [], []
    for e in examples:
        r = torch.tensor(e.response_ids)
        for prompt, lp_list, z_list in ((e.prompt_ids, lpp, zp), (e.prompt_no_profile_ids, lpc, zc)):
            seq = torch.tensor([list(prompt) + list(e.response_ids[:-1])])
            z = m(seq).logits[0, len(prompt) - 1:]
            z_list.append(z)
            lp_list.append(torch.log_softmax(z, -1)[torch.arange(len(r)), r])
    lp, lc, z_h, z_0 = torch.cat(lpp), torch.cat(lpc), torch.cat(zp), torch.cat(zc)
    ids = torch.cat([torch.tensor(e.response_ids) for e in examples])
    n = len(ids)
    if objective == "ce":
        loss = -lp.sum() / n
    elif objective == "perce":
        w = (lp - lc).detach().clamp(0.8, 5.0)
        loss = -(w * lp).sum() / n
    else:
        dce = (lp.exp() - lc.exp()).detach()
        omega = torch.where(dce > 0.05, 0.9, 0.1)
        loss = -(omega * lp).sum() / omega.sum() + alpha * torch.nn.functional.cross_entropy(z_h - z_0, ids)
    loss.backward()
    with torch.no_grad():
        for p in m.parameters():
            p -= LR * p.grad
    return m, float(loss.detach())


@pytest.mark.parametrize("objective", ["ce", "perce", "nextquill"])
def test_one_sgd_step_matches_pytorch(tiny, objective):
    d, torch_model = tiny
    ex = _examples(4)
    ours, metrics, _ = _sgd_step(d, objective, _batch(ex))
    ref_model, ref_loss = _torch_step(torch_model, ex, objective)
    assert float(metrics["loss"]) == pytest.approx(ref_loss, rel=1e-5)
    ref = {k: v.detach().numpy() for k, v in ref_model.state_dict().items()}
    before = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    moved = 0.0
    for name, value in hf_state_dict(ours):
        np.testing.assert_allclose(value, ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
        moved = max(moved, np.abs(ref[name] - before[name]).max())
    assert moved > 1e-4  # the step really changed the weights


def _objective_config(objective, **fields):
    cfg = default_config()
    for key, value in fields.items():
        setattr(cfg[objective], key, value)
    return cfg


# NextQuill's three accumulation paths: pooled (Σω and the token count: forward-only pre-pass of gold-token
# probabilities), weighted_lp (one shared Σω: unnormalized gradients divided once), per_sequence (data normalizer)
@pytest.mark.parametrize("objective,fields", [
    ("ce", {}), ("perce", {}), ("nextquill", {}), ("nextquill", {"weighted_lp": True}),
    ("nextquill", {"per_sequence": True}), ("lossce", {}), ("entce", {})], ids=lambda v: str(v) if v else "default")
def test_grad_accumulation_equals_full_batch(tiny, objective, fields):
    d, _ = tiny
    batch = _batch(_examples(8, seed=3))
    full, m1, _ = _sgd_step(d, objective, batch, k=1, obj_cfg=_objective_config(objective, **fields))
    acc, m4, _ = _sgd_step(d, objective, batch, k=4, obj_cfg=_objective_config(objective, **fields))
    if objective not in ("lossce", "entce"):  # batch-relative by design: top-k% / mean entropy per micro-batch
        assert float(m4["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-6)
        assert float(m4["normalizer"]) == pytest.approx(float(m1["normalizer"]), rel=1e-6)
        for a, b in zip(jax.tree.leaves(nnx.state(full)), jax.tree.leaves(nnx.state(acc))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert float(m4["normalizer"]) > 0


@pytest.mark.parametrize("mesh_shape,objective", [((8, 1, 1), "perce"), ((2, 2, 2), "nextquill"),
                                                   ((1, 4, 2), "perce")])
def test_mesh_equals_single_device(tiny, mesh_shape, objective):
    d, _ = tiny
    batch = _batch(_examples(8, seed=5))
    single, m1, _ = _sgd_step(d, objective, batch)
    mesh = make_mesh(*mesh_shape)
    from jax.sharding import NamedSharding, PartitionSpec

    sharded_batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    multi, m8, _ = _sgd_step(d, objective, sharded_batch, k=2, mesh=mesh)
    assert float(m8["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(single)), jax.tree.leaves(nnx.state(multi))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_lora_trains_only_adapters(tiny):
    d, _ = tiny
    batch = _batch(_examples(4))
    base = pj.load_pretrained(d)
    model, metrics, new = _sgd_step(d, "perce", batch, lora=4)
    base_state = dict(nnx.to_flat_state(nnx.state(base, nnx.Param)))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if isinstance(var, nnx.LoRAParam):
            continue
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(base_state[path][...]))
    lora_b = [np.asarray(v[...]) for p, v in nnx.to_flat_state(new.params) if p[-1] == "lora_b"]
    assert lora_b and all(np.abs(x).max() > 0 for x in lora_b)  # adapters received gradient


def test_nan_guard_skips_update(tiny):
    d, _ = tiny
    batch = _batch(_examples(2))
    batch = batch.replace(response=batch.response.replace(weight=batch.response.weight.at[0, 0].set(jnp.nan)))
    model, metrics, new = _sgd_step(d, "ce", batch)
    assert not bool(metrics["finite"]) and int(new.nan_skips) == 1
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                    jax.tree.leaves(nnx.state(pj.load_pretrained(d), nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
