"""`accumulate` on its own: k micro-batches divided by the global normalizer give exactly the full-batch gradient.

The reference is ``jax.grad`` of ``total_loss(passes.evaluate(...))`` on the whole batch, computed directly (no
micro-batches, no accumulate). One jitted function per k evaluates CE, PerCE and NextQuill together, so only four
programs are compiled (k = 1, 2, 4 and the reference).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import percausal_jax as pj
from percausal_jax.data.pairing import PairedExample, collate
from percausal_jax.objectives import CE, NextQuill, PerCE, Targets, evaluate, total_loss
from percausal_jax.training.accumulate import accumulate, split_micro
from tests.helpers import tiny_hf_model

VOCAB = 128
OBJECTIVES = {"ce": CE(), "perce": PerCE(), "nextquill": NextQuill()}
CHUNK = 48  # vocabulary chunk of the gold log-prob head (several chunks, one partial)


def _examples(n=8, seed=7):
    rs = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        p = rs.randint(3, VOCAB, rs.randint(5, 13)).tolist()
        c = p[-rs.randint(2, 5):]
        r = rs.randint(3, VOCAB, rs.randint(2, 8)).tolist() + [2]  # response lengths differ: mean of means != mean
        out.append(PairedExample(tuple(p), tuple(c), tuple(r)))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("acc_model")
    tiny_hf_model("llama", d, vocab_size=VOCAB, num_hidden_layers=1)
    model = pj.load_pretrained(d)
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    batch = jax.tree.map(jnp.asarray, collate([[e] for e in _examples()], 24, 16, 8))
    return graphdef, params, frozen, batch


def _model(graphdef, params, frozen):
    return nnx.merge(graphdef, params, frozen)


def _grad_fn(graphdef, frozen, objective):
    """value_and_grad(params, micro_batch, normalizer) -> ((loss, Result), grads), as accumulate expects."""
    def loss_fn(params, mb, norm):
        res = evaluate(objective, _model(graphdef, params, frozen), mb, chunk_size=CHUNK)
        denom = jax.lax.stop_gradient(res.normalizer if norm is None else norm)
        return jnp.sum(res.loss_sum / jnp.maximum(denom, 1e-12)), res

    return jax.value_and_grad(loss_fn, has_aux=True)


def _global_normalizer(graphdef, frozen, objective, params, micro):
    """CE / PerCE: from the data; NextQuill: Σ over micro-batches of the forward pass's Result normalizers."""
    norm = objective.data_normalizer(Targets.of(micro))
    if norm is not None:
        return norm
    return jax.lax.map(lambda mb: evaluate(objective, _model(graphdef, params, frozen), mb,
                                           chunk_size=CHUNK).normalizer, micro).sum(0)


@pytest.fixture(scope="module")
def reference(setup):
    graphdef, params, frozen, batch = setup

    @jax.jit
    def full(params, batch):
        out = {}
        for name, obj in OBJECTIVES.items():
            def loss(p, obj=obj):
                res = evaluate(obj, _model(graphdef, p, frozen), batch, chunk_size=CHUNK)
                return total_loss(res), res.normalizer

            (value, norm), grads = jax.value_and_grad(loss, has_aux=True)(params)
            out[name] = (value, grads, norm)
        return out

    return jax.device_get(full(params, batch))


_ACCUMULATED = {}


def _accumulated(setup, k):
    """{objective: (loss, grads, normalizer)} from accumulate over k micro-batches: one jitted program per k."""
    if k not in _ACCUMULATED:
        graphdef, params, frozen, batch = setup

        @jax.jit
        def run(params, batch):
            micro = split_micro(batch, k)
            out = {}
            for name, obj in OBJECTIVES.items():
                norm = _global_normalizer(graphdef, frozen, obj, params, micro)
                loss, grads, _, used = accumulate(_grad_fn(graphdef, frozen, obj), params, micro, norm)
                out[name] = (loss, grads, used)
            if k == 4:  # the mean of per-micro-batch means, which exact accumulation must NOT equal
                def naive(mb):
                    return total_loss(evaluate(OBJECTIVES["ce"], _model(graphdef, params, frozen), mb,
                                               chunk_size=CHUNK))
                out["ce_mean_of_means"] = jax.lax.map(naive, micro).mean()
            return out

        _ACCUMULATED[k] = jax.device_get(run(params, batch))
    return _ACCUMULATED[k]


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_accumulate_equals_full_batch_gradient(setup, reference, name, k):
    ref_loss, ref_grads, ref_norm = reference[name]
    loss, grads, norm = _accumulated(setup, k)[name]
    np.testing.assert_allclose(np.asarray(norm), np.asarray(ref_norm), rtol=1e-6)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    flat_ref = dict(nnx.to_flat_state(ref_grads))
    flat = dict(nnx.to_flat_state(grads))
    assert flat.keys() == flat_ref.keys()
    biggest = 0.0
    for path, g in flat_ref.items():
        g = np.asarray(g[...])
        np.testing.assert_allclose(np.asarray(flat[path][...]), g, rtol=2e-4, atol=2e-6, err_msg=str(path))
        biggest = max(biggest, float(np.abs(g).max()))
    assert biggest > 1e-3  # a real gradient, not zeros compared with zeros


