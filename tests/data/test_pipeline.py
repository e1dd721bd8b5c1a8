"""The Grain pipeline: pairing contract in batches, padding accounting, buckets, packing, determinism, resume
(also through Orbax), per-process shards, drops, sources and errors, global arrays."""

from __future__ import annotations

import json
import random

import grain
import numpy as np
import pytest

from percausal_jax.data.featurize import Dropped, FeaturizeConfig, Featurizer, Kept
from percausal_jax.data.pairing import PairedExample
from percausal_jax.data.pipeline import PairedBatchIterator, make_iterator
from percausal_jax.data.shapes import Buckets, boundaries
from percausal_jax.data.rows import to_global
from percausal_jax.errors import UserError
from tests.data.tokenizer_fixture import make_tokenizer

WORDS = "kettle coffee rain walk great fast mug tea day news review the a of is".split()
CFG = FeaturizeConfig(retriever="recency", k=2, max_prompt_len=128, max_response_len=32)


def tweets(n: int, seed: int = 0) -> list[dict]:
    """LaMP-7-style records of varied lengths; outputs start with a unique "answer {i}"."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        def text(lo, hi):
            return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
        profile = [{"text": text(1, 8), "date": f"2020-01-{d:02d}"} for d in range(1, rng.randint(1, 4))]
        records.append({"id": f"t{i}", "user_id": f"u{i % 5}", "task": "LaMP-7", "input": f"Paraphrase: {text(2, 30)}",
                        "output": f"answer {i}: {text(1, 12)}", "profile": profile})
    return records


RECORDS = tweets(40)


def iterator(**kwargs):
    args = dict(batch_size=4, seed=0, num_epochs=1, bucket_multiple=16)
    return make_iterator(kwargs.pop("source", RECORDS), make_tokenizer(), kwargs.pop("fcfg", CFG), **{**args, **kwargs})


def unpack(batch) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Every example in the batch as (personal seq, counterfactual seq, response ids), checking the contract:
    positions restart per segment, ``tokens[index + 1] == ids`` inside a segment, and index rows predict ids."""
    out = []
    r = batch.response
    for b in range(r.ids.shape[0]):
        seg_of_slot = batch.personal.segment_ids[b, r.index_personal[b]] * (r.weight[b] > 0)
        for seg in range(1, seg_of_slot.max() + 1):
            slots = np.flatnonzero(seg_of_slot == seg)
            ids = r.ids[b, slots]
            assert np.all(r.seq_weight[b, slots] == np.float32(1 / len(slots)))
            seqs = []
            for seq, index in ((batch.personal, r.index_personal), (batch.counterfactual, r.index_counterfactual)):
                cols = np.flatnonzero(seq.segment_ids[b] == seg)
                assert np.array_equal(seq.positions[b, cols], np.arange(len(cols)))  # positions restart at 0
                assert np.array_equal(cols, np.arange(cols[0], cols[0] + len(cols)))  # contiguous
                rows = index[b, slots]
                assert np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows)))
                assert rows[-1] == cols[-1]  # the last input token (the id before EOS) predicts EOS
                assert np.array_equal(seq.tokens[b, rows[:-1] + 1], ids[:-1])  # tokens[index + 1] == ids
                seqs.append(tuple(seq.tokens[b, cols]))
            out.append((seqs[0], seqs[1], tuple(ids)))
    return out


def expected_examples(records, cfg=CFG) -> list[tuple]:
    featurizer = Featurizer(make_tokenizer(), cfg)
    kept = [r.example for r in map(featurizer, records) if isinstance(r, Kept)]
    return [(ex.prompt_ids + ex.response_ids[:-1], ex.prompt_no_profile_ids + ex.response_ids[:-1],
             ex.response_ids) for ex in kept]


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for path, left in _leaves(x):
            assert np.array_equal(left, dict(_leaves(y))[path]), path


def _leaves(batch):
    import jax

    for path, value in jax.tree_util.tree_flatten_with_path(batch)[0]:
        yield jax.tree_util.keystr(path), value


# ---------------------------------------------------------------------------------------------------------------


