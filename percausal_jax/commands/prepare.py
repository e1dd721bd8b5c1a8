"""percausal prepare: raw or canonical data → ready prompt records (retrieved, templated, within budget).

Output rows (JSONL, written atomically) are prompt records that ``percausal score`` and training read as they are::

    {id, user_id, task, prompt, prompt_no_profile, completion, template, profile_items_used, ...extra keys}

``template`` records how the prompts were rendered (``"chat"``: the text already holds the chat template's special
tokens, so it is tokenized without adding any). Extra keys of the source record (``personal_spans``, ...) are
kept; the consumed ``input``/``output``/``profile``/``target`` are not. TRL rows have no id: theirs is
``{input file stem}-{position}``.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np

from percausal_jax.data import sources
from percausal_jax.data.chat import TEMPLATES
from percausal_jax.data.featurize import FeaturizeConfig, Featurizer, Kept, Texts
from percausal_jax.data.prompts import MODES
from percausal_jax.data.records import read_records, write_jsonl
from percausal_jax.data.retrieval import METHODS, Contriever
from percausal_jax.errors import UserError

SOURCES = ("longlamp", "lamp", "amazon", "jsonl")
CONSUMED = {"input", "output", "profile", "target", "prompt", "prompt_no_profile", "completion", "template",
            "profile_items_used"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``percausal prepare``."""
    p = subparsers.add_parser("prepare", help="raw/canonical data -> prompt records (prompt, prompt_no_profile, "
                              "completion)", description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, choices=SOURCES,
                   help="longlamp: parquet/JSONL file or folder of one split's parquet files; lamp: "
                        "{split}_questions.json (outputs read from beside it); amazon: DPL-main rows (with "
                        "--meta); jsonl: records of any kind (.jsonl/.parquet)")
    p.add_argument("--input", required=True, type=Path, help="input file (or folder, for longlamp)")
    p.add_argument("--meta", type=Path, help="DPL-meta rows {asin, title, description} (amazon only)")
    p.add_argument("--task", help="LaMP task, e.g. LaMP-3 (lamp only; default: from the outputs file)")
    p.add_argument("--out", required=True, type=Path, help="output .jsonl")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (needed for --template chat, "
                   "--max-prompt-len and token statistics)")
    p.add_argument("--template", choices=TEMPLATES, default="none", help="prompt wrapping (default none)")
    p.add_argument("--enable-thinking", action="store_true", help="passed to chat templates (Qwen3)")
    p.add_argument("--retriever", choices=METHODS, default="bm25", help="profile ranking (default bm25)")
    p.add_argument("--contriever", type=Path, help="local facebook/contriever-style model (--retriever contriever)")
    p.add_argument("--k", type=int, default=4, help="profile items to retrieve (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random retriever (default 0)")
    p.add_argument("--max-prompt-len", type=int, help="token budget of each prompt (drops items to fit)")
    p.add_argument("--budget", choices=("drop", "truncate"), default="drop",
                   help="fit the budget by dropping items (default) or truncating their text")
    p.add_argument("--max-response-len", type=int, help="drop examples whose completion (+EOS) has more tokens")
    p.add_argument("--counterfactual", choices=MODES, default="drop",
                   help="profile-free prompt: remove the profile block or put a None placeholder (default drop)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Reads, featurizes, writes the prompt records atomically and prints statistics."""
    if args.task is not None and args.source != "lamp":
        raise UserError("--task applies to --source lamp only")
    if (args.meta is not None) != (args.source == "amazon"):
        raise UserError("--meta (the DPL-meta file) is required for --source amazon and only used there")
    if args.max_response_len is not None and args.tokenizer is None:
        raise UserError("--max-response-len counts tokens: pass --tokenizer")
    records = load_records(args)
    tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer is not None else None
    cfg = FeaturizeConfig(template=args.template, counterfactual_mode=args.counterfactual, retriever=args.retriever,
                          k=args.k, seed=args.seed, max_prompt_len=args.max_prompt_len,
                          max_response_len=args.max_response_len, budget_mode=args.budget,
                          enable_thinking=args.enable_thinking)
    contriever = Contriever(args.contriever) if args.contriever is not None else None
    featurizer = Featurizer(tokenizer, cfg, contriever=contriever)

    out, dropped, lengths = [], Counter(), {"prompt": [], "prompt_no_profile": [], "completion+eos": []}
    for position, record in enumerate(records, start=1):
        if tokenizer is None:
            texts, result = featurizer.texts(record), None
        else:
            texts, result = featurizer.run(record)
            if not isinstance(result, Kept):
                dropped[result.reason] += 1
                continue
            ex = result.example
            for key, ids in zip(lengths, (ex.prompt_ids, ex.prompt_no_profile_ids, ex.response_ids)):
                lengths[key].append(len(ids))
        out.append(prompt_record(record, texts, f"{args.input.stem}-{position}"))
    if not out:
        raise UserError(f"{args.input}: no example is left (dropped: {dict(dropped)}); raise --max-prompt-len "
                        "or --max-response-len")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out, out)
    print(f"wrote {len(out)} prompt records to {args.out}; dropped {sum(dropped.values())}"
          + "".join(f", {reason} {n}" for reason, n in sorted(dropped.items())))
    if tokenizer is not None:
        print("tokens (p50 / p90 / p99 / max):")
        for key, values in lengths.items():
            p50, p90, p99 = np.percentile(values, [50, 90, 99], method="higher")
            print(f"  {key:<18} {p50} / {p90} / {p99} / {max(values)}")
    used = [r["profile_items_used"] for r in out]
    histogram = dict(sorted(Counter(used).items()))
    print(f"profile items used: mean {np.mean(used):.2f}; examples per item count {histogram}")
    return 0


