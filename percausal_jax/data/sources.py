"""Raw public releases → canonical records (data.md §1–3); used by ``percausal prepare``, the TFDS builders and
the ``data_prep/`` scripts. Every record returned has passed :func:`records.validate_canonical`; rows with an empty
required field are skipped and counted (``report``), or are errors with ``strict``.

Where the data is: every reader takes a local path or a ``gs://`` URL, and the ``find_*`` helpers also take a
Hugging Face hub id (a dataset repo, downloaded with ``huggingface_hub`` into its cache, only the files asked for;
``HF_HUB_OFFLINE=1`` uses the cache alone), a downloaded snapshot's root (``config`` names the sub-folder) or one
config's folder.

* **LongLaMP** (hub ``LongLaMP/LongLaMP``: ``{config}/{split}-0000k-of-0000n.parquet``; or JSONL saved from
  ``datasets``): rows ``{reviewerId|name|author, input, output, profile}`` are already canonical in all but name;
  :func:`records.read_records` fills ``id`` (``{file stem}-{row}``, so unique across shards), ``user_id`` and
  ``task``. :func:`find_longlamp` finds a split's files; :func:`read_longlamp` reads them in order.
* **LaMP**: ``{split}_questions.json`` (a list of ``{id, input, profile}``) merged by ``id`` with
  ``{split}_outputs.json`` (``{task: "LaMP_N", golds: [{id, output}]}``). LaMP has no user ids: each question
  carries its own user's profile, so ``user_id`` = the question id. Positions in these JSON arrays are reported as
  1-based "lines". :func:`find_lamp` finds the questions file of a split in a folder or hub snapshot.
* **Amazon reviews (DPL/NextQuill)**: DPL-main rows ``{user_id, profile: [{rating, title, text, asin, timestamp}],
  data: {asin, rating, title, text}}`` (hub ``SnowCharmQ/DPL-main``, config = category, splits train/val/test)
  joined by ``asin`` with DPL-meta rows ``{asin, title, description}`` (``SnowCharmQ/DPL-meta``, config =
  category, split ``full``) into the ``amazon_review`` shape of :mod:`percausal_jax.data.prompts`: each review gets
  ``item_title`` / ``item_description`` next to it, ``target`` = the target item and review title/rating,
  ``output`` = the target review text, ``input`` = the target item title, ``id`` = ``{user_id}-{target asin}``
  (DPL keeps one review per user and item). A list-valued ``description`` (raw Amazon 2023 meta) is joined with
  spaces; a null title or description is read as ``""``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence

from percausal_jax import storage
from percausal_jax.data.files import dataset_dict_splits, iter_rows
from percausal_jax.data.records import read_records, validate_canonical
from percausal_jax.data.skips import SkipReport, admit
from percausal_jax.errors import UserError, where

LONGLAMP_HUB_ID = "LongLaMP/LongLaMP"
DPL_MAIN_HUB_ID, DPL_META_HUB_ID = "SnowCharmQ/DPL-main", "SnowCharmQ/DPL-meta"
LONGLAMP_CONFIGS = ("abstract_generation_temporal", "abstract_generation_user", "product_review_temporal",
                    "product_review_user", "topic_writing_temporal", "topic_writing_user")
LONGLAMP_SPLITS = ("train", "val", "test")
LAMP_SPLITS = ("train", "dev", "test")
DPL_SPLITS = ("train", "val", "test")
DPL_CATEGORIES = ("Books", "Movies_and_TV", "CDs_and_Vinyl")

# ------------------------------------------------------------------------------------------ finding split files


def _files(root: storage.Path, rel: tuple[str, ...] = ()) -> Iterator[tuple[storage.Path, tuple[str, ...]]]:
    """Every file under ``root`` as ``(path, relative parts)``, in sorted order (hidden entries skipped)."""
    for p in sorted(root.iterdir(), key=lambda q: q.name):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            yield from _files(p, (*rel, p.name))
        else:
            yield p, (*rel, p.name)


def _is_split_file(parts: tuple[str, ...], split: str) -> bool:
    name = parts[-1]
    return name.endswith(".parquet") and (name.startswith(f"{split}-") or name == f"{split}.parquet"
                                          or split in parts[:-1])


def longlamp_files(root: str | os.PathLike, split: str) -> list[storage.Path]:
    """The split's ``.parquet`` files under ``root`` (sorted): names ``{split}-*.parquet`` / ``{split}.parquet``
    (HF repository layout) or any parquet file inside a folder named ``{split}`` (datasets-server export)."""
    return [p for p, parts in _files(storage.path(root)) if _is_split_file(parts, split)]


def _is_hub_id(s: str) -> bool:
    return not storage.is_remote(s) and storage.looks_like_hub_id(s)


def _pick_config(folder: storage.Path, config: str | None, splits: Sequence[str], what: str) -> storage.Path:
    """The config's sub-folder of a snapshot root; without ``config``, the only config folder there (if the root
    holds one), else the folder itself."""
    if config is not None:
        if (folder / config).is_dir():
            return folder / config
        if folder.name == config:
            return folder
        subs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise UserError(f"{folder}: no sub-folder {config!r} for --config (sub-folders: "
                        f"{', '.join(subs) or 'none'}); expected a {what} snapshot root or one config's folder")
    configs = sorted({parts[0] for _, parts in _files(folder)
                      if len(parts) > 1 and parts[0] not in splits and parts[-1].endswith(".parquet")})
    if len(configs) > 1:
        raise UserError(f"{folder}: holds several configs ({', '.join(configs)}); pass one with --config")
    return folder / configs[0] if configs else folder


def find_split_files(source: str | os.PathLike, *, split: str | None, config: str | None = None,
                     splits: Sequence[str] = LONGLAMP_SPLITS, what: str = "dataset") -> list[storage.Path]:
    """One split's files of a parquet release laid out as ``{config}/{split}-0000k-of-0000n.parquet``.

    ``source``: a file (returned as is); a ``datasets.save_to_disk`` folder (a ``DatasetDict`` one needs
    ``split``); a folder, local or ``gs://``: a snapshot root (``config`` names the sub-folder; with a single
    config folder it is used) or one config's folder, searched for the split's files (without ``split`` it must
    hold a single split; with none of the named splits, all its ``.parquet`` files); or a hub dataset id, from
    which only ``{config}/{split}*`` files are downloaded (``config`` and ``split`` required).
    """
    s = os.fspath(source)
    path = storage.path(s)
    if _is_hub_id(s) and not path.exists():
        if config is None or split is None:
            missing = " and ".join(f"--{n}" for n, v in (("config", config), ("split", split)) if v is None)
            raise UserError(f"{s}: a hub dataset id needs {missing} (the files are {{config}}/{{split}}-*.parquet)")
        resolved = storage.resolve_hf_dir(s, what=what, repo_type="dataset",
                                          allow_patterns=[f"{config}/{split}-*.parquet", f"{config}/{split}.parquet",
                                                          f"{config}/{split}/*.parquet"])
        root = storage.path(resolved.local) / config
        files = longlamp_files(root, split) if root.is_dir() else []
        if not files:
            raise UserError(f"{s}: the hub snapshot ({resolved.local}) has no {config}/{split}-*.parquet files; "
                            "check --config and --split")
        return files
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"{s}: no such file or folder (expected a local path, a gs:// URL or a hub id org/name)")
    if (path / "state.json").is_file():
        return [path]
    dd_splits = dataset_dict_splits(path)
    if dd_splits is not None:
        if split is None:
            raise UserError(f"{path}: a DatasetDict folder with splits {', '.join(dd_splits)}; pass --split")
        if split not in dd_splits:
            raise UserError(f"{path}: no split {split!r}; this DatasetDict folder has {', '.join(dd_splits)}")
        return [path / split]
    folder = _pick_config(path, config, splits, what)
    if split is not None:
        files = _one_folder(folder, split)
        if not files:
            present = [name for name in splits if longlamp_files(folder, name)]
            raise UserError(f"{folder}: no .parquet files of split {split!r} (found splits: "
                            f"{', '.join(present) or 'none'}); expected {split}-00000-of-00001.parquet or {split}/")
        return files
    by_split = {name: files for name in splits if (files := _one_folder(folder, name))}
    if len(by_split) > 1:
        raise UserError(f"{folder}: holds files of several splits ({', '.join(by_split)}); pass --split (or one "
                        "split's file or folder)")
    files = next(iter(by_split.values())) if by_split else [p for p, parts in _files(folder)
                                                            if len(parts) == 1 and parts[0].endswith(".parquet")]
    if not files:
        raise UserError(f"{folder}: no .parquet files in this folder; expected one split's files of the {what}")
    return files


def _one_folder(folder: storage.Path, split: str) -> list[storage.Path]:
    """:func:`longlamp_files`, which must all come from one config folder (a tree holding several configs would
    otherwise mix them)."""
    groups: dict[str, list[storage.Path]] = {}
    for p, parts in _files(folder):
        if _is_split_file(parts, split):
            cut = parts.index(split) if split in parts[:-1] else len(parts) - 1
            groups.setdefault("/".join(parts[:cut]) or ".", []).append(p)
    if len(groups) > 1:
        raise UserError(f"{folder}: split {split!r} has files in several folders ({', '.join(sorted(groups))}); "
                        "pass --config (a sub-folder) or one config's folder")
    return next(iter(groups.values()), [])


# ------------------------------------------------------------------------------------------------------ LongLaMP


def find_longlamp(source: str | os.PathLike = LONGLAMP_HUB_ID, *, split: str | None = None,
                  config: str | None = None) -> list[storage.Path]:
    """LongLaMP files of one config and split (see :func:`find_split_files`)."""
    if config is not None and config not in LONGLAMP_CONFIGS and _is_hub_id(os.fspath(source)):
        raise UserError(f"--config {config!r}: expected one of {', '.join(LONGLAMP_CONFIGS)}")
    return find_split_files(source, split=split, config=config, splits=LONGLAMP_SPLITS, what="LongLaMP dataset")


def read_longlamp(paths: Sequence[str | os.PathLike], *, strict: bool = False,
                  report: SkipReport | None = None) -> Iterator[dict]:
    """Canonical records from LongLaMP parquet/JSONL files, one file in memory at a time; ids unique across files."""
    seen: dict[str, storage.Path] = {}
    for path in map(storage.path, paths):
        for record in read_records(path, strict=strict, report=report):
            if record["id"] in seen:
                raise UserError(f"{path}: id {record['id']!r} was already produced by {seen[record['id']]}; "
                                "give files of one split distinct names")
            seen[record["id"]] = path
            yield record


# ---------------------------------------------------------------------------------------------------------- LaMP


def find_lamp(source: str | os.PathLike, *, split: str | None = None, config: str | None = None) -> storage.Path:
    """The ``{split}_questions.json`` file: ``source`` itself when it is a file; else searched in a folder (local
    or ``gs://``; ``config`` names a sub-folder, e.g. ``LaMP_3`` or ``time/LaMP_3``) or a hub dataset snapshot
    (only ``*{split}_questions.json`` / ``*{split}_outputs.json`` files are downloaded)."""
    s = os.fspath(source)
    path = storage.path(s)
    if _is_hub_id(s) and not path.exists():
        if split is None:
            raise UserError(f"{s}: a hub dataset id needs --split (one of {', '.join(LAMP_SPLITS)})")
        prefix = f"{config}/" if config else ""
        resolved = storage.resolve_hf_dir(s, what="LaMP dataset", repo_type="dataset",
                                          allow_patterns=[f"{prefix}*{split}_questions.json",
                                                          f"{prefix}*{split}_outputs.json"])
        path = storage.path(resolved.local)
    if path.is_file():
        return path
    if not path.is_dir():
        raise UserError(f"{s}: no such file or folder (expected {{split}}_questions.json, a folder holding it, a "
                        "gs:// URL or a hub id org/name)")
    folder = path / config if config else path
    if not folder.is_dir():
        raise UserError(f"{path}: no sub-folder {config!r} (--config)")
    found = [(p, parts) for p, parts in _files(folder) if parts[-1].endswith("_questions.json")]
    if split is None:
        present = sorted({parts[-1].removesuffix("_questions.json") for _, parts in found})
        if len(found) == 1:
            return found[0][0]
        if not found:
            raise UserError(f"{folder}: no *_questions.json file in this folder; expected LaMP's "
                            "{split}_questions.json (+ {split}_outputs.json)")
        if len(present) > 1:
            raise UserError(f"{folder}: holds several splits ({', '.join(present)}); pass --split")
    matches = [p for p, parts in found if split is None or parts[-1] == f"{split}_questions.json"]
    if not matches:
        present = sorted({parts[-1].removesuffix("_questions.json") for _, parts in found})
        raise UserError(f"{folder}: no {split}_questions.json (found splits: {', '.join(present) or 'none'})")
    if len(matches) > 1:
        names = ", ".join("/".join(parts) for p, parts in found if p in matches)
        raise UserError(f"{folder}: several {matches[0].name} files ({names}); pass --config with the sub-folder")
    return matches[0]


def lamp_outputs_path(questions: str | os.PathLike) -> storage.Path | None:
    """``dev_questions.json`` → ``dev_outputs.json`` beside it, if that file exists."""
    questions = storage.path(questions)
    candidate = questions.with_name(questions.name.replace("_questions", "_outputs"))
    return candidate if candidate != questions and candidate.is_file() else None


def read_lamp(questions: str | os.PathLike, outputs: str | os.PathLike | None = None, *, task: str | None = None,
              require_output: bool = True, strict: bool = False, report: SkipReport | None = None) -> list[dict]:
    """Canonical LaMP records; ``task`` (``"LaMP-3"``) defaults to the outputs file's ``task`` (``"LaMP_3"``)."""
    questions = storage.path(questions)
    rows = _load_json(questions)
    if not isinstance(rows, list):
        raise UserError(f"{questions}: expected a JSON list of {{id, input, profile}} questions, "
                        f"got {type(rows).__name__}")
    golds: dict[str, str | None] = {}
    if outputs is not None:
        outputs = storage.path(outputs)
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
        kept = admit(lambda: validate_canonical(record, questions, line, require_output=require_output),
                     row["id"], strict=strict, report=report)
        if kept is not None:
            records.append(kept)
    if golds:
        raise UserError(f"{outputs}: gold outputs for ids {sorted(golds)[:5]} have no question in {questions}")
    if not records:
        raise UserError(f"{questions}: no usable questions (all {len(rows)} skipped or none in the file)")
    return records


def _lamp_golds(path: storage.Path) -> tuple[str | None, dict[str, str | None]]:
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("golds"), list):
        raise UserError(f"{where(path, None, 'golds')}: expected {{\"task\": \"LaMP_N\", \"golds\": [{{id, output}}]}}")
    golds: dict[str, str | None] = {}
    for line, gold in enumerate(data["golds"], start=1):
        if not (isinstance(gold, dict) and isinstance(gold.get("id"), str)
                and (gold.get("output") is None or isinstance(gold["output"], str))):
            raise UserError(f"{where(path, line, 'golds')}: expected {{\"id\": str, \"output\": str}}, "
                            f"got {gold!r:.60}")
        golds[gold["id"]] = gold.get("output")  # a null output: the question is skipped as empty_output
    task = data.get("task")
    return (task.replace("_", "-") if isinstance(task, str) else None), golds


