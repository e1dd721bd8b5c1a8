"""The Grain input pipeline: records → featurized pairs → length-bucketed (optionally packed) ``PairedBatch``es.

::

    source (JSONL/parquet list, ArrayRecord, TFDS data source)    records, decoded and validated lazily
      → MapDataset.source → .seed(seed).shuffle() → .repeat(num_epochs)
      → [process_index::process_count]                             disjoint, complete per-process shards
      → .map(Featurizer)                                           Kept | Dropped, 1:1, so still random access
      → .to_iter_dataset(ReadOptions) [→ .mp_prefetch(workers)]    featurization in threads / worker processes
      → PairedBatchIterator                                        skip+count drops, batch, pack, bucket, collate

The last stage keeps its state tiny: the parent's state (``{"next_index": i}`` without workers) plus the running
statistics. Packing is greedy first-fit into ``per_process_batch_size`` rows; an example that fits no row closes the
batch and is *re-read* after a restore (the state saved is the parent's state from before that example), so
``get_state``/``set_state`` round-trip exactly into a fresh iterator, also through Orbax
(``grain.checkpoint.CheckpointSave(it)`` / ``CheckpointRestore(it)``).

Static shapes by length bucketing: each batch is padded to the smallest boundary that fits, separately for the
personal sequences ``Lp``, the counterfactual sequences ``Lc`` and the response slots ``R``, so only a few shapes
are ever compiled (at most the product of the three boundary counts). Without packing a batch always has
``per_process_batch_size`` rows; a finite pipeline's last batch is filled with empty rows (all padding: segment
ids 0, weights 0), so shapes stay static and every example is seen. Note for multi-host training with a finite
``num_epochs``: shards can differ by one example and drops differ per process, so hosts may see different numbers
of batches; train with ``num_epochs=None`` and a step count.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import grain

from percausal_jax import storage
from percausal_jax.data.featurize import Dropped, FeaturizeConfig, FeaturizeStats, Featurizer, Kept
from percausal_jax.data.pairing import PairedBatch, PairedExample, collate
from percausal_jax.data.records import (SkipReport, detect_kind, read_records, validate_canonical, validate_prompt,
                                        validate_trl)
from percausal_jax.data.retrieval import Contriever
from percausal_jax.errors import UserError, where

ARRAYS = ("personal", "counterfactual", "response")


# -------------------------------------------------------------------------------------------------------- sources


class JsonRecords(Sequence):
    """Random access to JSON-encoded records: ``source[i]`` is bytes/str JSON, ``{"record": <JSON>}`` (our TFDS
    builders) or an already decoded dict. Each record is decoded and validated when read; errors name ``name`` and
    the 1-based position."""

    def __init__(self, source: Any, name: str):
        self.source = source
        self.name = name

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        element = self.source[index]
        if isinstance(element, dict) and set(element) == {"record"}:
            element = element["record"]
        if isinstance(element, (bytes, str)):
            try:
                element = json.loads(element)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise UserError(f"{where(self.name, index + 1)}: not a JSON record ({e}); ArrayRecord files "
                                "written by TFDS hold tf.Example protos: read those with tfds.data_source") from None
        if not isinstance(element, dict):
            raise UserError(f"{where(self.name, index + 1)}: expected a JSON object record, "
                            f"got {type(element).__name__}")
        kind = detect_kind(element, self.name, index + 1)
        validate = {"canonical": validate_canonical, "prompt": validate_prompt, "trl": validate_trl}[kind]
        return validate(element, self.name, index + 1)

    def __repr__(self) -> str:
        return f"JsonRecords({self.name!r}, {len(self)} records)"


def open_source(source: str | os.PathLike | Sequence, *, strict: bool = False,
                report: SkipReport | None = None) -> Sequence[dict]:
    """Random-access records from a file or folder :func:`records.read_records` reads (local or ``gs://``: read
    and validated up front; rows with an empty required field skipped and counted in ``report``, or errors with
    ``strict``), an ArrayRecord file of JSON records (path containing ``.array_record``; a remote one is copied to
    the local cache first), or a sequence / data source (e.g. ``tfds.data_source(...)["train"]`` of our builders)
    whose elements :class:`JsonRecords` decodes and validates lazily (a bad element, empty fields included, is an
    error when read)."""
    if isinstance(source, (str, os.PathLike)):
        path = storage.path(source)
        if ".array_record" in path.name:
            if not path.is_file():
                raise UserError(f"{path}: no such file; expected an ArrayRecord file of JSON records")
            local = storage.local_file(path, "ArrayRecord file of JSON records")
            return JsonRecords(grain.sources.ArrayRecordDataSource(str(local)), str(path))
        return read_records(path, strict=strict, report=report)
    if isinstance(source, list):
        return JsonRecords(source, "<records>")
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise UserError(f"data source {source!r}: expected a file path, a list of records or a random-access "
                        "data source")
    return JsonRecords(source, repr(source))


# -------------------------------------------------------------------------------------------------------- buckets


def boundaries(max_len: int, multiple: int) -> tuple[int, ...]:
    """``(multiple, 2·multiple, ...)`` up to the first multiple ≥ ``max_len``."""
    return tuple(range(multiple, math.ceil(max_len / multiple) * multiple + 1, multiple))


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Allowed padded lengths per array, ascending; the largest is also the packing row capacity."""

    personal: tuple[int, ...]
    counterfactual: tuple[int, ...]
    response: tuple[int, ...]

    @classmethod
    def multiples(cls, fcfg: FeaturizeConfig, multiple: int) -> Buckets:
        """Multiples of ``multiple`` up to the longest example ``fcfg`` admits (prompt + response − 1)."""
        p, r = _maxima(fcfg)
        return cls(boundaries(p + r - 1, multiple), boundaries(p + r - 1, multiple), boundaries(r, multiple))

    def check(self, fcfg: FeaturizeConfig) -> None:
        """Every admissible example must fit the largest boundaries."""
        p, r = _maxima(fcfg)
        for name, bounds, need in zip(ARRAYS, (self.personal, self.counterfactual, self.response),
                                      (p + r - 1, p + r - 1, r)):
            if not bounds or list(bounds) != sorted(set(bounds)) or bounds[0] < 1:
                raise UserError(f"{name} bucket boundaries {bounds}: expected ascending positive integers")
            if bounds[-1] < need:
                raise UserError(f"{name} bucket boundaries {bounds}: the largest must be >= {need}, the longest "
                                "example allowed by max_prompt_len and max_response_len")

    def fit(self, lengths: tuple[int, int, int]) -> tuple[int, int, int]:
        """The smallest boundaries holding ``(personal, counterfactual, response)`` lengths."""
        return tuple(next(b for b in bounds if b >= n)  # type: ignore[return-value]
                     for bounds, n in zip((self.personal, self.counterfactual, self.response), lengths))

    @property
    def capacity(self) -> tuple[int, int, int]:
        return self.personal[-1], self.counterfactual[-1], self.response[-1]


