"""Which rows of every global batch a process reads: exactly the row blocks its devices hold.

The global batch ``[G, ...]`` is sharded over the batch axes ``(data, fsdp)``: ``n = |data|·|fsdp|`` distinct row
blocks of ``b = G / n`` rows. Block ``j`` sits on every device whose batch coordinates are ``j``, whatever its
coordinates on the other axes (``tensor``): those devices are replicas of the block, and so are their processes
when a tensor group spans hosts. :func:`row_layout` reads this from the sharding itself
(``devices_indices_map``), for concrete devices and for an AOT topology's alike.

Each block has its own stream of examples (:class:`BlockShard`): block ``j`` reads the ``j``-th run of ``b``
consecutive examples of every round of ``G``::

    stream     e0 e1 e2 e3 | e4 e5 e6 e7 | ...        (b = 2, n = 2)
    block 0    e0 e1       | e4 e5       | ...
    block 1          e2 e3 |       e6 e7 | ...

and featurizes, drops, buckets or packs them by itself (``pipeline.make_iterator``). A process builds every block
its devices hold and concatenates them in block order (:class:`ProcessRows`); replicas build identical rows. A
block's rows never depend on which process builds it, so every layout of processes over a mesh trains exactly what
one process does on that mesh — drops and packing included. The shards are disjoint and complete; a finite
stream's last, partial round is split the same way, so block lengths differ by up to ``b``. :func:`to_global` puts
a process's rows on its devices as the global batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from percausal_jax.data.pairing import PairedBatch, empty_batch, pad_batch, shape_of

BATCH_AXES = ("data", "fsdp")


# --------------------------------------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """Where the rows of a global batch of ``rows`` live, seen from process ``process``."""

    rows: int  # G: rows of one global batch
    num_blocks: int  # n: distinct row blocks (the size of the batch axes)
    process: int  # the process this layout is for
    blocks: tuple[int, ...]  # the blocks this process's devices hold, ascending
    readers: tuple[tuple[int, ...], ...]  # per block: the processes that read it (ascending)
    spanning: tuple[str, ...]  # non-batch mesh axes whose device groups span processes

    @property
    def block_rows(self) -> int:
        return self.rows // self.num_blocks

    @property
    def local_rows(self) -> int:
        """Rows this process feeds: its blocks, concatenated in block order."""
        return len(self.blocks) * self.block_rows

    @property
    def owned(self) -> tuple[int, ...]:
        """The blocks this process counts in global tallies (drops): each block's first reader counts it once."""
        return tuple(j for j in self.blocks if self.readers[j][0] == self.process)

    def local_index(self, rows: slice) -> slice:
        """A device's slice of global rows (one block) → the same rows in this process's concatenated blocks."""
        block = (rows.start or 0) // self.block_rows
        at = self.blocks.index(block) * self.block_rows
        return slice(at, at + self.block_rows)

    def describe(self) -> str:
        """One line for logs and AOT plans: blocks, readers per block, axes that span hosts."""
        counts = sorted({len(r) for r in self.readers})
        per_block = "/".join(str(c) for c in counts)
        span = ", ".join(self.spanning) if self.spanning else "none"
        return (f"{self.num_blocks} distinct row blocks of {self.block_rows} rows; {per_block} process(es) read "
                f"each; {len({p for r in self.readers for p in r})} processes; non-batch axes spanning "
                f"processes: {span}")


def row_layout(mesh, rows: int, process: int | None = None,
               batch_axes: tuple[str, ...] = BATCH_AXES) -> RowLayout:
    """The layout of a ``rows``-row global batch sharded over ``batch_axes`` of ``mesh`` (its devices' own
    ``process_index``; ``process`` defaults to this process)."""
    import jax

    if process is None:
        process = jax.process_index()
    n = int(np.prod([mesh.shape[a] for a in batch_axes]))
    if rows % n:
        raise ValueError(f"{rows} rows do not split into {n} row blocks (mesh {dict(mesh.shape)})")
    b = rows // n
    index = NamedSharding(mesh, PartitionSpec(batch_axes)).devices_indices_map((rows,))
    readers: list[set[int]] = [set() for _ in range(n)]
    for device, (rows_slice,) in index.items():
        readers[(rows_slice.start or 0) // b].add(device.process_index)
    spanning = []
    for axis, name in enumerate(mesh.axis_names):
        if name in batch_axes or mesh.devices.shape[axis] == 1:
            continue
        groups = np.moveaxis(np.vectorize(lambda d: d.process_index)(mesh.devices), axis, -1)
        groups = groups.reshape(-1, mesh.devices.shape[axis])
        if any(len(set(g)) > 1 for g in groups):
            spanning.append(name)
    return RowLayout(rows, n, process, tuple(j for j in range(n) if process in readers[j]),
                     tuple(tuple(sorted(r)) for r in readers), tuple(spanning))


# ---------------------------------------------------------------------------------------------------- the streams


class BlockShard(grain.MapDataset):
    """Block ``index`` of ``count``'s view of ``parent``: runs of ``block`` consecutive examples, one per round."""

    def __init__(self, parent: grain.MapDataset, block: int, index: int, count: int):
        super().__init__(parent)
        self._block, self._index, self._count = block, index, count
        self._length = block_length(len(parent), block, index, count)

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, i: int) -> int:
        rnd, offset = divmod(i, self._block)
        return rnd * self._block * self._count + self._index * self._block + offset

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.slice(i)
        return self._parent[self._parent_index(i)]

    def __str__(self) -> str:
        return f"BlockShard(block={self._block}, {self._index} of {self._count})"


