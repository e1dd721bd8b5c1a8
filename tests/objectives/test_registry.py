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

from percausal_jax.data.pairing import PairedBatch, PairedExample, collate
from percausal_jax.errors import UserError
from percausal_jax.models import CausalLM, ModelConfig
from percausal_jax.objectives import losses, registry
from percausal_jax.objectives.losses import CE, EntCE, LossCE, NextQuill, PerCE, Requirements, Targets
from percausal_jax.objectives.passes import compute_passes, evaluate
from tests.objectives import fixtures

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


def evaluate_many(model, batch, specs, ref_model=None):
    """{key: evaluate(objective, model, batch, ref_model)} for specs {key: (objective, uses_ref)}, all in one jitted
    function (the objectives are frozen dataclasses closed over as constants)."""
    graphdef, state = nnx.split(model)
    ref_gd, ref_state = nnx.split(ref_model) if ref_model is not None else (None, None)

    def f(st, ref_st, b):
        m = nnx.merge(graphdef, st)
        ref = nnx.merge(ref_gd, ref_st) if ref_model is not None else None
        return {k: evaluate(obj, m, b, ref_model=ref if uses_ref else None, chunk_size=CHUNK)
                for k, (obj, uses_ref) in specs.items()}

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
    return collate([[EX1], [EX2]], personal_len=12, counterfactual_len=7, response_len=5)


@pytest.fixture(scope="module")
def identical_batch():
    return collate([[ID1], [ID2]], personal_len=9, counterfactual_len=9, response_len=5)


@pytest.fixture(scope="module")
def e2e(model, ref_model, batch):
    specs = {
        "ce": (CE(), False),
        "perce": (PerCE(), False),
        "nextquill": (NextQuill(), False),
        "nextquill_fixed": (NextQuill(fixed_theta_d=True), True),
        "lossce": (LossCE(), True),
        "entce": (EntCE(), False),
    }
    return evaluate_many(model, batch, specs, ref_model)


IDENTICAL_SPECS = {
    "ce": (CE(), False),
    "perce": (PerCE(), False),
    "perce_per_sequence": (PerCE(per_sequence=True), False),
    "nextquill": (NextQuill(), False),
    "nextquill_weighted_lp": (NextQuill(weighted_lp=True), False),
    "nextquill_fixed": (NextQuill(fixed_theta_d=True), True),
    "lossce": (LossCE(), True),
    "entce": (EntCE(), False),
}


@pytest.fixture(scope="module")
def identical(plain_model, ref_model, identical_batch):
    return evaluate_many(plain_model, identical_batch, IDENTICAL_SPECS, ref_model)


# ----------------------------------------------------------------------------------------------------------------
# registry surface: names and config blocks

ALL = {"ce": CE, "perce": PerCE, "nextquill": NextQuill, "lossce": LossCE, "entce": EntCE}


def test_registry_maps_each_name_to_its_objective():
    assert registry.OBJECTIVES == ALL
    for name, cls in ALL.items():
        assert registry.get(name) is cls and cls.name == name


@pytest.mark.parametrize("name, hint", [("percee", "perce"), ("next_quill", "nextquill"), ("xyz", None)])
def test_get_unknown_objective(name, hint):
    with pytest.raises(UserError) as e:
        registry.get(name)
    msg = str(e.value)
    assert repr(name) in msg and all(n in msg for n in ALL)  # names the bad value and the choices
    assert (f"did you mean {hint!r}" in msg) if hint else ("did you mean" not in msg)


def from_config_error(block, where="objective") -> str:
    with pytest.raises(UserError) as e:
        registry.from_config(block, where)
    return str(e.value)


def test_from_config_reads_the_named_block():
    block = registry.default_config()
    block.name = "nextquill"
    block.nextquill.delta = 0.2
    block.nextquill.fixed_theta_d = True
    block.perce.clip_min = 0.1  # another method's block: checked, not used
    obj = registry.from_config(block)
    assert obj == NextQuill(delta=0.2, fixed_theta_d=True)
    assert obj.requirements.reference == ("p", "c")  # the hyper-parameter reaches the behaviour
    # a missing method block means its defaults; an int for a float field becomes a float
    assert registry.from_config({"name": "lossce"}) == LossCE()
    obj = registry.from_config({"name": "perce", "perce": {"clip_max": 4}})
    assert obj == PerCE(clip_max=4.0) and type(obj.clip_max) is float