def test_one_epoch_holds_every_kept_example_once_with_counted_drops():
    it = iterator(shuffle=False)
    batches = list(it)
    seen = [ex for batch in batches for ex in unpack(batch)]
    assert seen == expected_examples(RECORDS)  # unshuffled, unpacked: record order
    featurizer = Featurizer(make_tokenizer(), CFG)
    drops = [r.reason for r in map(featurizer, RECORDS) if isinstance(r, Dropped)]
    too_long = sum(len(make_tokenizer()(r["output"], add_special_tokens=False)["input_ids"]) + 1 > 32
                   for r in RECORDS)
    assert too_long > 0 and drops.count("response_too_long") == too_long
    stats = it.featurize_stats.summary()
    assert stats["kept"] == len(seen) and stats["dropped"] == {"prompt_too_long": 0, "response_too_long": too_long}
    assert stats["kept"] + stats["dropped_total"] == len(RECORDS)
    assert all(b.personal.tokens.shape[0] == 4 for b in batches)  # the last batch is filled with empty rows
    assert len(batches) == -(-len(seen) // 4)


def test_shapes_are_the_smallest_fitting_bucket_boundaries():
    buckets = Buckets.multiples(CFG, 16)
    assert buckets.personal == boundaries(159, 16) == tuple(range(16, 161, 16)) and buckets.response == (16, 32)
    shapes = set()
    for batch in iterator():
        lp, lc, lr = batch.personal.tokens.shape[1], batch.counterfactual.tokens.shape[1], batch.response.ids.shape[1]
        shapes.add((lp, lc, lr))
        used = ((batch.personal.segment_ids != 0).sum(1).max(), (batch.counterfactual.segment_ids != 0).sum(1).max(),
                (batch.response.weight != 0).sum(1).max())
        for length, bounds, n in zip((lp, lc, lr), (buckets.personal, buckets.counterfactual, buckets.response), used):
            assert length in bounds and n <= length and (length == bounds[0] or n > bounds[bounds.index(length) - 1])
    assert len({s[0] for s in shapes}) > 1 and len({s[1] for s in shapes}) > 1  # bucketing, not always the max


def test_padding_accounting_on_a_hand_built_case():
    a = PairedExample((1, 5, 6), (1, 7), (8, 9, 2))  # personal 5, counterfactual 4, response 3
    b = PairedExample((1, 5, 6, 6, 6, 6), (1,), (8, 8, 8, 9, 2))  # personal 10, counterfactual 5, response 5
    c = PairedExample((1, 5), (1, 7), (9, 2))  # personal 3, counterfactual 3, response 2
    items = [Kept(a, 1), Dropped("prompt_too_long"), Kept(b, 0), Kept(c, 2)]
    buckets = Buckets(personal=(8, 16), counterfactual=(8,), response=(4, 8))
    it = PairedBatchIterator(iter(grain.MapDataset.source(items).to_iter_dataset()), 2, buckets, packing=False)
    first, second = list(it)
    assert first.personal.tokens.shape == (2, 16) and first.counterfactual.tokens.shape == (2, 8)
    assert first.response.ids.shape == (2, 8)
    assert second.personal.tokens.shape == (2, 8) and second.response.ids.shape == (2, 4)
    # batch 1: personal 32 slots, 15 used; counterfactual 16, 9; response 16, 8
    # batch 2 (c + an empty row): personal 16, 3; counterfactual 16, 3; response 8, 2
    assert it.padding == {"personal": [17 + 13, 48], "counterfactual": [7 + 13, 32], "response": [8 + 6, 24]}
    assert it.padding_fraction() == {"personal": 30 / 48, "counterfactual": 20 / 32, "response": 14 / 24}
    assert second.response.weight[1].sum() == 0 and second.personal.segment_ids[1].sum() == 0
    assert it.featurize_stats.kept == 3 and it.featurize_stats.dropped == {"prompt_too_long": 1, "response_too_long": 0}
    summary = it.summary()
    assert summary["padding_fraction"]["response"] == 14 / 24 and summary["mean_items_used"] == 1.0


def test_packing_keeps_examples_separate_and_loses_none():
    packed = list(iterator(packing=True, shuffle=False))
    examples = [ex for batch in packed for ex in unpack(batch)]
    assert sorted(examples) == sorted(expected_examples(RECORDS))
    assert max(b.personal.segment_ids.max() for b in packed) >= 2  # some rows really hold several examples
    assert len(packed) < len(list(iterator(shuffle=False)))


def test_same_seed_same_batches_other_seed_other_order():
    assert_same_batches(take(iterator(num_epochs=None), 6), take(iterator(num_epochs=None), 6))
    first = [ex[2] for b in take(iterator(num_epochs=None), 2) for ex in unpack(b)]
    other = [ex[2] for b in take(iterator(num_epochs=None, seed=1), 2) for ex in unpack(b)]
    assert first != other


@pytest.mark.parametrize("packing", [False, True])
def test_state_restores_into_a_fresh_iterator(packing):
    it = iterator(num_epochs=None, packing=packing)
    take(it, 5)
    if packing:
        assert it._pending is not None  # the hard case: an example read but not yet placed
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 12)  # crosses the epoch boundary
    fresh = iterator(num_epochs=None, packing=packing)
    fresh.set_state(state)
    assert_same_batches(take(fresh, 12), expected)
    assert fresh.get_state() == it.get_state()
    assert fresh.featurize_stats == it.featurize_stats and fresh.padding == it.padding