def _load_json(path: storage.Path):
    if not path.is_file():
        raise UserError(f"{path}: no such file; expected a LaMP JSON file")
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a JSON file ({e})") from None


# -------------------------------------------------------------------------------------------------------- Amazon


def find_amazon(main: str | os.PathLike = DPL_MAIN_HUB_ID, meta: str | os.PathLike = DPL_META_HUB_ID, *,
                split: str | None = None, config: str | None = None) -> tuple[list[storage.Path], list[storage.Path]]:
    """DPL-main files of one category (``config``) and split, and that category's DPL-meta files (split
    ``full``); each source a file, folder or hub id (see :func:`find_split_files`)."""
    main_files = find_split_files(main, split=split, config=config, splits=DPL_SPLITS, what="DPL-main dataset")
    meta_files = find_split_files(meta, split="full", config=config, splits=("full",), what="DPL-meta dataset")
    return main_files, meta_files


def _paths(paths) -> list[storage.Path]:
    if isinstance(paths, (str, os.PathLike)):
        return [storage.path(paths)]
    return [storage.path(p) for p in paths]


def read_amazon_meta(paths) -> dict[str, tuple[str, str]]:
    """DPL-meta rows (one file or several) → ``{asin: (title, description)}``."""
    meta: dict[str, tuple[str, str]] = {}
    for path in _paths(paths):
        for line, row in iter_rows(path):
            if not isinstance(row.get("asin"), str) or not row["asin"].strip():
                raise UserError(f"{where(path, line, 'asin')}: expected a non-empty string")
            title = row.get("title")
            if title is not None and not isinstance(title, str):
                raise UserError(f"{where(path, line, 'title')}: expected a string, got {title!r:.40}")
            description = row.get("description")
            if isinstance(description, list) and all(isinstance(d, str) for d in description):
                description = " ".join(description)
            if description is not None and not isinstance(description, str):
                raise UserError(f"{where(path, line, 'description')}: expected a string or a list of strings")
            meta[row["asin"]] = (title or "", description or "")
    return meta