@pytest.mark.parametrize("key, hint", [("percee", "perce"), ("vocab_chunk", "vocab_chunk_size")])
def test_from_config_unknown_block_key(key, hint):
    block = registry.default_config()
    block[key] = {"clip_min": 0.5} if key == "percee" else 4096
    msg = from_config_error(block)
    assert msg.startswith(f"objective.{key}:") and f"did you mean {hint!r}" in msg


def test_from_config_unknown_hyperparameter():
    block = registry.default_config()
    block.perce.clip_mx = 4.0
    msg = from_config_error(block)
    assert msg.startswith("objective.perce.clip_mx:") and "did you mean 'clip_max'" in msg
    # in the block of a method other than the selected one too (a typo is never silently ignored), under `where`
    block = registry.default_config()
    block.name = "ce"
    block.nextquill.detla = 0.1
    msg = from_config_error(block, "train.objective")
    assert msg.startswith("train.objective.nextquill.detla:") and "did you mean 'delta'" in msg


@pytest.mark.parametrize("name, key, value, expected", [
    ("perce", "clip_min", "0.8", "float"),
    ("perce", "clip_max", True, "float"),  # a bool is not a number here
    ("perce", "per_sequence", 1, "bool"),
    ("nextquill", "fixed_theta_d", "yes", "bool"),
    ("lossce", "keep_frac", None, "float"),
])
def test_from_config_wrong_type(name, key, value, expected):
    msg = from_config_error({"name": name, name: {key: value}})
    assert msg.startswith(f"objective.{name}.{key}={value!r}:") and expected in msg


def test_from_config_unknown_or_missing_name():
    block = registry.default_config()
    block.name = "percee"
    msg = from_config_error(block)
    assert "'percee'" in msg and "did you mean 'perce'" in msg
    assert from_config_error({"perce": {}}).startswith("objective.name:")


# ----------------------------------------------------------------------------------------------------------------
# requirements, through behaviour

CASES = [CE(), CE(per_sequence=True), PerCE(), NextQuill(), NextQuill(weighted_lp=True),
         NextQuill(fixed_theta_d=True), LossCE(), EntCE()]


def weaker(req: Requirements) -> list[Requirements]:
    """``req`` with one of the passes (or one part of a pass) it asks for withheld."""
    out = [dataclasses.replace(req, **{f: False}) for f in ("contrast", "entropy") if getattr(req, f)]
    if req.counterfactual:  # withholding the pass withholds everything made of it
        out.append(dataclasses.replace(req, counterfactual=False, counterfactual_grad=False, contrast=False))
    return out + [dataclasses.replace(req, reference=tuple(r for r in req.reference if r != p)) for p in req.reference]


@pytest.mark.parametrize("obj", CASES, ids=repr)
def test_requirements_are_sufficient_and_minimal(obj):
    """Given only the passes its ``requirements`` ask for (as ``compute_passes`` produces them), an objective gives
    exactly what it gives with every pass; withholding any one of them breaks it (nothing asked for goes unused)."""
    x_all, t = fixtures.all_passes(), fixtures.targets()
    want, got = obj(x_all, t), obj(fixtures.restrict(x_all, obj.requirements), t)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for req in weaker(obj.requirements):
        with pytest.raises((AttributeError, TypeError)):
            obj(fixtures.restrict(x_all, req), t)