def test_state_round_trips_through_orbax(tmp_path):
    import orbax.checkpoint as ocp

    it = iterator(num_epochs=None, packing=True)
    take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("iter",)) as manager:
        manager.save(3, args=ocp.args.Composite(iter=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = take(it, 4)
    fresh = iterator(num_epochs=None, packing=True)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("iter",)) as manager:
        assert manager.latest_step() == 3
        manager.restore(3, args=ocp.args.Composite(iter=grain.checkpoint.CheckpointRestore(fresh)))
    assert_same_batches(take(fresh, 4), expected)


def test_block_streams_are_disjoint_and_complete():
    shards = [{ex[2] for b in iterator(block=i, num_blocks=2) for ex in unpack(b)} for i in range(2)]
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    assert shards[0] | shards[1] == {ex[2] for ex in expected_examples(RECORDS)}


def test_two_blocks_hold_the_one_block_global_batch_row_for_row():
    """Block i reads the i-th run of rows of each global batch, so the global batch (blocks' rows concatenated in
    block order) holds the one-block batch's rows in the same places (nothing dropped, bucketing)."""
    fcfg = FeaturizeConfig(retriever="recency", k=2, max_prompt_len=512, max_response_len=64)  # nothing dropped
    one = take(iterator(num_epochs=None, batch_size=4, fcfg=fcfg), 5)
    parts = [take(iterator(num_epochs=None, batch_size=2, block=i, num_blocks=2, fcfg=fcfg), 5)
             for i in range(2)]
    for step, batch in enumerate(one):
        assert unpack(batch) == unpack(parts[0][step]) + unpack(parts[1][step])


def test_block_shards_of_a_finite_stream_are_disjoint_complete_and_in_order():
    from percausal_jax.data.rows import BlockShard

    ds = grain.MapDataset.source(list(range(11)))
    shards = [list(BlockShard(ds, 2, i, 3)) for i in range(3)]
    assert shards == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10]]


def test_file_sources(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = tmp_path / "tweets.array_record"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for record in RECORDS[:8]:
        writer.write(json.dumps(record).encode())
    writer.close()
    got = [ex for b in iterator(source=path, shuffle=False) for ex in unpack(b)]
    assert got == expected_examples(RECORDS[:8])
    jsonl = tmp_path / "tweets.jsonl"
    jsonl.write_text("".join(json.dumps(record) + "\n" for record in RECORDS[8:16]))
    got = [ex for b in iterator(source=jsonl, shuffle=False) for ex in unpack(b)]
    assert got == expected_examples(RECORDS[8:16])


def test_bad_sources_and_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="missing.array_record: no such file"):
        iterator(source=tmp_path / "missing.array_record")
    with pytest.raises(UserError, match=r"<records>:2: field 'output': expected a non-empty string"):
        list(iterator(source=[RECORDS[0], {**RECORDS[1], "output": ""}], shuffle=False))
    with pytest.raises(UserError, match=r"src:1: not a JSON record"):
        from percausal_jax.data.pipeline import JsonRecords
        JsonRecords([b"{oops"], "src")[0]
    with pytest.raises(UserError, match="set max_prompt_len and max_response_len"):
        iterator(fcfg=FeaturizeConfig())
    with pytest.raises(UserError, match=r"response bucket boundaries \(16,\): the largest must be >= 32"):
        iterator(buckets=Buckets((160,), (160,), (16,)))
    with pytest.raises(UserError, match="batch_size 0"):
        iterator(batch_size=0)
    with pytest.raises(UserError, match="row block 2 of 2"):
        iterator(block=2, num_blocks=2)


def test_to_global_shards_rows_over_data_and_fsdp():
    import jax
    from jax.sharding import Mesh, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    batch = next(iterator())
    arrays = to_global(batch, mesh)
    tokens = arrays.personal.tokens
    assert tokens.shape == batch.personal.tokens.shape
    assert tokens.sharding.spec == PartitionSpec(("data", "fsdp"))
    assert sorted({s.index[0].start for s in tokens.addressable_shards}) == [0, 1, 2, 3]  # replicated on "tensor"
    assert np.array_equal(np.asarray(arrays.response.weight), batch.response.weight)
    with pytest.raises(ValueError, match=r"batch axes \['fsdp'\] are not mesh axes"):
        to_global(batch, Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model")))


@pytest.mark.slow  # starts a worker process (a few seconds)
def test_worker_processes_give_the_same_batches_and_resume():
    it = iterator(num_epochs=None, worker_count=1)
    first = take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    rest = take(it, 2)
    assert_same_batches(first + rest, take(iterator(num_epochs=None), 5))
    it.set_state(state)  # rewinds the workers too
    assert_same_batches(take(it, 2), rest)
    it.close()
