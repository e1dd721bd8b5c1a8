"""The registry end to end: tiny CausalLM + collated PairedBatch → passes → objectives, vs direct full-logit
computations on each example's own sequence (no segment ids, no index arrays, no chunking).

Everything runs under ``jax.jit``, with several evaluations per compiled function, to keep CPU compile time low.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from percausal_jax.data.pairing import PairedExample, collate
from percausal_jax.models import CausalLM, ModelConfig
from percausal_jax.objectives import losses, registry

# CPU compile time dominates these tiny computations; XLA's backend optimizations are not what is under test.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

V = 64
CHUNK = 24  # 64 = 2·24 + 16: several vocabulary chunks, the last one partial
TOL = dict(rtol=1e-5, atol=1e-5)
DIRECT_LEN = 16


def tiny_config():
    return ModelConfig(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def perturbed(model, seed, scale=0.3):
    """A copy of ``model`` with every parameter perturbed by N(0, scale²) noise, so that next-token distributions are
    far from uniform (the initializers' 0.02 scale makes them nearly uniform)."""
    graphdef, state = nnx.split(model)
    rng = np.random.RandomState(seed)
    state = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(size=x.shape) * scale, x.dtype), state)
    return nnx.merge(graphdef, state)


# Two examples with different prompt lengths (and different no-profile prompt lengths); padding response slots.
EX1 = PairedExample(prompt_ids=(1, 5, 9, 13, 17, 21), prompt_no_profile_ids=(1, 17, 21), response_ids=(30, 31, 40, 2))
EX2 = PairedExample(prompt_ids=(1, 3, 4, 5, 6, 7, 8, 17, 21), prompt_no_profile_ids=(1, 21), response_ids=(44, 12, 2))
EX3 = PairedExample(prompt_ids=(1, 60, 61), prompt_no_profile_ids=(1, 62), response_ids=(7, 63, 2))

# Identical prompts with and without "profile".
ID1 = PairedExample((1, 5, 9, 13), (1, 5, 9, 13), (20, 21, 22, 2))
ID2 = PairedExample((1, 7, 8, 9, 10, 11), (1, 7, 8, 9, 10, 11), (30, 2))


def cfg_for(name, **overrides):
    cfg = losses.default_config()[name]
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def evaluate_many(model, batch, specs, ref_model=None):
    """{key: registry.evaluate(name, model, batch, cfg, ref_model)} for specs {key: (name, cfg, uses_ref)}, all in
    one jitted function."""
    graphdef, state = nnx.split(model)
    ref_gd, ref_state = nnx.split(ref_model) if ref_model is not None else (None, None)

    def f(st, ref_st, b):
        m = nnx.merge(graphdef, st)
        ref = nnx.merge(ref_gd, ref_st) if ref_model is not None else None
        return {k: registry.evaluate(name, m, b, cfg, ref_model=ref if uses_ref else None, chunk_size=CHUNK)
                for k, (name, cfg, uses_ref) in specs.items()}

    return jax.tree.map(np.asarray, fast_jit(f)(state, ref_state, batch))


def _logits_fn(model):
    """Jitted ``model(tokens)`` (default positions 0..L-1, one segment), cached on the model object."""
    fn = getattr(model, "_test_logits_fn", None)
    if fn is None:
        graphdef, state = nnx.split(model)
        jitted = fast_jit(lambda st, toks: nnx.merge(graphdef, st)(toks))
        fn = lambda toks: jitted(state, toks)  # noqa: E731
        object.__setattr__(model, "_test_logits_fn", fn)
    return fn


def direct_rows(model, prompt, response):
    """The model's full logits on the sequence prompt + response[:-1] (called directly: no segment ids, no index
    arrays), at the rows that predict each response token (row len(prompt) - 1 + t), float64 numpy [n, V].
    The sequence is right-filled with token 0 to DIRECT_LEN; the model is causal, so the rows used are those of the
    unfilled sequence (one compile instead of one per length)."""
    seq = list(prompt) + list(response[:-1])
    assert len(seq) <= DIRECT_LEN
    toks = np.zeros((1, DIRECT_LEN), np.int32)
    toks[0, :len(seq)] = seq
    logits = np.asarray(_logits_fn(model)(jnp.asarray(toks))[0], np.float64)
    return logits[len(prompt) - 1 + np.arange(len(response))]


