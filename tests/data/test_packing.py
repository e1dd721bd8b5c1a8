"""Packing with fixed shapes and lookahead: one compiled shape, every example once, less padding with lookahead,
exact resume with a pending pool, and config errors that name the key."""

from __future__ import annotations

import json
import random
import types

import grain
import numpy as np
import pytest

from percausal_jax.config import RunConfig, load_config
from percausal_jax.data.featurize import Dropped, FeaturizeConfig, Kept
from percausal_jax.data.pairing import PairedExample, shape_of
from percausal_jax.data.pipeline import PairedBatchIterator
from percausal_jax.data.shapes import Buckets, Packing, check_packing
from percausal_jax.data.rows import RowLayout
from percausal_jax.errors import UserError
from tests.data.test_pipeline import RECORDS, assert_same_batches, expected_examples, iterator, take, unpack

CAP = (256, 192, 64)  # CFG admits sequences of 128 + 32 - 1 = 159 tokens and 32 response slots


def packed(**kwargs):
    lens = dict(zip(("pack_personal_len", "pack_counterfactual_len", "pack_response_len"), CAP))
    return iterator(packing=True, **{**lens, **kwargs})


def synthetic(n: int, seed: int = 0, drop_every: int = 0) -> list:
    """Kept items with a large length variance (mostly short, some near the row capacity); the first prompt token
    is the example's number + 1, so every example is identifiable."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        p = rng.randint(2, 12) if rng.random() < 0.7 else rng.randint(60, 100)
        q = rng.randint(1, max(1, p // 3))
        r = rng.randint(1, 24)

        def ids(k):
            return tuple(rng.randrange(1, 1000) for _ in range(k))

        items.append(Kept(PairedExample((i + 1,) + ids(p - 1), ids(q), ids(r)), rng.randint(0, 3)))
        if drop_every and i % drop_every == 0:
            items.append(Dropped("prompt_too_long"))
    return items


def synthetic_iterator(items, lookahead: int, batch: int = 4, cap=(128, 64, 48), epochs: int | None = 1):
    parent = iter(grain.MapDataset.source(items).repeat(epochs).to_iter_dataset())
    buckets = Buckets((128,), (128,), (64,))
    return PairedBatchIterator(parent, batch, buckets, Packing(*cap, lookahead=lookahead))


def pad_over_real(batches) -> float:
    real = sum(int((b.personal.segment_ids != 0).sum() + (b.counterfactual.segment_ids != 0).sum()
                   + (b.response.weight != 0).sum()) for b in batches)
    slots = sum(b.personal.tokens.size + b.counterfactual.tokens.size + b.response.ids.size for b in batches)
    return (slots - real) / real


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lookahead", [0, 8])
def test_packed_batches_always_have_the_capacity_shape(lookahead):
    batches = list(packed(shuffle=False, pack_lookahead=lookahead))
    assert batches and {shape_of(b) for b in batches} == {CAP}  # the last, partly empty batch too
    assert all(b.personal.tokens.shape[0] == 4 for b in batches)
    derived = list(iterator(packing=True, shuffle=False))  # 0 = the largest bucket boundary, as before
    assert {shape_of(b) for b in derived} == {(160, 160, 32)}


@pytest.mark.parametrize("lookahead", [0, 3, 16, 1000])
def test_every_example_appears_exactly_once_per_epoch(lookahead):
    it = packed(pack_lookahead=lookahead)
    seen = [ex for b in it for ex in unpack(b)]  # unpack checks the pairing contract in every segment
    assert sorted(seen) == sorted(expected_examples(RECORDS))
    assert it.featurize_stats.kept == len(seen) and not it._pending
    items = synthetic(300, drop_every=7)
    it = synthetic_iterator(items, lookahead)
    firsts = [ex[0][0] for b in it for ex in unpack(b)]
    assert sorted(firsts) == list(range(1, 301))
    assert it.featurize_stats.kept == 300 and it.featurize_stats.dropped["prompt_too_long"] == 43


def test_lookahead_fills_gaps_with_later_examples():
    def ex(n):  # personal length n, counterfactual 1, response 1
        return Kept(PairedExample(tuple(range(1, n + 1)), (1,), (2,)), 0)

    items = [ex(6), ex(6), ex(4)]
    rows = {}
    for lookahead in (0, 4):
        parent = iter(grain.MapDataset.source(items).to_iter_dataset())
        it = PairedBatchIterator(parent, 1, Buckets((16,), (16,), (16,)), Packing(10, 4, 4, lookahead=lookahead))
        rows[lookahead] = [sorted(np.bincount(b.personal.segment_ids[0])[1:].tolist()) for b in it]
    assert rows[0] == [[6], [4, 6]]  # first fit in reading order closes at the first misfit
    assert rows[4] == [[4, 6], [6]]  # the pool lets the short third example fill the first row's gap


def test_lookahead_pads_less_on_a_high_variance_length_mix():
    items = synthetic(400, seed=1)
    without = pad_over_real(list(synthetic_iterator(items, 0)))
    with_ = pad_over_real(list(synthetic_iterator(items, 32)))
    assert with_ < without - 0.1 and with_ < 0.8 * without, (with_, without)


def test_state_with_a_pending_pool_restores_exactly_into_a_fresh_iterator():
    it = packed(num_epochs=None, pack_lookahead=8)
    take(it, 4)
    state = json.loads(json.dumps(it.get_state()))  # JSON only: the pool's token ids are plain ints
    assert len(state["pending"]) == 8
    assert all(type(i) is int for k in state["pending"] for key in ("prompt_ids", "response_ids") for i in k[key])
    expected = take(it, 12)  # crosses the epoch boundary
    fresh = packed(num_epochs=None, pack_lookahead=8)
    fresh.set_state(state)
    assert_same_batches(take(fresh, 12), expected)
    assert fresh.get_state() == it.get_state()
    assert fresh.featurize_stats == it.featurize_stats and fresh.padding == it.padding
    # the same at the end of a finite pipeline, on synthetic items with drops in between
    items = synthetic(120, seed=2, drop_every=5)
    straight = list(synthetic_iterator(items, 16, epochs=2))
    it = synthetic_iterator(items, 16, epochs=2)
    head = take(it, len(straight) - 3)
    fresh = synthetic_iterator(items, 16, epochs=2)
    fresh.set_state(json.loads(json.dumps(it.get_state())))
    assert_same_batches(head + list(fresh), straight)


def test_capacity_and_lookahead_errors_name_the_key():
    with pytest.raises(UserError, match=r"data\.pack_personal_len=100: .*159 tokens"):
        packed(pack_personal_len=100)
    with pytest.raises(UserError, match=r"data\.pack_counterfactual_len=64: .*159 tokens"):
        packed(pack_counterfactual_len=64)
    with pytest.raises(UserError, match=r"data\.pack_response_len=16: .*32 tokens"):
        packed(pack_response_len=16)
    with pytest.raises(UserError, match=r"data\.pack_response_len=-1: expected 0 .* or an integer >= 32"):
        check_packing(128, 32, response=-1)
    with pytest.raises(UserError, match=r"data\.pack_lookahead=-2"):
        packed(pack_lookahead=-2)
    # from a config: the error comes when the config is read, before any model or data
    cfg = load_config("configs/tiny.py", ["--config.data.pack_counterfactual_len=64"])  # 96 + 48 - 1 = 143
    with pytest.raises(UserError, match=r"data\.pack_counterfactual_len=64: .*143 tokens"):
        RunConfig.from_config(cfg)
    # an example that fits no empty row (a capacity built past the check) is an error, not a silent stop
    too_long = Kept(PairedExample(tuple(range(1, 10)), (1,), (2,)), 0)  # personal 9 > 8
    parent = iter(grain.MapDataset.source(synthetic(2) + [too_long]).to_iter_dataset())
    with pytest.raises(UserError, match="does not fit an empty packed row"):
        list(PairedBatchIterator(parent, 2, Buckets((8,), (8,), (8,)), Packing(8, 8, 8)))


def test_the_run_passes_the_packing_keys_to_the_pipeline(monkeypatch):
    from percausal_jax.training import setup

    cfg = load_config("configs/tiny.py", ["--config.data.packing=true", "--config.data.pack_personal_len=288",
                                          "--config.data.pack_counterfactual_len=160",
                                          "--config.data.pack_response_len=64", "--config.data.pack_lookahead=5"])
    rc = RunConfig.from_config(cfg)
    got = {}
    monkeypatch.setattr(setup, "make_iterator", lambda *a, **kw: got.update(kw))
    monkeypatch.setattr(setup, "ProcessRows", lambda blocks, rows: blocks)
    run = types.SimpleNamespace(config=rc, tokenizer=None, featurize_config=rc.data.featurize(rc.seed),
                                contriever=None, row_layout=lambda: RowLayout(4, 1, 0, (0,), ((0,),), ()))
    setup.Run.data_iterator(run, RECORDS)
    assert {k: got[k] for k in ("packing", "pack_personal_len", "pack_counterfactual_len", "pack_response_len",
                                "pack_lookahead")} == {"packing": True, "pack_personal_len": 288,
                                                       "pack_counterfactual_len": 160, "pack_response_len": 64,
                                                       "pack_lookahead": 5}


def test_derived_capacity_follows_explicit_buckets():
    fcfg = FeaturizeConfig(max_prompt_len=40, max_response_len=8)
    pack = Packing.derive(fcfg, Buckets((16, 48), (24, 64), (8, 12)), counterfactual=100, lookahead=3)
    assert pack == Packing(48, 100, 12, lookahead=3)