def read_amazon(main, meta_path, *, strict: bool = False, report: SkipReport | None = None) -> list[dict]:
    """Canonical ``amazon_review`` records from DPL-main rows (JSONL/parquet files, in order) and the DPL-meta
    table (one file or several)."""
    main_files = _paths(main)
    meta_files = _paths(meta_path)
    meta = read_amazon_meta(meta_files)
    meta_name = meta_files[0] if len(meta_files) == 1 else f"{meta_files[0].parent} (DPL-meta)"
    records, seen = [], {}
    for path in main_files:
        for line, row in iter_rows(path):
            record = _amazon_record(row, meta, path, meta_name, line)
            if record["id"] in seen:
                raise UserError(f"{where(path, line, 'data.asin')}: user {row['user_id']!r} reviews item "
                                f"{row['data']['asin']!r} twice (first at {seen[record['id']]}); expected one "
                                "review per user and item")
            seen[record["id"]] = where(path, line)
            kept = admit(lambda: validate_canonical(record, path, line), record["id"], strict=strict, report=report)
            if kept is not None:
                records.append(kept)
    if not records:
        raise UserError(f"{main_files[0]}: no usable rows; expected DPL-main rows {{user_id, profile, data}}")
    return records


def _amazon_record(row: dict, meta: dict[str, tuple[str, str]], main, meta_path, line: int) -> dict:
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
    if data.get("text") is not None and not isinstance(data["text"], str):
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