def _maxima(fcfg: FeaturizeConfig) -> tuple[int, int]:
    if fcfg.max_prompt_len is None or fcfg.max_response_len is None:
        raise UserError("the pipeline pads to static shapes: set max_prompt_len and max_response_len in the "
                        "featurize settings")
    return fcfg.max_prompt_len, fcfg.max_response_len


# ------------------------------------------------------------------------------------------------------ iterator


def _lengths(ex: PairedExample) -> tuple[int, int, int]:
    return ex.personal_len, ex.counterfactual_len, len(ex.response_ids)


class PairedBatchIterator(grain.DatasetIterator):
    """Yields :class:`PairedBatch` (``int32[B, Lp]``, ``int32[B, Lc]``, response ``[B, R]``) with running stats.

    ``featurize_stats`` counts kept/dropped examples and lengths; ``padding`` holds ``[padding slots, total
    slots]`` per array (personal, counterfactual: ``segment_ids == 0``; response: ``weight == 0``).
    """

    def __init__(self, parent: grain.DatasetIterator, batch_size: int, buckets: Buckets, packing: bool,
                 give_up_after: int = 1_000_000):
        super().__init__(parent)
        self._give_up_after = give_up_after  # consecutive drops, with nothing ever kept, that mean "all dropped"
        self._batch_size = batch_size
        self._buckets = buckets
        self._packing = packing
        self._pending: tuple[Kept, Any] | None = None  # (example that closed the last batch, parent state before it)
        self.featurize_stats = FeaturizeStats()
        self.padding = {name: [0, 0] for name in ARRAYS}

    def __next__(self) -> PairedBatch:
        rows: list[list[PairedExample]] = []
        fills: list[tuple[int, int, int]] = []
        consecutive_drops = 0
        while self._packing or len(rows) < self._batch_size:
            if self._pending is not None:
                (item, state_before), self._pending = self._pending, None
            else:
                state_before = self._parent.get_state() if self._packing else None
                try:
                    item = next(self._parent)
                except StopIteration:
                    break
            if isinstance(item, Dropped):
                self.featurize_stats.add(item)
                consecutive_drops += 1
                if consecutive_drops >= self._give_up_after and not self.featurize_stats.kept:
                    raise UserError(f"every example was dropped ({self.featurize_stats.summary()['dropped']}): "
                                    "raise data.max_prompt_len / data.max_response_len, or lower data.k")
                continue
            if not self._place(rows, fills, item.example):
                self._pending = (item, state_before)
                break
            self.featurize_stats.add(item)
        if not rows:
            raise StopIteration
        rows += [[] for _ in range(self._batch_size - len(rows))]
        shape = self._buckets.fit(tuple(max(f[i] for f in fills) for i in range(3)))  # type: ignore[arg-type]
        batch = collate(rows, *shape)
        used = ((batch.personal.segment_ids != 0).sum(), (batch.counterfactual.segment_ids != 0).sum(),
                (batch.response.weight != 0).sum())
        for name, n, length in zip(ARRAYS, used, shape):
            self.padding[name][0] += self._batch_size * length - int(n)
            self.padding[name][1] += self._batch_size * length
        return batch

    def _place(self, rows: list[list[PairedExample]], fills: list[tuple[int, int, int]], ex: PairedExample) -> bool:
        """First fit: the first row with room in all three arrays, else a new row; False if the batch is full."""
        need = _lengths(ex)
        if self._packing:
            cap = self._buckets.capacity
            for i, fill in enumerate(fills):
                if all(f + n <= c for f, n, c in zip(fill, need, cap)):
                    rows[i].append(ex)
                    fills[i] = tuple(f + n for f, n in zip(fill, need))  # type: ignore[assignment]
                    return True
        if len(rows) == self._batch_size:
            return False
        rows.append([ex])
        fills.append(need)
        return True

    def padding_fraction(self) -> dict[str, float]:
        """Padding slots / total slots so far, per array."""
        return {name: pad / total if total else 0.0 for name, (pad, total) in self.padding.items()}

    def summary(self) -> dict:
        """Running statistics for logging: :meth:`FeaturizeStats.summary` plus ``padding_fraction``."""
        return {**self.featurize_stats.summary(), "padding_fraction": self.padding_fraction()}

    def get_state(self) -> dict:
        parent = self._pending[1] if self._pending is not None else self._parent.get_state()
        return {"parent": parent, "featurize_stats": self.featurize_stats.to_json(),
                "padding": {k: list(v) for k, v in self.padding.items()}}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._pending = None
        self.featurize_stats = FeaturizeStats.from_json(state["featurize_stats"])
        self.padding = {k: list(v) for k, v in state["padding"].items()}