def block_length(total: int, block_rows: int, index: int, count: int) -> int:
    """Examples block ``index`` of ``count`` reads from a stream of ``total`` (as :class:`BlockShard`)."""
    full, rest = divmod(total, block_rows * count)
    return full * block_rows + min(max(rest - index * block_rows, 0), block_rows)


class ProcessRows(grain.DatasetIterator):
    """This process's rows of every global batch: one iterator per block it holds (``{block: iterator}``), their
    batches padded to one shape and concatenated in block order. A finite block that ran out contributes empty
    rows until every block has (then ``StopIteration``). State: each block's state under its block id."""

    def __init__(self, blocks: dict[int, grain.DatasetIterator], block_rows: int):
        self._ids = sorted(blocks)
        self._its = [blocks[j] for j in self._ids]
        super().__init__(self._its)
        self._block_rows = block_rows

    def __next__(self) -> PairedBatch:
        parts = [next(it, None) for it in self._its]
        if all(p is None for p in parts):
            raise StopIteration
        parts = [empty_batch(self._block_rows) if p is None else p for p in parts]
        if len(parts) == 1:
            return parts[0]
        shape = np.max([shape_of(p) for p in parts], axis=0)
        parts = [pad_batch(p, *(int(x) for x in shape)) for p in parts]
        import jax

        return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *parts)

    def block(self, j: int) -> grain.DatasetIterator:
        return self._its[self._ids.index(j)]

    def stats(self, blocks: Sequence[int] | None = None):
        """Featurize statistics summed over ``blocks`` (default: all of this process's)."""
        from percausal_jax.data.featurize import FeaturizeStats

        total = FeaturizeStats()
        for j in self._ids if blocks is None else blocks:
            total = total.merged(self.block(j).featurize_stats)
        return total

    @property
    def featurize_stats(self):
        return self.stats()

    def padding_fraction(self) -> dict[str, float]:
        pad = {k: [sum(it.padding[k][i] for it in self._its) for i in (0, 1)] for k in self._its[0].padding}
        return {k: p / t if t else 0.0 for k, (p, t) in pad.items()}

    def get_state(self) -> dict:
        return {"blocks": {str(j): it.get_state() for j, it in zip(self._ids, self._its)}}

    def set_state(self, state: dict) -> None:
        saved = state.get("blocks")
        if saved is None or sorted(int(j) for j in saved) != self._ids:
            have = sorted(int(j) for j in saved) if saved is not None else "a single-stream state"
            raise ValueError(f"the data iterator state holds row blocks {have}, this process reads {self._ids}: "
                             "resume on the same mesh and process layout")
        for j, it in zip(self._ids, self._its):
            it.set_state(saved[str(j)])


def to_global(batch: PairedBatch, mesh, layout: RowLayout | None = None) -> PairedBatch:
    """This process's rows (its row blocks of ``layout``, concatenated in block order) → a ``PairedBatch`` of global
    ``jax.Array``s of ``layout.rows`` rows, sharded over the batch axes; each device gets its block's rows.
    ``layout`` defaults to the batch being the whole global batch (one process)."""
    missing = [axis for axis in BATCH_AXES if axis not in mesh.axis_names]
    if missing:
        raise ValueError(f"batch axes {missing} are not mesh axes {mesh.axis_names}")
    rows = batch.personal.tokens.shape[0]
    layout = layout or row_layout(mesh, rows)
    if rows != layout.local_rows:
        raise ValueError(f"this process fed {rows} rows; its row blocks {layout.blocks} hold {layout.local_rows}")
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))

    def put(x):
        return jax.make_array_from_callback((layout.rows, *x.shape[1:]), sharding,
                                            lambda index: x[(layout.local_index(index[0]), *index[1:])])

    return jax.tree.map(put, batch)