def np_log_softmax(z):
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def direct(model, examples):
    """Per example: (personal logits rows, counterfactual logits rows, response ids)."""
    return [(direct_rows(model, ex.prompt_ids, ex.response_ids),
             direct_rows(model, ex.prompt_no_profile_ids, ex.response_ids), np.asarray(ex.response_ids))
            for ex in examples]


def gold_logp(rows, ids):
    return np_log_softmax(rows)[np.arange(len(ids)), ids]


def entropy(rows):
    ls = np_log_softmax(rows)
    return -(np.exp(ls) * ls).sum(-1)


def total(r):
    return float(np.sum(r.loss_sum / np.maximum(r.normalizer, 1e-12)))


# ----------------------------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def plain_model():
    return CausalLM(tiny_config(), rngs=nnx.Rngs(0))  # random init


@pytest.fixture(scope="module")
def model(plain_model):
    return perturbed(plain_model, 1)


@pytest.fixture(scope="module")
def ref_model(plain_model):
    return perturbed(plain_model, 2)


@pytest.fixture(scope="module")
def softcap_model(model):
    """The same parameters under a config with final_logit_softcap = 2 (active: raw logits reach ~6)."""
    cfg = dataclasses.replace(tiny_config(), final_logit_softcap=2.0)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.split(model)[1])


@pytest.fixture(scope="module")
def batch():
    return collate([[EX1], [EX2]], personal_len=12, counterfactual_len=7, response_len=5).as_dict()


@pytest.fixture(scope="module")
def identical_batch():
    return collate([[ID1], [ID2]], personal_len=9, counterfactual_len=9, response_len=5).as_dict()


@pytest.fixture(scope="module")
def e2e(model, ref_model, batch):
    specs = {
        "ce": ("ce", cfg_for("ce"), False),
        "perce": ("perce", cfg_for("perce"), False),
        "nextquill": ("nextquill", cfg_for("nextquill"), False),
        "nextquill_fixed": ("nextquill", cfg_for("nextquill", fixed_theta_d=True), True),
        "lossce": ("lossce", cfg_for("lossce"), True),
        "entce": ("entce", cfg_for("entce"), False),
    }
    return evaluate_many(model, batch, specs, ref_model)


IDENTICAL_SPECS = {
    "ce": ("ce", {}, False),
    "perce": ("perce", {}, False),
    "perce_per_sequence": ("perce", {"per_sequence": True}, False),
    "nextquill": ("nextquill", {}, False),
    "nextquill_weighted_lp": ("nextquill", {"weighted_lp": True}, False),
    "nextquill_fixed": ("nextquill", {"fixed_theta_d": True}, True),
    "lossce": ("lossce", {}, True),
    "entce": ("entce", {}, False),
}


@pytest.fixture(scope="module")
def identical(plain_model, ref_model, identical_batch):
    specs = {k: (name, cfg_for(name, **ov), uses_ref) for k, (name, ov, uses_ref) in IDENTICAL_SPECS.items()}
    return evaluate_many(plain_model, identical_batch, specs, ref_model)


# ----------------------------------------------------------------------------------------------------------------
# registry surface

def test_registry_lists_the_five_objectives():
    assert set(registry.OBJECTIVES) == {"ce", "perce", "nextquill", "lossce", "entce"}
    with pytest.raises(ValueError):
        registry.get("not_an_objective")


def test_requirements():
    cfg = losses.default_config()
    perce = registry.get("perce").requirements(cfg.perce)
    assert perce.counterfactual and not perce.counterfactual_grad and not perce.reference
    nq = registry.get("nextquill").requirements(cfg.nextquill)
    assert nq.counterfactual and nq.counterfactual_grad and nq.full_logits and nq.reference == ()
    nq_fixed = registry.get("nextquill").requirements(cfg_for("nextquill", fixed_theta_d=True))
    assert set(nq_fixed.reference) == {"p", "c"}
    assert registry.get("lossce").requirements(cfg.lossce).reference == ("p",)
    assert registry.get("entce").requirements(cfg.entce).entropy