class _PairedBatchDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, batch_size: int, buckets: Buckets, packing: bool,
                 give_up_after: int):
        super().__init__(parent)
        self._args = (batch_size, buckets, packing, give_up_after)

    def __iter__(self) -> PairedBatchIterator:
        return PairedBatchIterator(self._parent.__iter__(), *self._args)


def make_iterator(source: str | os.PathLike | Sequence, tokenizer: Any, fcfg: FeaturizeConfig, *,
                  per_process_batch_size: int, seed: int, process_index: int = 0, process_count: int = 1,
                  num_epochs: int | None = None, shuffle: bool = True, packing: bool = False,
                  bucket_multiple: int = 64, buckets: Buckets | None = None,
                  contriever: Contriever | None = None, read_threads: int = 4,
                  worker_count: int = 0, strict: bool = False,
                  report: SkipReport | None = None) -> PairedBatchIterator:
    """The whole pipeline in one call (see module doc); returns a fresh, checkpointable iterator.

    Lengths come from ``fcfg`` (both ``max_prompt_len`` and ``max_response_len`` are required): buckets are
    multiples of ``bucket_multiple`` up to ``max_prompt_len + max_response_len − 1`` (sequences) and
    ``max_response_len`` (responses), unless ``buckets`` is given. ``num_epochs=None`` repeats forever.
    ``worker_count > 0`` featurizes in that many processes (the tokenizer must be picklable; scripts need an
    ``if __name__ == "__main__"`` guard); the batching stage always runs in this process. ``strict`` / ``report``:
    see :func:`open_source` (rows skipped while reading a file are counted in ``report``).
    """
    if per_process_batch_size < 1:
        raise UserError(f"per_process_batch_size {per_process_batch_size}: expected an integer >= 1")
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} / process_count {process_count}: expected "
                        "0 <= process_index < process_count")
    if buckets is None:
        if bucket_multiple < 1:
            raise UserError(f"bucket_multiple {bucket_multiple}: expected an integer >= 1")
        buckets = Buckets.multiples(fcfg, bucket_multiple)
    buckets.check(fcfg)
    featurizer = Featurizer(tokenizer, fcfg, contriever=contriever)

    records = open_source(source, strict=strict, report=report)
    ds = grain.MapDataset.source(records)
    if shuffle:
        ds = ds.seed(seed).shuffle()
    ds = ds.repeat(num_epochs)[process_index::process_count].map(featurizer)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                 prefetch_buffer_size=max(2 * per_process_batch_size, 16)))
    if worker_count > 0:
        from absl import flags  # grain workers read absl flags (engineering.md, worker pitfalls)

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    give_up = max(-(-len(records) // process_count), 1)  # one full pass over this process's shard
    return iter(_PairedBatchDataset(it_ds, per_process_batch_size, buckets, packing, give_up))


# ----------------------------------------------------------------------------------------------------- to devices


def to_global(batch: PairedBatch, mesh, batch_axes: tuple[str, ...] = ("data", "fsdp")) -> PairedBatch:
    """This process's rows → a ``PairedBatch`` of global ``jax.Array``s, leading axis sharded over
    ``batch_axes``; the global batch is ``per_process_batch_size × process_count`` rows."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    missing = [axis for axis in batch_axes if axis not in mesh.axis_names]
    if missing:
        raise ValueError(f"batch axes {missing} are not mesh axes {mesh.axis_names}")
    sharding = NamedSharding(mesh, PartitionSpec(batch_axes))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