def test_union_of_requirements_serves_every_objective():
    """One set of passes for several objectives (``percausal score`` evaluates them together): the union of their
    requirements is enough for each, and still minimal for the union of what they use."""
    x_all, t = fixtures.all_passes(), fixtures.targets()
    req = Requirements()
    for obj in CASES:
        req = req.union(obj.requirements)
    for obj in CASES:
        for a, b in zip(jax.tree.leaves(obj(x_all, t)), jax.tree.leaves(obj(fixtures.restrict(x_all, req), t))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for weak in weaker(req):
        with pytest.raises((AttributeError, TypeError)):
            for obj in CASES:
                obj(fixtures.restrict(x_all, weak), t)
    pair = PerCE().requirements.union(LossCE().requirements)
    assert pair == Requirements(counterfactual=True, reference=("p",))
    assert NextQuill(fixed_theta_d=True).requirements.union(LossCE().requirements).reference == ("c", "p")


@pytest.mark.parametrize("obj", CASES, ids=repr)
def test_counterfactual_grad_iff_the_loss_differentiates_it(obj):
    """``counterfactual_grad`` is asked for exactly when the loss has a gradient through the counterfactual pass."""
    x_all, t = fixtures.all_passes(), fixtures.targets()

    def loss(zc):
        x = x_all._replace(c=fixtures.po(zc, with_entropy=True), contrast=fixtures.contrast(fixtures.ZP_L, zc))
        return losses.total_loss(obj(fixtures.restrict(x, obj.requirements), t))

    g = np.asarray(jax.grad(loss)(jnp.asarray(fixtures.ZC)))
    assert bool(np.abs(g).max() > 1e-4) == obj.requirements.counterfactual_grad


@pytest.mark.parametrize("obj", CASES, ids=repr)
def test_compute_passes_runs_what_requirements_ask(model, ref_model, batch, obj):
    """Exactly the passes asked for, each with logits [B, R, V] / entropy [B, R] only when asked (shapes only)."""
    req = obj.requirements
    (gd, st), (rgd, rst) = nnx.split(model), nnx.split(ref_model)
    x = jax.eval_shape(lambda s, rs, b: compute_passes(nnx.merge(gd, s), b, req, CHUNK, nnx.merge(rgd, rs)),
                       st, rst, batch)
    B, R = batch.response.ids.shape
    present = {"p": True, "c": req.counterfactual, "ref_p": "p" in req.reference, "ref_c": "c" in req.reference}
    for field, wanted in present.items():
        out = getattr(x, field)
        assert (out is not None) == wanted, field
        if out is not None:
            assert out.logp.shape == (B, R) and out.logp.dtype == jnp.float32, field
            assert (out.entropy.shape == (B, R)) if req.entropy else (out.entropy is None), field
    assert (x.contrast.shape == (B, R)) if req.contrast else (x.contrast is None)
    # and the objective runs on them
    r = jax.eval_shape(obj, x, Targets.of(batch))
    assert r.loss_sum.shape == r.normalizer.shape


def test_batch_layout(batch):
    # the two examples really have different prompt lengths -> different index arrays
    assert isinstance(batch, PairedBatch)
    r = batch.response
    np.testing.assert_array_equal(r.index_personal[0, :4], [5, 6, 7, 8])
    np.testing.assert_array_equal(r.index_personal[1, :3], [8, 9, 10])
    np.testing.assert_array_equal(r.index_counterfactual[0, :4], [2, 3, 4, 5])
    np.testing.assert_array_equal(r.index_counterfactual[1, :3], [1, 2, 3])
    np.testing.assert_array_equal(r.weight, [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    t = Targets.of(batch)
    np.testing.assert_array_equal(t.ids, r.ids)
    np.testing.assert_array_equal(t.weight, r.weight)
    np.testing.assert_array_equal(t.seq_weight, r.seq_weight)


@pytest.mark.parametrize("obj", [LossCE(), NextQuill(fixed_theta_d=True)], ids=repr)
def test_missing_ref_model_raises(plain_model, identical_batch, obj):
    graphdef, state = nnx.split(plain_model)
    with pytest.raises(ValueError):
        jax.eval_shape(lambda st: evaluate(obj, nnx.merge(graphdef, st), identical_batch, ref_model=None,
                                           chunk_size=CHUNK), state)


# ----------------------------------------------------------------------------------------------------------------
# passes vs direct logits

@pytest.fixture(scope="module")
def passes_results(model, softcap_model, batch):
    """compute_passes on the 2-example batch (chunked, with the contrast, both under a softcap model) and on a packed
    batch, all in one jitted function."""
    chunked = Requirements(counterfactual=True, entropy=True)
    pair = Requirements(counterfactual=True, contrast=True, entropy=True)
    packed = collate([[EX1, EX3], [EX2]], personal_len=16, counterfactual_len=12, response_len=7)
    graphdef, state = nnx.split(model)
    graphdef_sc = nnx.split(softcap_model)[0]

    def f(st, b, pb):
        m, m_sc = nnx.merge(graphdef, st), nnx.merge(graphdef_sc, st)
        return {"chunked": compute_passes(m, b, chunked, chunk_size=CHUNK),
                "contrast": compute_passes(m, b, pair, chunk_size=CHUNK),
                "softcap": compute_passes(m_sc, b, chunked, chunk_size=CHUNK),
                "softcap_contrast": compute_passes(m_sc, b, pair, chunk_size=CHUNK),
                "packed": compute_passes(m, pb, Requirements(counterfactual=True), chunk_size=CHUNK)}

    return jax.tree.map(np.asarray, fast_jit(f)(state, batch, packed))


@pytest.mark.parametrize("variant", ["chunked", "contrast", "softcap", "softcap_contrast"])
def test_compute_passes_matches_direct_logits(model, passes_results, variant):
    """Gold log-probs, entropy and (when asked) log softmax(z_p − z_c)[y] equal those of the full logits, also under
    a soft-capped head (the contrast is then of the capped logits: not a linear function of the hidden states)."""
    passes = passes_results[variant]
    d = direct(model, [EX1, EX2])
    if variant.startswith("softcap"):
        assert np.abs(d[0][0]).max() > 4.0  # the cap (2.0) is active
        d = [(2.0 * np.tanh(zp / 2.0), 2.0 * np.tanh(zc / 2.0), ids) for zp, zc, ids in d]
    assert np.all(np.isfinite(passes.p.logp)) and np.all(np.isfinite(passes.c.logp))
    for b, (zp, zc, ids) in enumerate(d):
        n = len(ids)
        np.testing.assert_allclose(passes.p.logp[b, :n], gold_logp(zp, ids), **TOL)
        np.testing.assert_allclose(passes.c.logp[b, :n], gold_logp(zc, ids), **TOL)
        np.testing.assert_allclose(passes.p.entropy[b, :n], entropy(zp), **TOL)
        np.testing.assert_allclose(passes.c.entropy[b, :n], entropy(zc), **TOL)
        if variant.endswith("contrast"):
            np.testing.assert_allclose(passes.contrast[b, :n], gold_logp(zp - zc, ids), **TOL)
        else:
            assert passes.contrast is None
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


def direct_tokens(examples, personal):
    """The examples' personalized (or counterfactual) sequences, right-filled to DIRECT_LEN in one [n, DIRECT_LEN]
    array, and the (row, position) pairs predicting each response token, in the order of ``direct``."""
    toks = np.zeros((len(examples), DIRECT_LEN), np.int32)
    rows = []
    for b, ex in enumerate(examples):
        prompt = ex.prompt_ids if personal else ex.prompt_no_profile_ids
        seq = list(prompt) + list(ex.response_ids[:-1])
        toks[b, :len(seq)] = seq
        rows += [(b, len(prompt) - 1 + t) for t in range(len(ex.response_ids))]
    return jnp.asarray(toks), np.asarray(rows)


@pytest.fixture(scope="module")
def head_grads(model, batch):
    """Gradients w.r.t. the LM head (differentiating only the head keeps compile short), in one jitted function:
    of PerCE and NextQuill through ``evaluate``, of the same losses written directly on the model's full logits
    (no segment ids, index arrays or chunking) with the weights as numpy constants, of NextQuill's reference with
    the counterfactual logits held constant, and of Σ counterfactual log-probs from ``compute_passes`` without and
    with ``counterfactual_grad``."""
    d = direct(model, [EX1, EX2])
    lp_p = np.concatenate([gold_logp(zp, ids) for zp, _, ids in d])
    lp_c = np.concatenate([gold_logp(zc, ids) for _, zc, ids in d])
    w_perce = jnp.asarray(np.clip(lp_p - lp_c, 0.8, 5.0), jnp.float32)
    omega = jnp.asarray(np.where(np.exp(lp_p) - np.exp(lp_c) > 0.05, 0.9, 0.1), jnp.float32)
    ids = jnp.asarray(np.concatenate([ex.response_ids for ex in (EX1, EX2)]))
    (toks_p, rows_p), (toks_c, rows_c) = direct_tokens([EX1, EX2], True), direct_tokens([EX1, EX2], False)
    graphdef, head_state, rest = nnx.split(model, nnx.PathContains("lm_head"), ...)
    assert len(jax.tree.leaves(head_state)) == 1
    n = float(len(ids))
    assert n == 7

    def gold(z):
        return jax.nn.log_softmax(z, -1)[jnp.arange(len(ids)), ids]

    def lib(obj):
        return lambda hs: losses.total_loss(evaluate(obj, nnx.merge(graphdef, hs, rest), batch, chunk_size=CHUNK))

    def direct_logits(hs):
        m = nnx.merge(graphdef, hs, rest)
        return m(toks_p)[rows_p[:, 0], rows_p[:, 1]], m(toks_c)[rows_c[:, 0], rows_c[:, 1]]

    def perce_reference(hs):
        zp, _ = direct_logits(hs)
        return jnp.sum(w_perce * -gold(zp)) / n

    def nextquill_reference(hs, cut_c=False):
        zp, zc = direct_logits(hs)
        zc = jax.lax.stop_gradient(zc) if cut_c else zc
        return jnp.sum(omega * -gold(zp)) / jnp.sum(omega) + 0.1 * jnp.mean(-gold(zp - zc))

    def c_logp_sum(req):
        return lambda hs: jnp.sum(compute_passes(nnx.merge(graphdef, hs, rest), batch, req, CHUNK).c.logp)

    fns = {"perce": lib(PerCE()), "perce_ref": perce_reference,
           "nextquill": lib(NextQuill()), "nextquill_ref": nextquill_reference,
           "nextquill_ref_cut_c": functools.partial(nextquill_reference, cut_c=True),
           "c_no_grad": c_logp_sum(Requirements(counterfactual=True)),
           "c_grad": c_logp_sum(Requirements(counterfactual=True, counterfactual_grad=True))}
    grads = fast_jit(lambda hs: {k: jax.grad(f)(hs) for k, f in fns.items()})(head_state)
    return {k: np.asarray(jax.tree.leaves(g)[0]) for k, g in grads.items()}


def test_perce_gradient_end_to_end(head_grads):
    """Gradient w.r.t. the LM head == gradient of Σ w·nll / n with w a numpy constant (stop-gradient is real, and
    the chunked log-prob gradient is that of the full softmax)."""
    a, b = head_grads["perce"], head_grads["perce_ref"]
    assert float(np.abs(b).max()) > 1e-3
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_nextquill_gradient_end_to_end(head_grads):
    """Gradient w.r.t. the LM head == that of L_n + α·L_p on the full logits with ω a numpy constant, the gradient
    flowing through BOTH passes (the part through the counterfactual pass is not negligible on this batch)."""
    a, b, cut = head_grads["nextquill"], head_grads["nextquill_ref"], head_grads["nextquill_ref_cut_c"]
    assert float(np.abs(b).max()) > 1e-3
    assert float(np.abs(b - cut).max()) > 1e-3
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_counterfactual_pass_is_cut_without_counterfactual_grad(head_grads):
    assert np.all(head_grads["c_no_grad"] == 0.0)
    assert float(np.abs(head_grads["c_grad"]).max()) > 1e-3


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
    clip_min = PerCE().clip_min
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