def test_batch_layout(batch):
    # the two examples really have different prompt lengths -> different index arrays
    r = batch["response"]
    np.testing.assert_array_equal(r["index_personal"][0, :4], [5, 6, 7, 8])
    np.testing.assert_array_equal(r["index_personal"][1, :3], [8, 9, 10])
    np.testing.assert_array_equal(r["index_counterfactual"][0, :4], [2, 3, 4, 5])
    np.testing.assert_array_equal(r["index_counterfactual"][1, :3], [1, 2, 3])
    np.testing.assert_array_equal(r["weight"], [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])


@pytest.mark.parametrize("name, overrides", [("lossce", {}), ("nextquill", {"fixed_theta_d": True})])
def test_missing_ref_model_raises(plain_model, identical_batch, name, overrides):
    graphdef, state = nnx.split(plain_model)
    cfg = cfg_for(name, **overrides)
    with pytest.raises(ValueError):
        jax.eval_shape(lambda st: registry.evaluate(name, nnx.merge(graphdef, st), identical_batch, cfg,
                                                    ref_model=None, chunk_size=CHUNK), state)


# ----------------------------------------------------------------------------------------------------------------
# passes vs direct logits

@pytest.fixture(scope="module")
def passes_results(model, softcap_model, batch):
    """compute_passes on the 2-example batch (chunked, full logits, chunked under a softcap model) and on a packed
    batch, all in one jitted function."""
    chunked = registry.Requirements(counterfactual=True, entropy=True)
    full = registry.Requirements(counterfactual=True, full_logits=True, entropy=True)
    packed = collate([[EX1, EX3], [EX2]], personal_len=16, counterfactual_len=12, response_len=7).as_dict()
    graphdef, state = nnx.split(model)
    graphdef_sc = nnx.split(softcap_model)[0]

    def f(st, b, pb):
        m, m_sc = nnx.merge(graphdef, st), nnx.merge(graphdef_sc, st)
        return {"chunked": registry.compute_passes(m, b, chunked, chunk_size=CHUNK),
                "full": registry.compute_passes(m, b, full, chunk_size=CHUNK),
                "softcap": registry.compute_passes(m_sc, b, chunked, chunk_size=CHUNK),
                "packed": registry.compute_passes(m, pb, registry.Requirements(counterfactual=True),
                                                  chunk_size=CHUNK)}

    return jax.tree.map(np.asarray, fast_jit(f)(state, batch, packed))


@pytest.mark.parametrize("variant", ["chunked", "full", "softcap"])
def test_compute_passes_matches_direct_logits(model, passes_results, variant):
    passes = passes_results[variant]
    d = direct(model, [EX1, EX2])
    if variant == "softcap":
        assert np.abs(d[0][0]).max() > 4.0  # the cap (2.0) is active
        d = [(2.0 * np.tanh(zp / 2.0), 2.0 * np.tanh(zc / 2.0), ids) for zp, zc, ids in d]
    assert np.all(np.isfinite(passes.p.logp)) and np.all(np.isfinite(passes.c.logp))
    for b, (zp, zc, ids) in enumerate(d):
        n = len(ids)
        np.testing.assert_allclose(passes.p.logp[b, :n], gold_logp(zp, ids), **TOL)
        np.testing.assert_allclose(passes.c.logp[b, :n], gold_logp(zc, ids), **TOL)
        np.testing.assert_allclose(passes.p.entropy[b, :n], entropy(zp), **TOL)
        np.testing.assert_allclose(passes.c.entropy[b, :n], entropy(zc), **TOL)
        if variant == "full":
            np.testing.assert_allclose(passes.p.logits[b, :n], zp, **TOL)
            np.testing.assert_allclose(passes.c.logits[b, :n], zc, **TOL)
        else:
            assert passes.p.logits is None
        # personal and counterfactual contexts differ -> the check is not trivially symmetric
        assert np.abs(gold_logp(zp, ids) - gold_logp(zc, ids)).max() > 1e-2


def test_compute_passes_with_packing(model, passes_results):
    """Two examples packed in one row (segments 1, 2): each keeps its own log-probs."""
    passes = passes_results["packed"]
    (zp1, zc1, ids1), (zp2, zc2, ids2), (zp3, zc3, ids3) = direct(model, [EX1, EX2, EX3])
    p, c = passes.p.logp, passes.c.logp
    np.testing.assert_allclose(p[0, :4], gold_logp(zp1, ids1), **TOL)
    np.testing.assert_allclose(p[0, 4:7], gold_logp(zp3, ids3), **TOL)
    np.testing.assert_allclose(p[1, :3], gold_logp(zp2, ids2), **TOL)
    np.testing.assert_allclose(c[0, :4], gold_logp(zc1, ids1), **TOL)
    np.testing.assert_allclose(c[0, 4:7], gold_logp(zc3, ids3), **TOL)
    np.testing.assert_allclose(c[1, :3], gold_logp(zc2, ids2), **TOL)


