"""NextQuill ``per_sequence`` against a literal port of the reference ``CustomTrainer3.compute_loss``
(nextquill.md §3/§8): each sequence normalized by its own Σω and its own token count, sequences averaged; one SGD
step equal to PyTorch, the same with gradient accumulation, and packing does not change a sequence's share."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from percausal_jax.data.pairing import collate
from percausal_jax.hf.checkpoint import hf_state_dict
from percausal_jax.objectives import NextQuill, default_config, evaluate, total_loss
from tests.training.test_step import LR, _batch, _examples, _sgd_step


def reference_compute_loss(model, e, alpha=0.1, threshold=0.05, high=0.9, low=0.1):
    """train.py::CustomTrainer3.compute_loss on one example (batch 1), ported line by line: the two inputs share
    the labels; gold-token probabilities of both softmaxes; weights normalized by their own sum; L_p an unweighted
    mean over the response tokens; both passes differentiated."""
    labels = torch.tensor(e.response_ids)
    rows = []
    for prompt in (e.prompt_ids, e.prompt_no_profile_ids):
        seq = torch.tensor([list(prompt) + list(e.response_ids[:-1])])
        rows.append(model(seq).logits[0, len(prompt) - 1:])  # shift_logits at the response positions
    shift_logits, shift_logits1 = rows
    p1 = torch.softmax(shift_logits, -1)[torch.arange(len(labels)), labels]
    p2 = torch.softmax(shift_logits1, -1)[torch.arange(len(labels)), labels]
    weight = torch.where(p1 - p2 > threshold, high, low).detach()
    weight = weight / weight.sum()
    l_p = torch.nn.functional.cross_entropy(shift_logits - shift_logits1, labels)
    l_n = (weight * torch.nn.functional.cross_entropy(shift_logits, labels, reduction="none")).sum()
    return l_n + alpha * l_p


def _per_sequence_cfg():
    cfg = default_config()
    cfg.nextquill.per_sequence = True
    return cfg


def _torch_step(torch_model, examples):
    m = copy.deepcopy(torch_model).train()
    loss = torch.stack([reference_compute_loss(m, e) for e in examples]).mean()  # micro-batches of 1, averaged
    loss.backward()
    with torch.no_grad():
        for p in m.parameters():
            p -= LR * p.grad
    return m, float(loss.detach())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.helpers import tiny_hf_model

    d = tmp_path_factory.mktemp("nq_model")
    return d, tiny_hf_model("llama", d)


@pytest.mark.parametrize("n,k", [(1, 1), (4, 4)])
def test_per_sequence_sgd_step_matches_reference_port(tiny, n, k):
    d, torch_model = tiny
    ex = _examples(n, seed=7)
    ours, metrics, _ = _sgd_step(d, "nextquill", _batch(ex), k=k, obj_cfg=_per_sequence_cfg())
    ref_model, ref_loss = _torch_step(torch_model, ex)
    assert float(metrics["loss"]) == pytest.approx(ref_loss, rel=1e-5)
    ref = {k: v.detach().numpy() for k, v in ref_model.state_dict().items()}
    for name, value in hf_state_dict(ours):
        np.testing.assert_allclose(value, ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
    if n > 1:  # the pooled default differs here: Σω over the batch lets long sequences weigh more
        _, pooled, _ = _sgd_step(d, "nextquill", _batch(ex), k=k)
        assert abs(float(pooled["loss"]) - ref_loss) > 1e-4


def test_packing_keeps_each_sequence_its_own_normalizer(tiny):
    """Two sequences packed in one row give the same per-sequence loss as one per row."""
    import percausal_jax as pj

    d, _ = tiny
    model = pj.load_pretrained(d)
    ex = _examples(4, seed=11)
    rows = collate([[e] for e in ex], 24, 16, 10)
    packed = collate([[ex[0], ex[1]], [ex[2], ex[3]]], 48, 32, 20)
    obj = NextQuill(per_sequence=True)
    f = jax.jit(lambda b: total_loss(evaluate(obj, model, b)))
    a, b = float(f(jax.tree.map(jnp.asarray, rows))), float(f(jax.tree.map(jnp.asarray, packed)))
    assert a == pytest.approx(b, rel=1e-5)
    pooled = jax.jit(lambda b: total_loss(evaluate(NextQuill(), model, b)))(jax.tree.map(jnp.asarray, packed))
    assert abs(float(pooled) - a) > 1e-4
