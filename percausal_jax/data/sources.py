"""Raw public releases → canonical records (data.md §1–3); used by ``percausal prepare``, the TFDS builders and
the ``data_prep/`` scripts. Every record returned has passed :func:`records.validate_canonical`.

* **LongLaMP** (HF parquet, or JSONL saved from ``datasets``): rows ``{reviewerId|name|author, input, output,
  profile}`` are already canonical in all but name; :func:`records.read_records` fills ``id`` (``{file stem}-{row}``),
  ``user_id`` and ``task``. :func:`longlamp_files` finds a split's files in a downloaded snapshot.
* **LaMP**: ``{split}_questions.json`` (a list of ``{id, input, profile}``) merged by ``id`` with
  ``{split}_outputs.json`` (``{task: "LaMP_N", golds: [{id, output}]}``). LaMP has no user ids: each question
  carries its own user's profile, so ``user_id`` = the question id. Positions in these JSON arrays are reported as
  1-based "lines".
* **Amazon reviews (DPL/NextQuill)**: DPL-main rows ``{user_id, profile: [{rating, title, text, asin, timestamp}],
  data: {asin, rating, title, text}}`` joined by ``asin`` with DPL-meta rows ``{asin, title, description}`` into the
  ``amazon_review`` shape of :mod:`percausal_jax.data.prompts`: each review gets ``item_title`` /
  ``item_description`` next to it, ``target`` = the target item and review title/rating, ``output`` = the target
  review text, ``input`` = the target item title, ``id`` = ``{user_id}-{target asin}`` (DPL keeps one review per
  user and item). A list-valued ``description`` (raw Amazon 2023 meta) is joined with spaces.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from percausal_jax.data.records import iter_rows, read_records, validate_canonical
from percausal_jax.errors import UserError, where

LONGLAMP_CONFIGS = ("abstract_generation_temporal", "abstract_generation_user", "product_review_temporal",
                    "product_review_user", "topic_writing_temporal", "topic_writing_user")
LONGLAMP_SPLITS = ("train", "val", "test")
LAMP_SPLITS = ("train", "dev", "test")


# ------------------------------------------------------------------------------------------------------ LongLaMP


def longlamp_files(root: str | os.PathLike, split: str) -> list[Path]:
    """The split's ``.parquet`` files under ``root`` (sorted): names ``{split}-*.parquet`` / ``{split}.parquet``
    (HF repository layout) or any parquet file inside a folder named ``{split}`` (datasets-server export)."""
    root = Path(root)
    return sorted(p for p in root.rglob("*.parquet")
                  if p.name.startswith(f"{split}-") or p.stem == split or split in p.relative_to(root).parts[:-1])


def read_longlamp(paths: Sequence[str | os.PathLike]) -> Iterator[dict]:
    """Canonical records from LongLaMP parquet/JSONL files, one file in memory at a time; ids unique across files."""
    seen: dict[str, Path] = {}
    for path in map(Path, paths):
        for record in read_records(path):
            if record["id"] in seen:
                raise UserError(f"{path}: id {record['id']!r} was already produced by {seen[record['id']]}; "
                                "give files of one split distinct names")
            seen[record["id"]] = path
            yield record


# ---------------------------------------------------------------------------------------------------------- LaMP


def lamp_outputs_path(questions: str | os.PathLike) -> Path | None:
    """``dev_questions.json`` → ``dev_outputs.json`` beside it, if that file exists."""
    questions = Path(questions)
    candidate = questions.with_name(questions.name.replace("_questions", "_outputs"))
    return candidate if candidate != questions and candidate.is_file() else None


def read_lamp(questions: str | os.PathLike, outputs: str | os.PathLike | None = None, *, task: str | None = None,
              require_output: bool = True) -> list[dict]:
    """Canonical LaMP records; ``task`` (``"LaMP-3"``) defaults to the outputs file's ``task`` (``"LaMP_3"``)."""
    questions = Path(questions)
    rows = _load_json(questions)
    if not isinstance(rows, list):
        raise UserError(f"{questions}: expected a JSON list of {{id, input, profile}} questions, "
                        f"got {type(rows).__name__}")
    golds: dict[str, str] = {}
    if outputs is not None:
        outputs = Path(outputs)
        file_task, golds = _lamp_golds(outputs)
        if task is not None and file_task is not None and task != file_task:
            raise UserError(f"{where(outputs, None, 'task')}: the file is for {file_task}, but {task} was asked for")
        task = task or file_task
    if task is None:
        raise UserError(f"{questions}: cannot tell the LaMP task; pass it (e.g. --task LaMP-3) or the outputs file")
    records, seen = [], set()
    for line, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise UserError(f"{where(questions, line, 'id')}: expected an object with a string id")
        if row["id"] in seen:
            raise UserError(f"{where(questions, line, 'id')}: duplicate id {row['id']!r}; ids must be unique")
        seen.add(row["id"])
        record = {**row, "user_id": row.get("user_id", row["id"]), "task": task}
        if row["id"] in golds:
            record["output"] = golds.pop(row["id"])
        elif outputs is not None:
            raise UserError(f"{where(questions, line, 'id')}: question {row['id']!r} has no gold output in {outputs}")
        records.append(validate_canonical(record, questions, line, require_output=require_output))
    if golds:
        raise UserError(f"{outputs}: gold outputs for ids {sorted(golds)[:5]} have no question in {questions}")
    return records