# ----------------------------------------------------------------------------------------------------------------
# objectives end to end vs direct computations

def test_ce_end_to_end(model, e2e):
    r = e2e["ce"]
    nll = np.concatenate([-gold_logp(zp, ids) for zp, _, ids in direct(model, [EX1, EX2])])
    assert nll.size == 7
    np.testing.assert_allclose(total(r), nll.mean(), **TOL)
    np.testing.assert_allclose(float(r.metrics["tokens"]), 7.0)


def test_perce_end_to_end(model, e2e):
    d = direct(model, [EX1, EX2])
    pir = np.concatenate([gold_logp(zp, ids) - gold_logp(zc, ids) for zp, zc, ids in d])
    w = np.clip(pir, 0.8, 5.0)
    nll = np.concatenate([-gold_logp(zp, ids) for zp, _, ids in d])
    r = e2e["perce"]
    np.testing.assert_allclose(total(r), (w * nll).sum() / 7, **TOL)
    np.testing.assert_allclose(float(r.metrics["pir_sum"]), pir.sum(), **TOL)
    np.testing.assert_allclose(float(r.metrics["weight_sum"]), w.sum(), **TOL)


def test_perce_gradient_end_to_end(model, batch):
    """Gradient w.r.t. the LM head == gradient of Σ w·nll / n with w a numpy constant (stop-gradient is real, and
    the chunked log-prob gradient is that of the full softmax). Differentiating only the head keeps compile short."""
    cfg = cfg_for("perce")
    d = direct(model, [EX1, EX2])
    w = np.clip(np.concatenate([gold_logp(zp, ids) - gold_logp(zc, ids) for zp, zc, ids in d]), 0.8, 5.0)
    graphdef, head_state, rest = nnx.split(model, nnx.PathContains("lm_head"), ...)
    assert len(jax.tree.leaves(head_state)) == 1

    # direct personalized sequences, right-filled, one batched call
    toks = np.zeros((2, DIRECT_LEN), np.int32)
    rows, ids = [], []
    for b, ex in enumerate((EX1, EX2)):
        seq = list(ex.prompt_ids) + list(ex.response_ids[:-1])
        toks[b, :len(seq)] = seq
        for t, y in enumerate(ex.response_ids):
            rows.append((b, len(ex.prompt_ids) - 1 + t))
            ids.append(y)
    rows, ids = np.asarray(rows), np.asarray(ids)
    w_const = jnp.asarray(w, jnp.float32)

    def lib(hs):
        m = nnx.merge(graphdef, hs, rest)
        return losses.total_loss(registry.evaluate("perce", m, batch, cfg, chunk_size=CHUNK))

    def reference(hs):
        logits = nnx.merge(graphdef, hs, rest)(jnp.asarray(toks))
        ls = jax.nn.log_softmax(logits[rows[:, 0], rows[:, 1]], -1)
        return jnp.sum(w_const * -ls[jnp.arange(len(ids)), ids]) / 7.0

    g_lib, g_ref = fast_jit(lambda hs: (jax.grad(lib)(hs), jax.grad(reference)(hs)))(head_state)
    (a,), (b,) = jax.tree.leaves(g_lib), jax.tree.leaves(g_ref)
    assert float(jnp.abs(b).max()) > 1e-3
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_nextquill_end_to_end(model, e2e):
    d = direct(model, [EX1, EX2])
    lp_p = np.concatenate([gold_logp(zp, ids) for zp, _, ids in d])
    lp_c = np.concatenate([gold_logp(zc, ids) for _, zc, ids in d])
    ce_diff = np.concatenate([-gold_logp(zp - zc, ids) for zp, zc, ids in d])
    omega = np.where(np.exp(lp_p) - np.exp(lp_c) > 0.05, 0.9, 0.1)
    expected = (omega * -lp_p).sum() / omega.sum() + 0.1 * ce_diff.mean()
    r = e2e["nextquill"]
    np.testing.assert_allclose(total(r), expected, **TOL)
    np.testing.assert_allclose(float(r.metrics["alignment_ce_sum"]), ce_diff.sum(), **TOL)


