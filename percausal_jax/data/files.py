"""Row files: how rows are read from and written to files, whatever their record kind.

:func:`iter_rows` yields ``(line, row)`` dicts from a file or folder in one of these formats (:data:`FORMATS`):

* ``.jsonl`` and ``.jsonl.gz``: one JSON object per line (blank lines skipped, a UTF-8 BOM allowed);
* ``.json`` and ``.json.gz``: JSON lines, or one JSON array of objects (rows numbered from 1);
* ``.parquet``;
* ``.arrow``: an Arrow IPC file (stream or file format);
* ``datasets.save_to_disk`` folders: their ``.arrow`` files in ``state.json`` order; a ``DatasetDict`` folder
  needs one split (``folder/split``, :func:`with_split`).

Paths are local or ``gs://`` URLs (:func:`percausal_jax.storage.path`). Outputs (:func:`write_jsonl`) are written
atomically via :mod:`percausal_jax.atomic`. A file that cannot be read raises
:class:`~percausal_jax.errors.UserError` naming the file (and line or row); rows are JSON or Arrow, nothing is
ever unpickled.
What a valid row looks like is decided by :mod:`percausal_jax.data.records`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from percausal_jax import atomic, storage
from percausal_jax.errors import UserError, describe, where

FORMATS = (".jsonl, .jsonl.gz, .json (JSON lines or one array of objects), .json.gz, .parquet, .arrow, or a "
           "datasets.save_to_disk folder")


# ---------------------------------------------------------------------------------------------------------- reading


def iter_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yields ``(line, row)`` with 1-based line numbers (parquet/arrow/JSON arrays: row numbers); blank lines are
    skipped. ``path``: a local path or URL of a file in one of :data:`FORMATS`, or a ``save_to_disk`` folder."""
    path = storage.path(path)
    if path.is_dir():
        yield from _dataset_folder_rows(path)
        return
    if not path.is_file():
        raise UserError(f"{path}: no such file; expected {FORMATS}")
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        with _open(path) as f:
            yield from _jsonl_rows(f, path)
    elif name.endswith((".json", ".json.gz")):
        yield from _json_rows(path)
    elif name.endswith(".parquet"):
        yield from _parquet_rows(path)
    elif name.endswith(".arrow"):
        yield from _arrow_rows([path], path)
    else:
        raise UserError(f"{path}: unsupported file type {''.join(path.suffixes[-2:]) or path.name!r}; "
                        f"expected {FORMATS}")


class _open:
    """``with _open(path) as f``: the file's bytes, gunzipped for ``*.gz``; gzip errors become UserErrors."""

    def __init__(self, path: storage.Path):
        self.path = path

    def __enter__(self) -> BinaryIO:
        self.raw = self.path.open("rb")
        return gzip.GzipFile(fileobj=self.raw) if self.path.name.lower().endswith(".gz") else self.raw

    def __exit__(self, *exc) -> None:
        self.raw.close()


def _gzip_guard(path: storage.Path, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """``chunks``, with a corrupt ``.gz`` file reported as a UserError."""
    if not path.name.lower().endswith(".gz"):
        yield from chunks
        return
    try:
        yield from chunks
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise UserError(f"{path}: not a readable gzip file ({e})") from None


def _jsonl_rows(f: BinaryIO, path: storage.Path) -> Iterator[tuple[int, dict]]:
    for line, raw in enumerate(_gzip_guard(path, iter(f)), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{where(path, line)}: not UTF-8 ({e.reason} at byte {e.start})") from None
        if line == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{where(path, line)}: invalid JSON ({e.msg} at column {e.colno}); "
                            "expected one JSON object per line") from None
        if not isinstance(row, dict):
            raise UserError(f"{where(path, line)}: expected a JSON object, got {describe(row)}")
        yield line, row


def _json_rows(path: storage.Path) -> Iterator[tuple[int, dict]]:
    """``.json``: one JSON array of objects (rows numbered from 1), or JSON lines."""
    with _open(path) as f:
        data = b"".join(_gzip_guard(path, iter(lambda: f.read(1 << 20), b"")))
    body = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    if body.lstrip()[:1] != b"[":
        try:
            yield from _jsonl_rows(io.BytesIO(data), path)
        except UserError as e:
            if "invalid JSON" in str(e):
                try:
                    whole = json.loads(data.decode("utf-8-sig"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    whole = None
                if isinstance(whole, dict):
                    raise UserError(f"{path}: one JSON object (keys {sorted(whole)[:8]}), not records; expected "
                                    "one JSON array of objects or one object per line") from None
            raise
        return
    try:
        rows = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno}); expected one JSON "
                        "array of objects or one object per line") from None
    if not isinstance(rows, list):
        raise UserError(f"{path}: expected one JSON array of objects, got {describe(rows)}")
    for line, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise UserError(f"{where(path, line)}: expected a JSON object (array element {line}), "
                            f"got {describe(row)}")
        yield line, row


