"""The Grain input pipeline: records → featurized pairs → length-bucketed (optionally packed) ``PairedBatch``es.

::

    source (JSONL/parquet list, ArrayRecord, TFDS data source)    records, decoded and validated lazily
      → MapDataset.source → .seed(seed).shuffle() → .repeat(num_epochs)
      → BlockShard                                                 one row block's examples of each global batch
      → .map(Featurizer)                                           Kept | Dropped, 1:1, so still random access
      → .to_iter_dataset(ReadOptions) [→ .mp_prefetch(workers)]    featurization in threads / worker processes
      → PairedBatchIterator                                        skip+count drops, batch, pack, bucket, collate

Static shapes, two ways:

- **Bucketing** (``packing=False``): one example per row; each batch is padded to the smallest boundary that fits,
  separately for the personal sequences ``Lp``, the counterfactual sequences ``Lc`` and the response slots ``R``,
  so only a few shapes are ever compiled (at most the product of the three boundary counts). A batch always has
  ``batch_size`` rows; a finite pipeline's last batch is filled with empty rows (all padding: segment
  ids 0, weights 0), so shapes stay static and every example is seen.
- **Packing** (``packing=True``): several examples per row, and every batch has exactly the row capacity shape
  ``(B, pack_personal_len)``, ``(B, pack_counterfactual_len)``, ``(B, pack_response_len)``: one compiled shape. A
  capacity of 0 is derived: the largest bucket boundary, i.e. the longest example the length limits admit rounded
  up to ``bucket_multiple`` (``max_prompt_len + max_response_len − 1`` for both sequences, ``max_response_len``
  for responses); an explicit one must be at least that longest example (:func:`check_packing`). Rows longer than
  one example (e.g. 8192 personal tokens) are what lets packing approach zero padding.

  Placement is first-fit-decreasing with lookahead: a pool of up to ``pack_lookahead`` examples read but not yet
  placed is kept; the pool's examples are placed largest first (largest share of a row's capacity over the three
  arrays; ties in reading order) into the first of the B rows with room in all three arrays, the pool is topped up
  and placement repeats; an example that fits no row stays in the pool for the next batch, and the batch closes when
  none of the pool's examples fits anywhere and the pool is full (or the source is exhausted).
  ``pack_lookahead=0`` is plain first fit in reading order, closing the batch at the first example that fits no
  row (that example opens the next batch).

The last stage's state is the parent's state after the last example read (``{"next_index": i}`` without workers),
the pending pool itself (token id lists as JSON ints, so a restore never re-reads) and the running statistics, so
``get_state``/``set_state`` round-trip exactly into a fresh iterator, also through Orbax
(``grain.checkpoint.CheckpointSave(it)`` / ``CheckpointRestore(it)``). The pool makes a packed state ~2 MB per
process at LongLaMP lengths (64 examples of ~1.4k ids, one id per line in Grain's indented JSON).

One iterator is one row block's stream (:mod:`~percausal_jax.data.rows`): ``block`` of ``num_blocks``, each
block featurized, bucketed and packed by itself, so a block's rows are the same whichever process builds them. A
process builds the blocks its devices hold and :class:`~percausal_jax.data.rows.ProcessRows` concatenates them.
With a finite ``num_epochs``, blocks can differ in length by up to a batch (and by their drops): a block that ran
out feeds empty rows (``ProcessRows``); train with ``num_epochs=None`` and a step count.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import grain

from percausal_jax import storage
from percausal_jax.data.featurize import Dropped, FeaturizeConfig, FeaturizeStats, Featurizer, Kept
from percausal_jax.data.pairing import PairedBatch, PairedExample, collate, shape_of
from percausal_jax.data.rows import BlockShard
from percausal_jax.data.shapes import ARRAYS, DEFAULT_LOOKAHEAD, PACK_KEYS, Buckets, Packing
from percausal_jax.data.records import detect_kind, read_records, validate_canonical, validate_prompt, validate_trl
from percausal_jax.data.skips import SkipReport
from percausal_jax.data.retrieval import Contriever
from percausal_jax.errors import UserError, where



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


# ------------------------------------------------------------------------------------------------------ iterator


def _lengths(ex: PairedExample) -> tuple[int, int, int]:
    return ex.personal_len, ex.counterfactual_len, len(ex.response_ids)


def _kept_to_json(kept: Kept) -> dict:
    ex = kept.example
    out = {"prompt_ids": list(ex.prompt_ids), "prompt_no_profile_ids": list(ex.prompt_no_profile_ids),
           "response_ids": list(ex.response_ids), "items_used": kept.items_used, "truncated": kept.truncated}
    if ex.response_class is not None:
        out["response_class"] = list(ex.response_class)
    return out


def _kept_from_json(state: dict) -> Kept:
    classes = state.get("response_class")  # absent: unclassified, and in pools saved before classes existed
    ex = PairedExample(tuple(int(i) for i in state["prompt_ids"]),
                       tuple(int(i) for i in state["prompt_no_profile_ids"]),
                       tuple(int(i) for i in state["response_ids"]),
                       None if classes is None else tuple(int(c) for c in classes))
    return Kept(ex, int(state["items_used"]), bool(state["truncated"]))


class PairedBatchIterator(grain.DatasetIterator):
    """Yields :class:`PairedBatch` (``int32[B, Lp]``, ``int32[B, Lc]``, response ``[B, R]``) with running stats.

    ``packing``: False (bucketing), a :class:`Packing`, or True (the derived capacity of ``buckets`` and the default
    lookahead). ``featurize_stats`` counts dropped examples when read and kept ones when placed in a batch (so
    examples pending in the pool are not counted yet); ``padding`` holds ``[padding slots, total slots]`` per array
    (personal, counterfactual: ``segment_ids == 0``; response: ``weight == 0``).
    """

    def __init__(self, parent: grain.DatasetIterator, batch_size: int, buckets: Buckets, packing: bool | Packing,
                 give_up_after: int = 1_000_000):
        super().__init__(parent)
        self._give_up_after = give_up_after  # consecutive drops, with nothing ever kept, that mean "all dropped"
        self._batch_size = batch_size
        self._buckets = buckets
        if packing is True:
            packing = Packing(*buckets.capacity)
        self._packing: Packing | None = packing or None
        self._pending: list[Kept] = []  # packing: examples read but not yet placed, in reading order
        self._drops = 0  # consecutive drops in this call (give_up_after)
        self.featurize_stats = FeaturizeStats()
        self.padding = {name: [0, 0] for name in ARRAYS}

    def __next__(self) -> PairedBatch:
        self._drops = 0
        batch = self._next_packed() if self._packing else self._next_bucketed()
        shape = shape_of(batch)
        used = ((batch.personal.segment_ids != 0).sum(), (batch.counterfactual.segment_ids != 0).sum(),
                (batch.response.weight != 0).sum())
        for name, n, length in zip(ARRAYS, used, shape):
            self.padding[name][0] += self._batch_size * length - int(n)
            self.padding[name][1] += self._batch_size * length
        return batch

    def _read(self) -> Kept | None:
        """The next kept example (drops counted on the way), or None when the source is exhausted."""
        while True:
            try:
                item = next(self._parent)
            except StopIteration:
                return None
            if isinstance(item, Kept):
                self._drops = 0
                return item
            self.featurize_stats.add(item)
            self._drops += 1
            if self._drops >= self._give_up_after and not self.featurize_stats.kept and not self._pending:
                raise UserError(f"every example was dropped ({self.featurize_stats.summary()['dropped']}): "
                                "raise data.max_prompt_len / data.max_response_len, or lower data.k")

    def _next_bucketed(self) -> PairedBatch:
        rows: list[list[PairedExample]] = []
        while len(rows) < self._batch_size:
            item = self._read()
            if item is None:
                break
            self.featurize_stats.add(item)
            rows.append([item.example])
        if not rows:
            raise StopIteration
        shape = self._buckets.fit(tuple(max(_lengths(r[0])[i] for r in rows) for i in range(3)))  # type: ignore
        return collate(rows + [[] for _ in range(self._batch_size - len(rows))], *shape)

    def _next_packed(self) -> PairedBatch:
        """First-fit(-decreasing) into ``batch_size`` rows of the packing capacity (module doc)."""
        pack = self._packing
        cap = pack.capacity
        window = max(pack.lookahead, 1)
        rows: list[list[PairedExample]] = [[] for _ in range(self._batch_size)]
        fills = [(0, 0, 0)] * self._batch_size
        pool = self._pending
        while True:
            while len(pool) < window:
                item = self._read()
                if item is None:
                    break
                pool.append(item)
            order = list(range(len(pool)))
            if pack.lookahead:  # largest share of a row first; sort is stable: ties in reading order
                order.sort(key=lambda i: -max(n / c for n, c in zip(_lengths(pool[i].example), cap)))
            placed = set()
            for i in order:
                need = _lengths(pool[i].example)
                row = next((b for b, fill in enumerate(fills) if all(f + n <= c for f, n, c in zip(fill, need, cap))),
                           None)
                if row is None:
                    if not pack.lookahead:
                        break
                    continue
                rows[row].append(pool[i].example)
                fills[row] = tuple(f + n for f, n in zip(fills[row], need))  # type: ignore[assignment]
                self.featurize_stats.add(pool[i])
                placed.add(i)
            if not placed:
                break
            pool[:] = [item for i, item in enumerate(pool) if i not in placed]
        if not any(rows):
            if pool:  # only with a capacity that bypassed check_packing
                raise UserError(f"an example of lengths {_lengths(pool[0].example)} (personal, counterfactual, "
                                f"response) does not fit an empty packed row of capacity {cap}; raise "
                                f"{' / '.join(PACK_KEYS)}")
            raise StopIteration
        return collate(rows, *cap)

    def padding_fraction(self) -> dict[str, float]:
        """Padding slots / total slots so far, per array."""
        return {name: pad / total if total else 0.0 for name, (pad, total) in self.padding.items()}

    def summary(self) -> dict:
        """Running statistics for logging: :meth:`FeaturizeStats.summary` plus ``padding_fraction``."""
        return {**self.featurize_stats.summary(), "padding_fraction": self.padding_fraction()}

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "pending": [_kept_to_json(k) for k in self._pending],
                "featurize_stats": self.featurize_stats.to_json(),
                "padding": {k: list(v) for k, v in self.padding.items()}}

    def set_state(self, state: dict) -> None:
        # states saved before the pool existed hold the parent's state from before the one pending example
        self._parent.set_state(state["parent"])
        self._pending = [_kept_from_json(k) for k in state.get("pending", [])]
        self.featurize_stats = FeaturizeStats.from_json(state["featurize_stats"])
        self.padding = {k: list(v) for k, v in state["padding"].items()}


class _PairedBatchDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, batch_size: int, buckets: Buckets, packing: bool | Packing,
                 give_up_after: int):
        super().__init__(parent)
        self._args = (batch_size, buckets, packing, give_up_after)

    def __iter__(self) -> PairedBatchIterator:
        return PairedBatchIterator(self._parent.__iter__(), *self._args)


def make_iterator(source: str | os.PathLike | Sequence, tokenizer: Any, fcfg: FeaturizeConfig, *,
                  batch_size: int, seed: int, block: int = 0, num_blocks: int = 1,
                  num_epochs: int | None = None, shuffle: bool = True, packing: bool = False,
                  bucket_multiple: int = 64, buckets: Buckets | None = None, pack_personal_len: int = 0,
                  pack_counterfactual_len: int = 0, pack_response_len: int = 0,
                  pack_lookahead: int = DEFAULT_LOOKAHEAD, contriever: Contriever | None = None,
                  read_threads: int = 4, worker_count: int = 0, strict: bool = False,
                  report: SkipReport | None = None) -> PairedBatchIterator:
    """The whole pipeline of row block ``block`` of ``num_blocks`` in one call (see module doc): batches of
    ``batch_size`` rows; returns a fresh, checkpointable iterator.

    Lengths come from ``fcfg`` (both ``max_prompt_len`` and ``max_response_len`` are required): buckets are
    multiples of ``bucket_multiple`` up to ``max_prompt_len + max_response_len − 1`` (sequences) and
    ``max_response_len`` (responses), unless ``buckets`` is given. With ``packing``, every batch has the row
    capacity ``pack_personal_len`` / ``pack_counterfactual_len`` / ``pack_response_len`` (0 = the largest bucket
    boundary; checked by :func:`check_packing` whether packing or not) and ``pack_lookahead`` examples are kept
    pending for first-fit-decreasing placement. ``num_epochs=None`` repeats forever.
    ``worker_count > 0`` featurizes in that many processes (the tokenizer must be picklable; scripts need an
    ``if __name__ == "__main__"`` guard); the batching stage always runs in this process. ``strict`` / ``report``:
    see :func:`open_source` (rows skipped while reading a file are counted in ``report``).
    """
    if batch_size < 1:
        raise UserError(f"batch_size {batch_size}: expected an integer >= 1")
    if not 0 <= block < num_blocks:
        raise UserError(f"row block {block} of {num_blocks}: expected 0 <= block < num_blocks")
    if buckets is None:
        if bucket_multiple < 1:
            raise UserError(f"bucket_multiple {bucket_multiple}: expected an integer >= 1")
        buckets = Buckets.multiples(fcfg, bucket_multiple)
    buckets.check(fcfg)
    pack = Packing.derive(fcfg, buckets, pack_personal_len, pack_counterfactual_len, pack_response_len,
                          pack_lookahead)
    featurizer = Featurizer(tokenizer, fcfg, contriever=contriever)

    records = open_source(source, strict=strict, report=report)
    ds = grain.MapDataset.source(records)
    if shuffle:
        ds = ds.seed(seed).shuffle()
    ds = BlockShard(ds.repeat(num_epochs), batch_size, block, num_blocks)
    it_ds = ds.map(featurizer).to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                                 prefetch_buffer_size=max(2 * batch_size, 16)))
    if worker_count > 0:
        from absl import flags  # grain workers read absl flags (engineering.md, worker pitfalls)

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    give_up = max(len(records), 1)  # as many consecutive drops as there are records, nothing kept: all dropped
    return iter(_PairedBatchDataset(it_ds, batch_size, buckets, pack if packing else False, give_up))