def test_nextquill_fixed_theta_d_uses_ref_model(model, ref_model, e2e):
    """With fixed_theta_d the DCE comes from the reference model's two passes, not the trained one."""
    d_ref = direct(ref_model, [EX1, EX2])
    dce_ref = np.concatenate([np.exp(gold_logp(zp, ids)) - np.exp(gold_logp(zc, ids)) for zp, zc, ids in d_ref])
    r = e2e["nextquill_fixed"]
    np.testing.assert_allclose(float(r.metrics["dce_sum"]), dce_ref.sum(), **TOL)
    np.testing.assert_allclose(float(r.metrics["upweighted_count"]), float(np.sum(dce_ref > 0.05)))
    lp_p = np.concatenate([gold_logp(zp, ids) for zp, _, ids in direct(model, [EX1, EX2])])
    omega = np.where(dce_ref > 0.05, 0.9, 0.1)
    np.testing.assert_allclose(float(r.loss_sum[0]), (omega * -lp_p).sum(), **TOL)
    np.testing.assert_allclose(float(r.normalizer[0]), omega.sum(), **TOL)


def test_lossce_end_to_end(model, ref_model, e2e):
    nll = np.concatenate([-gold_logp(zp, ids) for zp, _, ids in direct(model, [EX1, EX2])])
    nll_ref = np.concatenate([-gold_logp(zp, ids) for zp, _, ids in direct(ref_model, [EX1, EX2])])
    excess = nll - nll_ref
    k = 5  # ceil(0.6 · 7) = ceil(4.2)
    top = np.argsort(-excess)[:k]
    r = e2e["lossce"]
    np.testing.assert_allclose(float(r.metrics["selected_count"]), k)
    np.testing.assert_allclose(total(r), nll[top].mean(), **TOL)


def test_entce_end_to_end(model, e2e):
    d = direct(model, [EX1, EX2])
    h = np.concatenate([entropy(zp) for zp, _, _ in d])
    nll = np.concatenate([-gold_logp(zp, ids) for zp, _, ids in d])
    w = np.minimum(h / h.mean(), 5.0)
    np.testing.assert_allclose(total(e2e["entce"]), (w * nll).sum() / 7, **TOL)


# ----------------------------------------------------------------------------------------------------------------
# identical prompts ⇒ PIR = 0, every PerCE weight = clip_min; every objective runs

def test_identical_prompts_give_zero_pir(identical):
    clip_min = cfg_for("perce").clip_min
    r = identical["perce"]
    tokens = float(r.metrics["tokens"])
    assert tokens == 6.0
    assert abs(float(r.metrics["pir_sum"])) <= 1e-5
    np.testing.assert_allclose(float(r.metrics["weight_sum"]), clip_min * tokens, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(float(r.metrics["clip_min_count"]), tokens)
    # the loss is then clip_min × CE
    np.testing.assert_allclose(total(r), clip_min * total(identical["ce"]), **TOL)


def test_identical_prompts_nextquill(identical):
    """Identical passes: DCE = 0 ≤ δ everywhere (all weights low), z_h − z_0 = 0 so L_p = log V."""
    r = identical["nextquill"]
    assert abs(float(r.metrics["dce_sum"])) <= 1e-5
    assert float(r.metrics["upweighted_count"]) == 0.0
    np.testing.assert_allclose(float(r.metrics["alignment_ce_sum"]), 6 * np.log(V), **TOL)
    np.testing.assert_allclose(float(r.normalizer[0]), 0.1 * 6, **TOL)


@pytest.mark.parametrize("key", list(IDENTICAL_SPECS))
def test_every_objective_runs(identical, key):
    r = identical[key]
    assert r.loss_sum.shape == r.normalizer.shape and r.loss_sum.ndim == 1
    assert np.all(np.isfinite(r.loss_sum)) and np.all(r.normalizer > 0)
    assert np.isfinite(total(r)) and total(r) > 0
    assert float(r.metrics["tokens"]) == 6.0
    for k, v in r.metrics.items():
        assert np.isfinite(float(v)), k
