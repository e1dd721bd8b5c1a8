"""Record schemas, kinds and validation: the one place that decides what a valid input row looks like.

Three kinds of rows are accepted (one kind per file):

* **canonical** (LongLaMP-native): ``{id, user_id, task, input, output, profile: [{...item fields...}]}``. Prompts are
  built from it by :mod:`percausal_jax.data.prompts`. Rows straight from the LongLaMP HF release are accepted too:
  their user id lives in ``reviewerId`` / ``name`` / ``author`` (which also tells the task), and they carry no ``id``,
  so one is made as ``f"{file_stem}-{line}"`` (stable as long as the file is not edited). Every other row must
  carry its own string ``id``: a generated id would silently change when a user reorders or filters a file.
* **prompt**: ``{id, prompt, prompt_no_profile, completion}``, ready-made text for both passes.
* **trl**: TRL prompt/completion, ``{prompt: str, completion: str}`` or the conversational form with lists of
  ``{role, content}`` messages. TRL's conversational *language-modeling* rows ``{messages: [...]}`` are read as
  prompt/completion: the last message (it must be the assistant's turn) is the completion, everything before it
  the prompt (``{"prompt": messages[:-1], "completion": [messages[-1]]}``, other keys kept). TRL rows have no
  profile-free prompt, so only plain (non-causal) training can use them.

Extra keys are preserved everywhere (``personal_spans``, ``reviewerId``, ...). ``personal_spans``, when present, is
checked: ``[[start, end), ...]`` character offsets into ``output`` (canonical) or ``completion`` (prompt).

:func:`read_records` / :func:`read_numbered` read one file's rows with :func:`percausal_jax.data.files.iter_rows`
and validate them. File formats, local and ``gs://`` paths, and writing (``write_jsonl``) are
:mod:`percausal_jax.data.files`' concern.

Dirty rows, as real releases have them:

* a ``null`` or missing text/scalar field of a profile item or of ``target`` (a review without ``summary``) is read
  as ``""``;
* a row whose *required* text is null, missing or empty (``input``/``output`` of canonical rows; ``prompt`` /
  ``completion`` of prompt and TRL rows; ``messages``) is **skipped**, and counted in a :class:`SkipReport` by reason
  (``empty_output``, ...) with its first ids. ``strict=True`` makes every such skip an error instead.

Every other problem raises :class:`~percausal_jax.errors.UserError` naming file, line (for parquet/arrow/JSON
arrays: 1-based row), field and what was expected.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from percausal_jax import storage
from percausal_jax.data.files import iter_rows
from percausal_jax.data.skips import SkipReport, Skipped, admit
from percausal_jax.errors import UserError, describe, where

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


def row_label(row: Any, path: str | os.PathLike, line: int) -> str:
    """How a report names a row: its id (the generated one for LongLaMP rows), else ``file:row``."""
    if isinstance(row, dict):
        if isinstance(row.get("id"), str) and row["id"].strip():
            return row["id"]
        if "id" not in row and any(f in row for f in LONGLAMP_USER_FIELDS):
            return f"{file_stem(path)}-{line}"
    return f"{_base_name(path)}:{line}"


def file_stem(path: str | os.PathLike) -> str:
    """The name LongLaMP ids are made from: the file name without ``.gz`` and its last suffix (``val.jsonl.gz``
    → ``val``; a ``save_to_disk`` folder: its name)."""
    name = _base_name(path)
    name = name[:-3] if name.lower().endswith(".gz") else name
    return name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name


def _base_name(path: str | os.PathLike) -> str:
    s = os.fspath(path)
    return s.rstrip("/").rsplit("/", 1)[-1] or s


# ---------------------------------------------------------------------------------------------------------- reading


def read_records(path: str | os.PathLike, *, require_output: bool = True, strict: bool = False,
                 report: SkipReport | None = None) -> list[dict]:
    """Reads a file (or ``save_to_disk`` folder; formats: :mod:`percausal_jax.data.files`) of one record kind;
    returns validated, normalized dicts. Rows with an empty required field are skipped and counted in ``report``
    (``strict``: a located error instead).

    ``require_output=False`` admits canonical rows without ``output`` (e.g. LaMP test questions, for generation).
    Canonical and prompt ids must be unique within the file.
    """
    return [record for _, record in read_numbered(path, require_output=require_output, strict=strict,
                                                  report=report)]


def read_numbered(path: str | os.PathLike, *, require_output: bool = True, strict: bool = False,
                  report: SkipReport | None = None) -> list[tuple[int, dict]]:
    """:func:`read_records` with each record's 1-based line (row) number in the file, e.g. to name rows that
    have no id by their place, which skipped rows do not shift."""
    path = storage.path(path)
    local = SkipReport()
    records: list[tuple[int, dict]] = []
    first_kind: Kind | None = None
    seen_ids: dict[str, int] = {}
    for line, row in iter_rows(path):
        kind = detect_kind(row, path, line)
        if first_kind is None:
            first_kind = kind
        elif kind != first_kind:
            raise UserError(f"{where(path, line)}: this is a {kind} record but the file started with {first_kind} "
                            "records; one file must hold one kind")
        record = admit(lambda: validate(row, path, line, kind=kind, require_output=require_output),
                       row_label(row, path, line), strict=strict, report=local)
        if record is None:
            continue
        if "id" in record:
            if record["id"] in seen_ids:
                raise UserError(f"{where(path, line, 'id')}: duplicate id {record['id']!r} "
                                f"(first used on line {seen_ids[record['id']]}); ids must be unique")
            seen_ids[record["id"]] = line
        records.append((line, record))
    if report is not None:
        report.merge(local)
    if not records:
        if local.skipped:
            raise UserError(f"{path}: no records left: every row was skipped ({_reasons(local)}); "
                            "expected at least one usable record")
        raise UserError(f"{path}: no records; expected at least one")
    return records


def _reasons(report: SkipReport) -> str:
    return ", ".join(f"{reason} {n}: first {', '.join(report.first[reason])}"
                     for reason, n in sorted(report.counts.items()))


def validate(row: dict, path: str | os.PathLike = "<record>", line: int = 0, *, kind: Kind | None = None,
             require_output: bool = True) -> dict:
    """Validates one row of any kind (detected unless given); raises :class:`Skipped` for rows to leave out."""
    kind = kind or detect_kind(row, path, line)
    if kind == "canonical":
        return validate_canonical(row, path, line, require_output=require_output)
    if kind == "prompt":
        return validate_prompt(row, path, line)
    return validate_trl(row, path, line)


def detect_kind(record: dict, path: str | os.PathLike = "<record>", line: int | None = None) -> Kind:
    """Tells the kind from the keys: ``prompt_no_profile`` → prompt; ``prompt`` + ``completion`` or ``messages``
    → trl; ``input`` or ``profile`` → canonical."""
    if "prompt_no_profile" in record:
        return "prompt"
    if "prompt" in record and "completion" in record:
        return "trl"
    if "messages" in record and "prompt" not in record and "completion" not in record:
        return "trl"
    if "input" in record or "profile" in record:
        return "canonical"
    raise UserError(f"{where(path, line)}: unknown record kind (keys {sorted(record)}); expected canonical "
                    "{id, user_id, task, input, output, profile}, prompt {id, prompt, prompt_no_profile, completion} "
                    "or TRL {prompt, completion} / {messages}")


# -------------------------------------------------------------------------------------------------------- validation


def validate_canonical(row: dict, path: str | os.PathLike, line: int, *, require_output: bool = True) -> dict:
    """Checks a canonical row (see module doc) and returns a normalized copy with ``id``, ``user_id``, ``task`` set
    and null/missing profile and target fields as ``""``; raises :class:`Skipped` for an empty input or output."""
    record = dict(row)
    longlamp_field = next((f for f in LONGLAMP_USER_FIELDS if f in row), None)
    if "id" not in row and longlamp_field is not None:
        record["id"] = f"{file_stem(path)}-{line}"
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
    _required(record, "input", path, line)
    if require_output or "output" in record:
        output = _required(record, "output", path, line)
        if "personal_spans" in record:
            _check_spans(record["personal_spans"], output, path, line, "output")

    profile = record.get("profile")
    if not isinstance(profile, list):
        raise UserError(f"{where(path, line, 'profile')}: expected a list of objects, got {describe(profile)}")
    record["profile"] = [_check_fields(item, schema.item_fields, path, line, f"profile[{i}]")
                         for i, item in enumerate(profile)]
    if schema.target_fields:
        record["target"] = _check_fields(record.get("target"), schema.target_fields, path, line, "target")
    return record


def validate_prompt(row: dict, path: str | os.PathLike, line: int) -> dict:
    """Checks ``{id, prompt, prompt_no_profile, completion}``; ``prompt_no_profile`` may be empty (no context)."""
    _text(row, "id", path, line, nonempty=True)
    _required(row, "prompt", path, line)
    _text(row, "prompt_no_profile", path, line)
    completion = _required(row, "completion", path, line)
    if "personal_spans" in row:
        _check_spans(row["personal_spans"], completion, path, line, "completion")
    return dict(row)


def validate_trl(row: dict, path: str | os.PathLike, line: int) -> dict:
    """Checks TRL prompt/completion: both strings, or both non-empty lists of ``{role, content}`` messages;
    ``{messages}`` rows are converted (module doc). Empty prompts or completions raise :class:`Skipped`."""
    if "messages" in row and "prompt" not in row and "completion" not in row:
        return _from_messages(row, path, line)
    prompt, completion = row.get("prompt"), row.get("completion")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if value is None or value == [] or (isinstance(value, str) and not value.strip()):
            raise Skipped(f"empty_{name}", f"{where(path, line, name)}: expected a non-empty string or a non-empty "
                          f"list of {{role, content}} messages, got {describe(value)}")
    if isinstance(prompt, str) or isinstance(completion, str):
        _text(row, "prompt", path, line, nonempty=True)
        _text(row, "completion", path, line, nonempty=True)
    else:
        _check_messages(prompt, path, line, "prompt")
        _check_messages(completion, path, line, "completion")
        if all(not m["content"].strip() for m in completion):
            raise Skipped("empty_completion", f"{where(path, line, 'completion')}: every message's content is "
                          "empty; expected the completion's text")
    return dict(row)


def _from_messages(row: dict, path: str | os.PathLike, line: int) -> dict:
    messages = row.get("messages")
    if messages is None or messages == []:
        raise Skipped("empty_messages", f"{where(path, line, 'messages')}: expected a non-empty list of "
                      f"{{role, content}} messages, got {describe(messages)}")
    _check_messages(messages, path, line, "messages")
    last = messages[-1]
    if last["role"] != "assistant":
        raise UserError(f"{where(path, line, f'messages[{len(messages) - 1}].role')}: expected the conversation to "
                        f"end with the assistant's turn (the completion), got role {last['role']!r}")
    if not last["content"].strip():
        raise Skipped("empty_completion", f"{where(path, line, f'messages[{len(messages) - 1}].content')}: the "
                      "last assistant turn is empty; expected the completion's text")
    if len(messages) == 1:
        raise Skipped("empty_prompt", f"{where(path, line, 'messages')}: only the assistant's turn; expected at "
                      "least one message before it (the prompt)")
    extra = {k: v for k, v in row.items() if k != "messages"}
    return {**extra, "prompt": list(messages[:-1]), "completion": [last]}


def _check_messages(messages: Any, path: str | os.PathLike, line: int, name: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where(path, line, name)}: expected a non-empty string or a non-empty list of "
                        f"{{role, content}} messages, got {describe(messages)}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"{where(path, line, f'{name}[{i}]')}: expected a {{role, content}} object, "
                            f"got {describe(message)}")
        _text(message, "role", path, line, nonempty=True, prefix=f"{name}[{i}].")
        _text(message, "content", path, line, prefix=f"{name}[{i}].")


def _check_fields(obj: Any, fields: dict[str, str], path: str | os.PathLike, line: int, name: str) -> dict:
    """Checks that ``obj`` is an object whose listed fields are strings (TEXT) or strings/numbers (SCALAR);
    returns it with null or missing listed fields (and NaN scalars) as ``""`` (a copy when it changed)."""
    if not isinstance(obj, dict):
        raise UserError(f"{where(path, line, name)}: expected an object with fields {sorted(fields)}, "
                        f"got {describe(obj)}")
    fixed: dict | None = None
    for key, kind in fields.items():
        value = obj.get(key)
        if value is None or (kind == SCALAR and isinstance(value, float) and math.isnan(value)):
            if fixed is None:
                fixed = dict(obj)
            fixed[key] = ""
            continue
        if kind == TEXT:
            if not isinstance(value, str):
                raise UserError(f"{where(path, line, f'{name}.{key}')}: expected a string, got {describe(value)}")
        elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise UserError(f"{where(path, line, f'{name}.{key}')}: expected a string or number, "
                            f"got {describe(value)}")
    return obj if fixed is None else fixed


def _check_spans(spans: Any, text: str, path: str | os.PathLike, line: int, target: str) -> None:
    """``personal_spans`` must be ``[[start, end], ...]`` with ``0 <= start < end <= len(target)``."""
    if not isinstance(spans, list):
        raise UserError(f"{where(path, line, 'personal_spans')}: expected a list of [start, end] pairs, "
                        f"got {describe(spans)}")
    for i, span in enumerate(spans):
        ok = (isinstance(span, list) and len(span) == 2 and all(type(v) is int for v in span)
              and 0 <= span[0] < span[1] <= len(text))
        if not ok:
            raise UserError(f"{where(path, line, f'personal_spans[{i}]')}: expected [start, end] integers with "
                            f"0 <= start < end <= {len(text)} (the length of '{target}'), got {span!r}")


def _required(obj: dict, key: str, path: str | os.PathLike, line: int) -> str:
    """A required text: null, missing or empty (blank) raises :class:`Skipped` (reason ``empty_<key>``); any other
    non-string is an error."""
    value = obj.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        got = "missing" if key not in obj else f"got {describe(value)}"
        detail = "missing; expected a non-empty string" if key not in obj else f"expected a non-empty string, {got}"
        raise Skipped(f"empty_{key}", f"{where(path, line, key)}: {detail}")
    return _text(obj, key, path, line, nonempty=True)


def _text(obj: dict, key: str, path: str | os.PathLike, line: int, *, nonempty: bool = False,
          prefix: str = "") -> str:
    """Returns ``obj[key]`` if it is a string (non-empty if asked), else raises a located UserError."""
    expected = "a non-empty string" if nonempty else "a string"
    if key not in obj:
        raise UserError(f"{where(path, line, prefix + key)}: missing; expected {expected}")
    value = obj[key]
    if not isinstance(value, str) or (nonempty and not value.strip()):
        raise UserError(f"{where(path, line, prefix + key)}: expected {expected}, got {describe(value)}")
    return value
