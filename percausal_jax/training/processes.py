"""Processes agree or stop: every per-process fact a multi-process run depends on is compared across processes, and
every per-process decision is made once and shared.

- :func:`check_agree` (start-up): the config, the data fingerprints and the mesh must be the same everywhere;
- :func:`check_same_rows` and :func:`check_same_loss` (each logged step): the replicas of a row block must have
  fed the same rows (a digest per block), and the loss every process computed must be bitwise the same;
- :func:`all_ok` / :func:`sum_counts`: a flag or counts combined over processes (lock outcome, restore attempts,
  drop tallies);
- :class:`SharedLock`: the workdir lock, held by process 0, its outcomes shared.

A disagreement raises :class:`ProcessMismatch` on every process at once (they all compare the same gathered
values): one line naming what differs, exit code 4, never a silent run. In one process every check is free.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from percausal_jax.errors import ProcessMismatch, StorageError, UserError
from percausal_jax.lock import WorkdirLock


def _gather(values: np.ndarray) -> np.ndarray:
    """``[P, *values.shape]``: every process's ``values`` (int32), in process order."""
    if jax.process_count() == 1:
        return values[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values))


def digest(value) -> np.ndarray:
    """A value's identity as 8 int32 words (SHA-256 of its canonical JSON)."""
    blob = json.dumps(value, sort_keys=True, default=str).encode()
    return np.frombuffer(hashlib.sha256(blob).digest(), np.int32).copy()


def check_agree(facts: Mapping[str, object]) -> None:
    """Every process must hold the same value of every fact (compared by digest, one gather for all)."""
    names = list(facts)
    mine = np.stack([digest(facts[k]) for k in names])
    every = _gather(mine)
    for i, name in enumerate(names):
        differ = [p for p in range(every.shape[0]) if not np.array_equal(every[p, i], every[0, i])]
        if differ:
            shown = str(facts[name])
            shown = shown if len(shown) <= 160 else shown[:160] + " …"
            raise ProcessMismatch(f"processes disagree on {name}: process(es) {differ} differ from process 0 "
                                  f"(this is process {jax.process_index()}: {shown}); every process must run the "
                                  "same command on the same files")


def check_same_loss(step: int, loss: float) -> None:
    """The loss of ``step`` must be bitwise equal on every process."""
    every = _gather(np.asarray([loss], np.float32).view(np.int32)).view(np.float32)[:, 0]
    if not np.all(every.view(np.int32) == every[0:1].view(np.int32)):
        values = ", ".join(f"process {p}: {v:.9g}" for p, v in enumerate(every))
        raise ProcessMismatch(f"step {step}: processes computed different losses ({values}): their replicas hold "
                              "different rows or weights (files that differ per host?); stopped")


def check_same_rows(step: int, batch, rows) -> None:
    """Replicas of a row block must have fed the same rows: each process's digest of every block it holds
    (``batch``: its rows, ``rows``: its :class:`~percausal_jax.data.rows.RowLayout`) against the block's other
    readers'."""
    mine = np.zeros((rows.num_blocks, 9), np.int32)  # [held, digest words]
    leaves = jax.tree.leaves(batch)
    for at, j in enumerate(rows.blocks):
        part = slice(at * rows.block_rows, (at + 1) * rows.block_rows)
        h = hashlib.sha256()
        for x in leaves:
            h.update(np.ascontiguousarray(x[part]).tobytes())
        mine[j] = [1, *np.frombuffer(h.digest(), np.int32)]
    every = _gather(mine)
    for j in range(rows.num_blocks):
        readers = [p for p in range(every.shape[0]) if every[p, j, 0]]
        differ = [p for p in readers if not np.array_equal(every[p, j], every[readers[0], j])]
        if differ:
            raise ProcessMismatch(f"step {step}: processes fed different rows for row block {j} (process(es) "
                                  f"{differ} differ from process {readers[0]}, which read the same block): their "
                                  "data or tokenizer files differ per host?; stopped")


def all_ok(ok: bool) -> bool:
    """True when ``ok`` holds on every process."""
    return bool(_gather(np.asarray([int(ok)], np.int32)).min())


def sum_counts(counts: Sequence[int]) -> list[int]:
    """Element-wise sums over processes."""
    return [int(x) for x in _gather(np.asarray(counts, np.int32)).sum(axis=0)]


def data_fingerprint(records) -> dict:
    """Record count and a hash of the records' JSON (every record up to 4096, else 4096 evenly spaced ones and
    the last: cheap on millions of records, and still sees a different file)."""
    n = len(records)
    picks = range(n) if n <= 4096 else sorted({*np.linspace(0, n - 1, 4096).astype(int).tolist(), n - 1})
    h = hashlib.sha256()
    for i in picks:
        h.update(json.dumps(records[i], sort_keys=True, default=str).encode())
    return {"records": n, "sha256": h.hexdigest()[:16]}


def mesh_fingerprint(mesh) -> dict:
    """The mesh's axes and, per position, the global id of its device."""
    return {"axes": dict(mesh.shape), "devices": [int(d.id) for d in mesh.devices.flat]}


def broadcast_ints(values: Sequence[int]) -> list[int]:
    """Process 0's list of integers (e.g. checkpoint steps), on every process."""
    if jax.process_count() == 1:
        return list(values)
    from jax.experimental import multihost_utils

    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(values))))
    mine = np.zeros(n, np.int32)
    if jax.process_index() == 0:
        mine[:] = values
    return [int(x) for x in np.asarray(multihost_utils.broadcast_one_to_all(mine))]


class SharedLock:
    """``WORKDIR/.lock`` (:mod:`percausal_jax.lock`), held by process 0 for the whole job; every outcome (taken,
    in use, lost to another run) is shared, so that every process stops together rather than wait in a collective
    for one that stopped."""

    def __init__(self, workdir, **lock_options):
        self.workdir = workdir
        self.lock = WorkdirLock(workdir, **lock_options) if jax.process_index() == 0 else None

    def __enter__(self) -> SharedLock:
        error = None
        if self.lock is not None:
            try:
                self.lock.acquire()
            except UserError as e:
                error = e
        if not all_ok(error is None):
            if self.lock is not None and error is None:
                self.lock.release()
            raise error or UserError(f"{self.workdir}: process 0 could not take the workdir lock (its error says "
                                     "why)")
        return self

    def check(self) -> None:
        """Every process raises when the lock was taken over by another run (its lease expired)."""
        lost = self.lock is not None and bool(self.lock.lost)
        if not all_ok(not lost):
            if self.lock is not None:
                self.lock.check()
            raise UserError(f"{self.workdir}: the workdir lock was taken over by another run (process 0 says by "
                            "whom); stopping so that only one run writes it")

    def __exit__(self, exc_type, exc, tb) -> None:
        """Released; after a storage failure left for the next run to take over (this pid will be gone), as
        nothing more is sent to a storage known to be failing."""
        if self.lock is not None:
            self.lock.abandon() if isinstance(exc, StorageError) else self.lock.release()
