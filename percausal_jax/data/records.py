"""Record schemas, readers and writers: the one place that decides what a valid input row looks like.

Three kinds of rows are accepted (one kind per file):

* **canonical** (LongLaMP-native): ``{id, user_id, task, input, output, profile: [{...item fields...}]}``. Prompts are
  built from it by :mod:`percausal_jax.data.prompts`. Rows straight from the LongLaMP HF release are accepted too:
  their user id lives in ``reviewerId`` / ``name`` / ``author`` (which also tells the task), and they carry no ``id``,
  so one is made as ``f"{file_stem}-{line}"`` (stable as long as the file is not edited). Every other row must
  carry its own string ``id``: a generated id would silently change when a user reorders or filters a file.
* **prompt**: ``{id, prompt, prompt_no_profile, completion}``, ready-made text for both passes.
* **trl**: TRL prompt/completion, ``{prompt: str, completion: str}`` or the conversational form with lists of
  ``{role, content}`` messages. It has no profile-free prompt, so only plain (non-causal) training can use it.

Extra keys are preserved everywhere (``personal_spans``, ``reviewerId``, ...). ``personal_spans``, when present, is
checked: ``[[start, end), ...]`` character offsets into ``output`` (canonical) or ``completion`` (prompt).

Every problem raises :class:`~percausal_jax.errors.UserError` naming file, line (for parquet: 1-based row), field and
what was expected. Rows are JSON; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from percausal_jax.errors import UserError, where

Kind = Literal["canonical", "prompt", "trl"]

TEXT, SCALAR = "text", "scalar"  # a field holds a string / a string or number (ratings, dates)


@dataclass(frozen=True)
class TaskSchema:
    """Fields a task's builder reads: on every profile item, and on the record's ``target`` object (if any)."""

    item_fields: dict[str, str]
    target_fields: dict[str, str] = field(default_factory=dict)


# Field names follow the public releases (data.md §1-3). Amazon (DPL) rows are flattened by the converter: the
# item title/description joined from the meta table sit next to each review as item_title / item_description.
TASK_SCHEMAS: dict[str, TaskSchema] = {
    "product_review": TaskSchema({"overall": SCALAR, "description": TEXT, "summary": TEXT, "reviewText": TEXT}),
    "abstract_generation": TaskSchema({"title": TEXT, "abstract": TEXT}),
    "topic_writing": TaskSchema({"summary": TEXT, "content": TEXT}),
    "LaMP-1": TaskSchema({"title": TEXT, "abstract": TEXT}),
    "LaMP-2": TaskSchema({"description": TEXT, "tag": TEXT}),
    "LaMP-3": TaskSchema({"text": TEXT, "score": SCALAR}),
    "LaMP-4": TaskSchema({"title": TEXT, "text": TEXT}),
    "LaMP-5": TaskSchema({"title": TEXT, "abstract": TEXT}),
    "LaMP-6": TaskSchema({"title": TEXT, "text": TEXT}),
    "LaMP-7": TaskSchema({"text": TEXT}),
    "amazon_review": TaskSchema(
        {"item_title": TEXT, "item_description": TEXT, "rating": SCALAR, "title": TEXT, "text": TEXT,
         "timestamp": SCALAR},
        target_fields={"item_title": TEXT, "item_description": TEXT, "rating": SCALAR, "title": TEXT},
    ),
    "synthetic": TaskSchema({"text": TEXT}),
}

# LongLaMP HF user-id field -> task (data.md §1, record schema table).
LONGLAMP_USER_FIELDS = {"reviewerId": "product_review", "name": "abstract_generation", "author": "topic_writing"}


# ---------------------------------------------------------------------------------------------------------- reading


def read_records(path: str | os.PathLike, *, require_output: bool = True) -> list[dict]:
    """Reads a ``.jsonl`` or ``.parquet`` file of one record kind; returns validated, normalized dicts.

    ``require_output=False`` admits canonical rows without ``output`` (e.g. LaMP test questions, for generation).
    Canonical and prompt ids must be unique within the file.
    """
    path = Path(path)
    records: list[dict] = []
    first_kind: Kind | None = None
    seen_ids: dict[str, int] = {}
    for line, row in iter_rows(path):
        kind = detect_kind(row, path, line)
        if first_kind is None:
            first_kind = kind
        elif kind != first_kind:
            raise UserError(f"{where(path, line)}: this is a {kind} record but the file started with {first_kind} "
                            "records; one file must hold one kind")
        if kind == "canonical":
            record = validate_canonical(row, path, line, require_output=require_output)
        elif kind == "prompt":
            record = validate_prompt(row, path, line)
        else:
            record = validate_trl(row, path, line)
        if "id" in record:
            if record["id"] in seen_ids:
                raise UserError(f"{where(path, line, 'id')}: duplicate id {record['id']!r} "
                                f"(first used on line {seen_ids[record['id']]}); ids must be unique")
            seen_ids[record["id"]] = line
        records.append(record)
    if not records:
        raise UserError(f"{path}: no records; expected at least one")
    return records


def detect_kind(record: dict, path: str | os.PathLike = "<record>", line: int | None = None) -> Kind:
    """Tells the kind from the keys: ``prompt_no_profile`` → prompt; ``prompt`` + ``completion`` → trl;
    ``input`` or ``profile`` → canonical."""
    if "prompt_no_profile" in record:
        return "prompt"
    if "prompt" in record and "completion" in record:
        return "trl"
    if "input" in record or "profile" in record:
        return "canonical"
    raise UserError(f"{where(path, line)}: unknown record kind (keys {sorted(record)}); expected canonical "
                    "{id, user_id, task, input, output, profile}, prompt {id, prompt, prompt_no_profile, completion} "
                    "or TRL {prompt, completion}")


def iter_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """Yields ``(line, row)`` with 1-based line numbers (parquet: row numbers); blank JSONL lines are skipped."""
    if not path.is_file():
        raise UserError(f"{path}: no such file; expected a .jsonl or .parquet file of records")
    if path.suffix == ".jsonl":
        yield from _jsonl_rows(path)
    elif path.suffix == ".parquet":
        import pyarrow as pa  # heavy import, only when needed
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: not a readable parquet file ({e})") from None
        yield from enumerate(rows, start=1)
    else:
        raise UserError(f"{path}: unsupported file type {path.suffix!r}; expected .jsonl or .parquet")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open("rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where(path, line)}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"{where(path, line)}: invalid JSON ({e.msg} at column {e.colno}); "
                                "expected one JSON object per line") from None
            if not isinstance(row, dict):
                raise UserError(f"{where(path, line)}: expected a JSON object, got {_describe(row)}")
            yield line, row


# -------------------------------------------------------------------------------------------------------- validation


def validate_canonical(row: dict, path: str | os.PathLike, line: int, *, require_output: bool = True) -> dict:
    """Checks a canonical row (see module doc) and returns a normalized copy with ``id``, ``user_id``, ``task`` set."""
    record = dict(row)
    longlamp_field = next((f for f in LONGLAMP_USER_FIELDS if f in row), None)
    if "id" not in row and longlamp_field is not None:
        record["id"] = f"{Path(path).stem}-{line}"
    if "user_id" not in row and longlamp_field is not None:
        record["user_id"] = _text(row, longlamp_field, path, line, nonempty=True)
    if "task" not in row and longlamp_field is not None:
        record["task"] = LONGLAMP_USER_FIELDS[longlamp_field]

    _text(record, "id", path, line, nonempty=True)
    _text(record, "user_id", path, line, nonempty=True)
    task = _text(record, "task", path, line, nonempty=True)
    if task not in TASK_SCHEMAS:
        raise UserError(f"{where(path, line, 'task')}: unknown task {task!r}; expected one of {sorted(TASK_SCHEMAS)}")
    schema = TASK_SCHEMAS[task]
    _text(record, "input", path, line, nonempty=True)
    if require_output or "output" in record:
        output = _text(record, "output", path, line, nonempty=True)
        if "personal_spans" in record:
            _check_spans(record["personal_spans"], output, path, line, "output")

    profile = record.get("profile")
    if not isinstance(profile, list):
        raise UserError(f"{where(path, line, 'profile')}: expected a list of objects, got {_describe(profile)}")
    for i, item in enumerate(profile):
        _check_fields(item, schema.item_fields, path, line, f"profile[{i}]")
    if schema.target_fields:
        _check_fields(record.get("target"), schema.target_fields, path, line, "target")
    return record


def validate_prompt(row: dict, path: str | os.PathLike, line: int) -> dict:
    """Checks ``{id, prompt, prompt_no_profile, completion}``; ``prompt_no_profile`` may be empty (no context)."""
    _text(row, "id", path, line, nonempty=True)
    _text(row, "prompt", path, line, nonempty=True)
    _text(row, "prompt_no_profile", path, line)
    completion = _text(row, "completion", path, line, nonempty=True)
    if "personal_spans" in row:
        _check_spans(row["personal_spans"], completion, path, line, "completion")
    return dict(row)


def validate_trl(row: dict, path: str | os.PathLike, line: int) -> dict:
    """Checks TRL prompt/completion: both strings, or both non-empty lists of ``{role, content}`` messages."""
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, str) or isinstance(completion, str):
        _text(row, "prompt", path, line, nonempty=True)
        _text(row, "completion", path, line, nonempty=True)
    else:
        _check_messages(prompt, path, line, "prompt")
        _check_messages(completion, path, line, "completion")
    return dict(row)


def _check_messages(messages: Any, path: str | os.PathLike, line: int, name: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where(path, line, name)}: expected a non-empty string or a non-empty list of "
                        f"{{role, content}} messages, got {_describe(messages)}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"{where(path, line, f'{name}[{i}]')}: expected a {{role, content}} object, "
                            f"got {_describe(message)}")
        _text(message, "role", path, line, nonempty=True, prefix=f"{name}[{i}].")
        _text(message, "content", path, line, nonempty=True, prefix=f"{name}[{i}].")


def _check_fields(obj: Any, fields: dict[str, str], path: str | os.PathLike, line: int, name: str) -> None:
    """Checks that ``obj`` is an object whose listed fields are strings (TEXT) or strings/numbers (SCALAR)."""
    if not isinstance(obj, dict):
        raise UserError(f"{where(path, line, name)}: expected an object with fields {sorted(fields)}, "
                        f"got {_describe(obj)}")
    for key, kind in fields.items():
        if kind == TEXT:
            _text(obj, key, path, line, prefix=f"{name}.")
            continue
        if key not in obj:
            raise UserError(f"{where(path, line, f'{name}.{key}')}: missing; expected a string or number")
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise UserError(f"{where(path, line, f'{name}.{key}')}: expected a string or number, "
                            f"got {_describe(value)}")


def _check_spans(spans: Any, text: str, path: str | os.PathLike, line: int, target: str) -> None:
    """``personal_spans`` must be ``[[start, end], ...]`` with ``0 <= start < end <= len(target)``."""
    if not isinstance(spans, list):
        raise UserError(f"{where(path, line, 'personal_spans')}: expected a list of [start, end] pairs, "
                        f"got {_describe(spans)}")
    for i, span in enumerate(spans):
        ok = (isinstance(span, list) and len(span) == 2 and all(type(v) is int for v in span)
              and 0 <= span[0] < span[1] <= len(text))
        if not ok:
            raise UserError(f"{where(path, line, f'personal_spans[{i}]')}: expected [start, end] integers with "
                            f"0 <= start < end <= {len(text)} (the length of '{target}'), got {span!r}")


def _text(obj: dict, key: str, path: str | os.PathLike, line: int, *, nonempty: bool = False,
          prefix: str = "") -> str:
    """Returns ``obj[key]`` if it is a string (non-empty if asked), else raises a located UserError."""
    expected = "a non-empty string" if nonempty else "a string"
    if key not in obj:
        raise UserError(f"{where(path, line, prefix + key)}: missing; expected {expected}")
    value = obj[key]
    if not isinstance(value, str) or (nonempty and not value.strip()):
        raise UserError(f"{where(path, line, prefix + key)}: expected {expected}, got {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    """Short description of a bad value for error messages: its JSON type and a clipped repr."""
    if value is None:
        return "null"
    names = {str: "string", bool: "boolean", int: "number", float: "number", list: "list", dict: "object"}
    shown = repr(value)
    return f"{names.get(type(value), type(value).__name__)} {shown[:40] + '...' if len(shown) > 40 else shown}"


# ---------------------------------------------------------------------------------------------------------- writing


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Writes one JSON object per line atomically (temp file in the same folder, then ``os.replace``).

    Returns the number of records written. Readers never see a half-written file, even after a crash.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        count = 0
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count
