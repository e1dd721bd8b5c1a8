"""Row layouts and the per-process iterator, in one process: blocks from the batch sharding, a process's blocks
concatenated in block order (padded to one shape), exhausted blocks feeding empty rows, state per block, and the
global array assembled from non-contiguous blocks."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from percausal_jax.data.pairing import shape_of
from percausal_jax.data.rows import to_global
from percausal_jax.data.rows import ProcessRows, RowLayout, block_length, row_layout
from percausal_jax.models.partitioning import make_mesh
from tests.data.test_pipeline import iterator, unpack


def test_blocks_come_from_the_batch_axes_and_replicas_share_them():
    mesh = make_mesh(2, 2, 2)  # 8 devices: 4 row blocks, each on 2 tensor ranks
    rows = row_layout(mesh, 8)
    assert (rows.num_blocks, rows.block_rows, rows.blocks, rows.local_rows) == (4, 2, (0, 1, 2, 3), 8)
    assert rows.readers == ((0,),) * 4 and rows.spanning == () and rows.owned == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="6 rows do not split into 4 row blocks"):
        row_layout(mesh, 6)


def test_dcn_tiles_process_groups_and_one_process_stands_in_for_them():
    """In one process, dcn_tensor=2 splits the 8 devices into two groups of 4 (ids 0-3, 4-7) that take the two
    tensor ranks: every tensor pair is (i, i + 4)."""
    mesh = make_mesh(1, 4, 2, dcn=(1, 1, 2))
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert ids.tolist() == [[[0, 4], [1, 5], [2, 6], [3, 7]]]
    with pytest.raises(ValueError, match=r"multiple of its ranks across processes \(mesh.dcn_\*\): tensor=1 across 2"):
        make_mesh(1, 8, 1, dcn=(1, 1, 2))


def test_block_length_matches_the_stream():
    assert [block_length(11, 2, j, 3) for j in range(3)] == [4, 4, 3]


def test_a_process_with_two_blocks_concatenates_them_in_block_order_and_pads_to_one_shape():
    a, b = iterator(block=0, num_blocks=2, batch_size=2), iterator(block=1, num_blocks=2, batch_size=2)
    alone = [next(iterator(block=j, num_blocks=2, batch_size=2)) for j in range(2)]
    both = next(ProcessRows({1: b, 0: a}, 2))
    assert unpack(both) == unpack(alone[0]) + unpack(alone[1])
    assert shape_of(both) == tuple(max(s) for s in zip(*map(shape_of, alone)))


def test_an_exhausted_block_feeds_empty_rows_until_every_block_has_run_out():
    blocks = lambda: {j: iterator(block=j, num_blocks=2, batch_size=2, num_epochs=1) for j in range(2)}  # noqa: E731
    alone = {j: list(it) for j, it in blocks().items()}
    assert len(alone[0]) != len(alone[1])  # a finite stream: the blocks differ in length
    batches = list(ProcessRows(blocks(), 2))
    assert len(batches) == max(map(len, alone.values()))
    short = min(alone, key=lambda j: len(alone[j]))
    for step, batch in enumerate(batches):
        for j in range(2):
            part = batch.response.weight[2 * j:2 * j + 2]
            assert part.any() == (step < len(alone[j])), (step, j)
    assert not batches[-1].response.weight[2 * short:2 * short + 2].any()


def test_state_is_kept_per_block_and_a_different_layout_is_refused():
    it = ProcessRows({0: iterator(block=0, num_blocks=2, batch_size=2, num_epochs=None),
                      1: iterator(block=1, num_blocks=2, batch_size=2, num_epochs=None)}, 2)
    next(it)
    state = it.get_state()
    expected = unpack(next(it))
    fresh = ProcessRows({0: iterator(block=0, num_blocks=2, batch_size=2, num_epochs=None),
                         1: iterator(block=1, num_blocks=2, batch_size=2, num_epochs=None)}, 2)
    fresh.set_state(state)
    assert unpack(next(fresh)) == expected
    other = ProcessRows({0: iterator(block=0, num_blocks=2, batch_size=2)}, 2)
    with pytest.raises(ValueError, match=r"holds row blocks \[0, 1\], this process reads \[0\]"):
        other.set_state(state)


def test_to_global_places_non_contiguous_blocks_by_the_layout():
    """A process holding blocks 1 and 3 of 4 (as one whose devices sit at those batch coordinates): each device
    gets its block's rows from the right part of the local batch."""
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(1, 4, 1), ("data", "fsdp", "tensor"))
    full = row_layout(mesh, 4)
    local = next(iterator(batch_size=4))
    layout = RowLayout(4, 4, 0, (0, 1, 2, 3), full.readers, ())
    arrays = to_global(local, mesh, layout)
    for shard in arrays.personal.tokens.addressable_shards:
        j = shard.index[0].start
        np.testing.assert_array_equal(np.asarray(shard.data), local.personal.tokens[j:j + 1])
    picked = RowLayout(4, 4, 0, (1, 3), full.readers, ())
    assert picked.local_index(slice(3, 4)) == slice(1, 2) and picked.local_index(slice(1, 2)) == slice(0, 1)
    with pytest.raises(ValueError, match=r"this process fed 4 rows; its row blocks \(1, 3\) hold 2"):
        to_global(local, mesh, picked)
