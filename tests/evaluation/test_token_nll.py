"""Personal / generic token NLL: the overlap rule, the classes the featurizer writes, and the periodic eval's sums
against an independent PyTorch computation on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from percausal_jax.data.featurize import FeaturizeConfig, Featurizer
from percausal_jax.data.pairing import collate, empty_batch
from percausal_jax.data.pipeline import _kept_from_json, _kept_to_json
from percausal_jax.evaluation.token_nll import (GENERIC, PERSONAL, add_sums, char_offsets, class_means, class_sums,
                                                classify, response_classes)
from tests.helpers import tiny_hf_model, tiny_tokenizer
from tests.training.common import RECORDS

# spans of the planted pieces in RECORDS' completions ("A glimmerous lamp. Stay zesty!", ...)
SPANS = [[[2, 12], [19, 29]], [[4, 11]], [], [[17, 36]]]


def _decode_offsets(tok, ids):
    """The identification benchmark's offsets: by decoding prefixes."""
    out, prev = [], 0
    for i in range(len(ids)):
        cur = len(tok.decode(list(ids[:i + 1])))
        out.append((prev, cur))
        prev = cur
    return out


class _Slow:
    """A tokenizer without an offset mapping (decode-prefix fallback)."""

    is_fast = False

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids):
        return self.tok.decode(ids)


