"""Which examples a process reads: consecutive blocks of its batch size, in turn.

With ``P`` processes each building ``b`` rows of a global batch of ``b·P``, the global batch is the concatenation
of the processes' rows in process order (``jax.make_array_from_process_local_data``). For it to hold exactly the
rows a single process would put in the same places, process ``i`` must read the ``i``-th block of ``b`` examples
of each round of ``b·P``:

    stream     e0 e1 e2 e3 | e4 e5 e6 e7 | ...        (b = 2, P = 2)
    process 0  e0 e1       | e4 e5       | ...
    process 1        e2 e3 |       e6 e7 | ...

so that every device sees the same rows as in a one-process run on the same mesh and sums its gradients in the
same order (the multi-process run is bitwise the one-process run; a strided ``[i::P]`` split is not: it gives each
device other rows). The shards are disjoint and complete; a finite stream's last, partial round is split the same
way, so shard lengths can differ by up to ``b``.
"""

from __future__ import annotations

import grain


class BlockShard(grain.MapDataset):
    """Process ``index`` of ``count``'s view of ``parent``: blocks of ``block`` consecutive examples, one per round."""

    def __init__(self, parent: grain.MapDataset, block: int, index: int, count: int):
        super().__init__(parent)
        self._block, self._index, self._count = block, index, count
        n, round_size = len(parent), block * count
        full, rest = divmod(n, round_size)
        self._length = full * block + min(max(rest - index * block, 0), block)

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