def load_records(args: argparse.Namespace) -> list[dict]:
    """Canonical (or, for jsonl, any kind of) records from ``--input`` per ``--source``."""
    path: Path = args.input
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if args.source == "longlamp":
        return list(sources.read_longlamp(_longlamp_inputs(path)))
    if args.source == "lamp":
        outputs = sources.lamp_outputs_path(path)
        if outputs is None:
            raise UserError(f"{path}: no outputs file beside it ({path.name.replace('_questions', '_outputs')}); "
                            "prepare needs the gold outputs (the LaMP test split has none)")
        return sources.read_lamp(path, outputs, task=args.task)
    if args.source == "amazon":
        return sources.read_amazon(path, args.meta)
    return read_records(path)


def _longlamp_inputs(path: Path) -> list[Path]:
    """A file as is; a folder: its split's files (it must hold one split), else all its parquet files."""
    if not path.is_dir():
        return [path]
    by_split = {split: files for split in sources.LONGLAMP_SPLITS if (files := sources.longlamp_files(path, split))}
    if len(by_split) > 1:
        raise UserError(f"{path}: holds files of several splits ({', '.join(by_split)}); pass one split's file or "
                        "folder")
    files = next(iter(by_split.values())) if by_split else sorted(path.glob("*.parquet"))
    if not files:
        raise UserError(f"{path}: no .parquet files in this folder; expected one LongLaMP split's files")
    return files


def prompt_record(record: dict, texts: Texts, fallback_id: str) -> dict:
    """The prompt record written for ``record``: id/user_id/task first, then the texts, then extra keys."""
    head = {"id": record.get("id", fallback_id)}
    head.update({key: record[key] for key in ("user_id", "task") if key in record})
    extra = {k: v for k, v in record.items() if k not in CONSUMED and k not in head}
    return {**head, "prompt": texts.prompt, "prompt_no_profile": texts.prompt_no_profile,
            "completion": texts.completion, "template": texts.template, "profile_items_used": texts.items_used,
            **extra}


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load a tokenizer ({e}); expected a Hugging Face tokenizer directory") from None