def _parquet_rows(path: storage.Path) -> Iterator[tuple[int, dict]]:
    import pyarrow as pa  # heavy import, only when needed
    import pyarrow.parquet as pq

    with path.open("rb") as f:
        try:
            yield from _numbered(pq.ParquetFile(f).iter_batches(batch_size=1024))
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: not a readable parquet file ({e})") from None


def _numbered(batches, line: int = 0) -> Iterator[tuple[int, dict]]:
    """Rows of Arrow record batches with 1-based numbers continuing after ``line``."""
    for batch in batches:
        for row in batch.to_pylist():
            line += 1
            yield line, row


def _arrow_rows(files: list[storage.Path], name: storage.Path) -> Iterator[tuple[int, dict]]:
    """Rows of Arrow IPC files (``datasets`` writes the stream format; the file format is read too), numbered
    across the files."""
    import pyarrow as pa

    line = 0
    for file in files:
        if not file.is_file():
            raise UserError(f"{file}: no such file (listed in {name}/state.json)")
        with file.open("rb") as f:
            try:
                try:
                    reader = pa.ipc.open_stream(f)
                except pa.ArrowInvalid:
                    f.seek(0)
                    reader = pa.ipc.open_file(f)
                    batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
                else:
                    batches = iter(reader)
                for line, row in _numbered(batches, line):
                    yield line, row
            except (pa.ArrowException, OSError) as e:
                raise UserError(f"{file}: not a readable Arrow file ({e})") from None


def dataset_dict_splits(folder: str | os.PathLike) -> list[str] | None:
    """The splits of a ``DatasetDict.save_to_disk`` folder (from ``dataset_dict.json``); None for other folders."""
    folder = storage.path(folder)
    marker = folder / "dataset_dict.json"
    if not marker.is_file():
        return None
    try:
        splits = json.loads(marker.read_text())["splits"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        splits = None
    if not isinstance(splits, list):
        splits = sorted(p.name for p in folder.iterdir() if (p / "state.json").is_file())
    return [str(s) for s in splits]


def with_split(path: str | os.PathLike, split: str | None) -> storage.Path:
    """``path``, or its split's folder when ``path`` is a ``DatasetDict`` folder (``split`` required then)."""
    path = storage.path(path)
    splits = dataset_dict_splits(path) if path.is_dir() else None
    if splits is None:
        return path
    if split is None:
        raise UserError(f"{path}: a DatasetDict folder (datasets.save_to_disk) with splits {', '.join(splits)}; "
                        f"pass one split (--split {splits[0]}, or the folder {path / splits[0]})")
    if split not in splits:
        raise UserError(f"{path}: no split {split!r} in this DatasetDict folder; its splits are {', '.join(splits)}")
    return path / split


def _dataset_folder_rows(folder: storage.Path) -> Iterator[tuple[int, dict]]:
    """A ``Dataset.save_to_disk`` folder: the ``.arrow`` files named in ``state.json`` (``_data_files``), in order."""
    with_split(folder, None)  # a DatasetDict folder: the error lists its splits
    state_path = folder / "state.json"
    if not state_path.is_file():
        raise UserError(f"{folder}: a folder, but not a datasets.save_to_disk folder (no state.json or "
                        f"dataset_dict.json in it); expected {FORMATS}")
    try:
        state = json.loads(state_path.read_text())
        files = [folder / entry["filename"] for entry in state["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{state_path}: expected datasets' state.json with \"_data_files\": [{{\"filename\": ...}}] "
                        f"({type(e).__name__}: {e})") from None
    yield from _arrow_rows(files, folder)


# ---------------------------------------------------------------------------------------------------------- writing


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Writes one JSON object per line atomically (:func:`percausal_jax.atomic.atomic_file`: a local file is
    renamed into place, a ``gs://`` object uploaded whole); nothing is written if ``records`` raises.

    Returns the number of records written. Readers never see a half-written file, even after a crash.
    """
    count = 0
    with atomic.atomic_file(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count