def test_overlap_rule_end_tokens_and_truncation():
    assert classify([(0, 2), (2, 5), (5, 9), (9, 10)], [[3, 6]]) == [GENERIC, PERSONAL, PERSONAL, GENERIC]
    assert classify([(0, 3)], [[3, 4]]) == [GENERIC]  # touching is not overlapping: [a, b) ∩ [s, e) empty
    tok = tiny_tokenizer()
    text = RECORDS[0]["completion"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    full = response_classes(tok, text, ids, len(ids) + 1, SPANS[0])
    assert full[-1] == GENERIC and PERSONAL in full  # the appended end token is generic
    assert response_classes(tok, text, ids, 3, SPANS[0]) == full[:3]  # truncated response: its first classes
    assert response_classes(tok, text, ids, len(ids) + 1, None) is None  # no spans: unclassified
    assert set(response_classes(tok, text, ids, len(ids) + 1, [])) == {GENERIC}  # spans covering nothing
    for r in RECORDS:  # the fast tokenizer's offsets agree with the benchmark's decode-prefix offsets
        ids = tok(r["completion"], add_special_tokens=False)["input_ids"]
        assert char_offsets(tok, r["completion"], ids) == _decode_offsets(tok, ids)
        assert char_offsets(_Slow(tok), r["completion"], ids) == _decode_offsets(tok, ids)


def test_class_sums_and_means():
    logp = np.log(np.array([[0.5, 0.25, 0.1], [0.2, 1.0, 1.0]]))
    weight = np.array([[1, 1, 1], [1, 0, 0]], np.float32)
    cls = np.array([[PERSONAL, GENERIC, PERSONAL], [GENERIC, PERSONAL, 0]])
    total = add_sums(None, class_sums(logp, weight, cls))
    total = add_sums(total, class_sums(logp, weight, cls))  # two batches: sums, not a mean of means
    m = class_means(total, prefix="eval_")
    assert m["eval_tokens_personal"] == 4 and m["eval_tokens_generic"] == 4  # padding (weight 0) never counts
    np.testing.assert_allclose(m["eval_nll_personal"], -(np.log(0.5) + np.log(0.1)) / 2)
    np.testing.assert_allclose(m["eval_nll_generic"], -(np.log(0.25) + np.log(0.2)) / 2)
    assert class_means(add_sums(None, class_sums(logp, weight, np.zeros_like(cls)))) == {}  # unclassified
    generic_only = class_means(add_sums(None, class_sums(logp, weight, np.full_like(cls, GENERIC))))
    assert generic_only["tokens_personal"] == 0 and "nll_personal" not in generic_only


def test_featurizer_writes_classes_into_the_batch():
    tok = tiny_tokenizer()
    feat = Featurizer(tok, FeaturizeConfig())
    with_spans = feat({**RECORDS[0], "personal_spans": SPANS[0]})
    without = feat(RECORDS[0])
    assert without.example.response_class is None
    ex = with_spans.example
    ids = ex.response_ids[:-1]
    expected = [PERSONAL if any(a < e and s < b for s, e in SPANS[0]) else GENERIC
                for a, b in _decode_offsets(tok, ids)] + [GENERIC]
    assert list(ex.response_class) == expected
    assert _kept_from_json(_kept_to_json(with_spans)) == with_spans  # a packing pool's saved state keeps them
    assert _kept_from_json(_kept_to_json(without)) == without
    batch = collate([[ex, without.example], []], 256, 128, 64)
    n = len(ex.response_ids)
    assert list(batch.response.token_class[0, :n]) == expected
    assert not batch.response.token_class[0, n:].any() and not batch.response.token_class[1].any()
    assert not empty_batch(2).response.token_class.any()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from percausal_jax.config import RunConfig, load_config
    from percausal_jax.training import setup

    d = tmp_path_factory.mktemp("token_nll")
    torch_model = tiny_hf_model("llama", d)
    tiny_tokenizer(d)
    rc = RunConfig.from_config(load_config("configs/tiny.py", [
        f"--config.model.path={d}", "--config.objective.name=perce", "--config.train.grad_accum_steps=1",
        "--config.data.eval=eval.jsonl", "--config.train.global_batch_size=2", "--config.mesh.fsdp=2",
        "--config.mesh.tensor=4"]))
    run = setup.build(rc)
    return run, run.eval_step(), torch_model


def _loop_eval(run, eval_step, records):
    from percausal_jax.training.loop import evaluate

    return evaluate(run, records, run.params, None, eval_step)


def test_eval_split_matches_pytorch(tiny_run):
    import torch

    run, eval_step, torch_model = tiny_run
    tok = run.tokenizer
    records = [{**r, "personal_spans": s} for r, s in zip(RECORDS, SPANS)]
    out = _loop_eval(run, eval_step, records)  # 4 records in 2 batches of 2
    sums = {PERSONAL: [0.0, 0], GENERIC: [0.0, 0]}
    for r in records:  # independently: the untrained run is the torch model (full fine-tuning, no LoRA)
        prompt = tok(r["prompt"])["input_ids"]
        text_ids = tok(r["completion"], add_special_tokens=False)["input_ids"]
        response = text_ids + [tok.eos_token_id]
        with torch.no_grad():
            logits = torch_model(torch.tensor([prompt + response[:-1]])).logits[0]
        logp = torch.log_softmax(logits.double(), -1)[len(prompt) - 1:].gather(
            1, torch.tensor(response)[:, None])[:, 0].numpy()
        classes = [PERSONAL if any(a < e and s < b for s, e in r["personal_spans"]) else GENERIC
                   for a, b in _decode_offsets(tok, text_ids)] + [GENERIC]
        for lp, c in zip(logp, classes):
            sums[c][0] -= lp
            sums[c][1] += 1
    assert out["eval_tokens_personal"] == sums[PERSONAL][1] > 0 and out["eval_tokens_generic"] == sums[GENERIC][1]
    np.testing.assert_allclose(out["eval_nll_personal"], sums[PERSONAL][0] / sums[PERSONAL][1], rtol=1e-4)
    np.testing.assert_allclose(out["eval_nll_generic"], sums[GENERIC][0] / sums[GENERIC][1], rtol=1e-4)
    # the two classes partition the eval tokens: Σ over classes = eval_nll × eval_tokens
    assert out["eval_tokens_personal"] + out["eval_tokens_generic"] == out["eval_tokens"]
    np.testing.assert_allclose(out["eval_nll_personal"] * out["eval_tokens_personal"]
                               + out["eval_nll_generic"] * out["eval_tokens_generic"],
                               out["eval_nll"] * out["eval_tokens"], rtol=1e-5)

    empty = _loop_eval(run, eval_step, [{**r, "personal_spans": []} for r in RECORDS])  # spans cover nothing
    assert empty["eval_tokens_personal"] == 0 and "eval_nll_personal" not in empty
    assert empty["eval_tokens_generic"] == empty["eval_tokens"]
    np.testing.assert_allclose(empty["eval_nll_generic"], empty["eval_nll"], rtol=1e-6)
    plain = _loop_eval(run, eval_step, RECORDS)  # no spans: no keys
    assert set(plain) == {"eval_loss", "eval_nll", "eval_tokens"}
    np.testing.assert_allclose(plain["eval_nll"], out["eval_nll"], rtol=1e-6)