def _lamp_golds(path: Path) -> tuple[str | None, dict[str, str]]:
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("golds"), list):
        raise UserError(f"{where(path, None, 'golds')}: expected {{\"task\": \"LaMP_N\", \"golds\": [{{id, output}}]}}")
    golds: dict[str, str] = {}
    for line, gold in enumerate(data["golds"], start=1):
        if not (isinstance(gold, dict) and isinstance(gold.get("id"), str) and isinstance(gold.get("output"), str)):
            raise UserError(f"{where(path, line, 'golds')}: expected {{\"id\": str, \"output\": str}}, "
                            f"got {gold!r:.60}")
        golds[gold["id"]] = gold["output"]
    task = data.get("task")
    return (task.replace("_", "-") if isinstance(task, str) else None), golds


def _load_json(path: Path):
    if not path.is_file():
        raise UserError(f"{path}: no such file; expected a LaMP JSON file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a JSON file ({e})") from None


# -------------------------------------------------------------------------------------------------------- Amazon


def read_amazon_meta(path: str | os.PathLike) -> dict[str, tuple[str, str]]:
    """DPL-meta rows → ``{asin: (title, description)}``."""
    meta: dict[str, tuple[str, str]] = {}
    for line, row in iter_rows(Path(path)):
        for key in ("asin", "title"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise UserError(f"{where(path, line, key)}: expected a non-empty string")
        description = row.get("description")
        if isinstance(description, list) and all(isinstance(d, str) for d in description):
            description = " ".join(description)
        if not isinstance(description, str):
            raise UserError(f"{where(path, line, 'description')}: expected a string or a list of strings")
        meta[row["asin"]] = (row["title"], description)
    return meta


def read_amazon(main: str | os.PathLike, meta_path: str | os.PathLike) -> list[dict]:
    """Canonical ``amazon_review`` records from DPL-main rows (JSONL/parquet) and the DPL-meta table."""
    main = Path(main)
    meta = read_amazon_meta(meta_path)
    records, seen = [], set()
    for line, row in iter_rows(main):
        record = _amazon_record(row, meta, main, meta_path, line)
        if record["id"] in seen:
            raise UserError(f"{where(main, line, 'data.asin')}: user {row['user_id']!r} reviews item "
                            f"{row['data']['asin']!r} twice; expected one review per user and item")
        seen.add(record["id"])
        records.append(validate_canonical(record, main, line))
    if not records:
        raise UserError(f"{main}: no rows; expected DPL-main rows {{user_id, profile, data}}")
    return records


def _amazon_record(row: dict, meta: dict[str, tuple[str, str]], main: Path, meta_path: str | os.PathLike,
                   line: int) -> dict:
    def item(obj, name: str) -> tuple[str, str]:
        if not isinstance(obj, dict) or not isinstance(obj.get("asin"), str):
            raise UserError(f"{where(main, line, name + '.asin')}: expected an object with a string asin")
        if obj["asin"] not in meta:
            raise UserError(f"{where(main, line, name + '.asin')}: item {obj['asin']!r} is not in {meta_path}")
        return meta[obj["asin"]]

    if not isinstance(row.get("user_id"), str) or not isinstance(row.get("profile"), list):
        raise UserError(f"{where(main, line)}: expected a DPL-main row {{user_id: str, profile: list, data: object}}")
    data = row.get("data")
    title, description = item(data, "data")
    if not isinstance(data.get("text"), str):
        raise UserError(f"{where(main, line, 'data.text')}: expected the target review text (a string)")
    profile = []
    for i, review in enumerate(row["profile"]):
        item_title, item_description = item(review, f"profile[{i}]")
        profile.append({"item_title": item_title, "item_description": item_description, **review})
    extra = {k: v for k, v in row.items() if k not in ("user_id", "profile", "data")}
    return {**extra, "id": f"{row['user_id']}-{data['asin']}", "user_id": row["user_id"], "task": "amazon_review",
            "input": title, "output": data.get("text"), "profile": profile,
            "target": {"item_title": title, "item_description": description, "rating": data.get("rating"),
                       "title": data.get("title"), "asin": data["asin"]}}