def test_mean_of_means_differs_from_the_full_batch_loss(setup, reference):
    """The batch is such that dividing per micro-batch would be detected by the test above."""
    naive = float(_accumulated(setup, 4)["ce_mean_of_means"])
    assert abs(naive - float(reference["ce"][0])) > 1e-3


def test_several_micro_batches_need_a_normalizer(setup):
    graphdef, params, frozen, batch = setup
    with pytest.raises(ValueError, match="global normalizer"):
        accumulate(_grad_fn(graphdef, frozen, OBJECTIVES["ce"]), params, split_micro(batch, 2), None)


@pytest.mark.parametrize("k", [2, 4])
def test_split_micro_puts_row_i_in_micro_batch_i_mod_k(setup, k):
    *_, batch = setup
    rows = batch.response.ids.shape[0]
    tree = {"rows": np.arange(rows, dtype=np.int32), "grid": np.arange(rows * 3, dtype=np.int32).reshape(rows, 3)}
    micro = split_micro(tree, k)
    assert micro["rows"].shape == (k, rows // k) and micro["grid"].shape == (k, rows // k, 3)
    for i in range(rows):
        assert int(micro["rows"][i % k, i // k]) == i
        np.testing.assert_array_equal(np.asarray(micro["grid"][i % k, i // k]), tree["grid"][i])
    mb = split_micro(batch, k)  # the PairedBatch pytree: every leaf split the same way
    for full, split in zip(jax.tree.leaves(batch), jax.tree.leaves(mb)):
        assert split.shape == (k, rows // k, *full.shape[1:])
        for i in range(rows):
            np.testing.assert_array_equal(np.asarray(split[i % k, i // k]), np.asarray(full[i]))


# ------------------------------------------------------------------------------------------ batch-relative methods
# LossCE selects its top tokens and EntCE takes its mean entropy within each micro-batch (as Rho-1 / EntCE do), so
# accumulation is compared with the per-micro-batch computation written out here in numpy.


def _per_token(setup, ref_params):
    """gold log-probs and entropies of the whole batch (trained and reference parameters), numpy [B, R]."""
    from percausal_jax.objectives import Requirements, compute_passes

    graphdef, params, frozen, batch = setup
    req = Requirements(entropy=True)

    @jax.jit
    def f(p, rp):
        x = compute_passes(_model(graphdef, p, frozen), batch, req, CHUNK)
        r = compute_passes(_model(graphdef, rp, frozen), batch, req, CHUNK)
        return x.p.logp, x.p.entropy, r.p.logp

    return [np.asarray(a, np.float64) for a in f(params, ref_params)]


def _micro_rows(rows, k):
    return [np.arange(rows)[np.arange(rows) % k == i] for i in range(k)]  # row i in micro-batch i mod k


@pytest.mark.parametrize("name", ["lossce", "entce"])
def test_batch_relative_objectives_accumulate_per_micro_batch(setup, name):
    from percausal_jax.objectives import EntCE, LossCE

    graphdef, params, frozen, batch = setup
    rng = np.random.RandomState(0)
    ref_params = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(size=x.shape) * 0.05, x.dtype), params)
    logp, ent, ref_logp = _per_token(setup, ref_params)
    w = np.asarray(batch.response.weight, np.float64)
    nll = -logp
    k = 2
    num = den = 0.0
    for rows in _micro_rows(w.shape[0], k):
        mw, mnll = w[rows], nll[rows]
        if name == "lossce":  # top ceil(0.6·n) tokens of this micro-batch by excess loss
            excess = np.where(mw > 0, mnll + ref_logp[rows], -np.inf).reshape(-1)
            keep = int(np.ceil(0.6 * mw.sum() - 1e-9))
            chosen = np.argsort(-excess, kind="stable")[:keep]
            num += mnll.reshape(-1)[chosen].sum()
            den += keep
        else:  # weights from this micro-batch's mean entropy, capped at 5
            mh = ent[rows]
            weights = np.minimum(mh / ((mw * mh).sum() / mw.sum()), 5.0)
            num += (mw * weights * mnll).sum()
            den += mw.sum()
    obj = LossCE() if name == "lossce" else EntCE()
    fn = _grad_fn_ref(graphdef, frozen, obj, ref_params)

    @jax.jit
    def run(params, batch):
        micro = split_micro(batch, k)
        loss, _, _, norm = accumulate(fn, params, micro, obj.data_normalizer(Targets.of(micro)))
        full = total_loss(evaluate(obj, _model(graphdef, params, frozen), batch, _model(graphdef, ref_params, frozen),
                                   CHUNK))
        return loss, norm, full

    loss, norm, full = jax.device_get(run(params, batch))
    np.testing.assert_allclose(float(np.sum(norm)), den)
    assert float(loss) == pytest.approx(num / den, rel=1e-5)
    assert abs(float(full) - num / den) > 1e-5  # batch-relative: one micro-batch is not the whole batch


def _grad_fn_ref(graphdef, frozen, objective, ref_params):
    def loss_fn(params, mb, norm):
        res = evaluate(objective, _model(graphdef, params, frozen), mb, _model(graphdef, ref_params, frozen), CHUNK)
        return jnp.sum(res.loss_sum / jnp.maximum(jax.lax.stop_gradient(norm), 1e-12)), res

    return jax.value_and_grad(loss_fn, has_aux=True)
