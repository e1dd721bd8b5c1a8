"""percausal prepare: raw or canonical data → ready prompt records (retrieved, templated, within budget).

Output rows (JSONL, written atomically; ``--out`` may be a ``gs://`` URL) are prompt records that ``percausal
score`` and training read as they are::

    {id, user_id, task, prompt, prompt_no_profile, completion, template, profile_items_used, ...extra keys}

``template`` records how the prompts were rendered (``"chat"``: the text already holds the chat template's special
tokens, so it is tokenized without adding any). Extra keys of the source record (``personal_spans``, ...) are
kept; the consumed ``input``/``output``/``profile``/``target`` are not. TRL rows have no id: theirs is
``{input file stem}-{line}``.

With ``--template none`` both prompts of a canonical record end with ``--separator`` (default a line break; see
:mod:`percausal_jax.data.featurize`), so the written prompt text is what training and ``eval`` see.

``--input`` (and ``--meta``, ``--tokenizer``, ``--contriever``) take a local path, a ``gs://`` URL or a Hugging
Face hub id. Rows with an empty required field are skipped, examples over the prompt budget dropped; one table at
the end says how many were kept, skipped and why, with the first ids per reason (``--strict``: a skipped row is an
error naming file, row and field). Completions over ``--max-response-len`` tokens are counted as truncated and
written in full (training cuts them to its own ``data.max_response_len``, without EOS), or dropped with
``--no-truncate-response``.
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

from percausal_jax import storage
from percausal_jax.data import records as records_lib
from percausal_jax.data import sources
from percausal_jax.data.chat import TEMPLATES
from percausal_jax.data.featurize import FeaturizeConfig, Featurizer, Kept, Texts
from percausal_jax.data.files import with_split, write_jsonl
from percausal_jax.data.prompts import MODES
from percausal_jax.data.records import SkipReport
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
                   help="longlamp: hub id (LongLaMP/LongLaMP), snapshot root, config folder or parquet/JSONL file; "
                        "lamp: {split}_questions.json (outputs read from beside it), a folder holding it, or a hub "
                        "id; amazon: DPL-main rows (file, folder or hub id SnowCharmQ/DPL-main; with --meta); "
                        "jsonl: records of any kind (.jsonl/.jsonl.gz/.json/.parquet/.arrow or a "
                        "datasets.save_to_disk folder)")
    p.add_argument("--input", required=True, help="input file, folder, gs:// URL or hub id")
    p.add_argument("--config", help="sub-folder / hub config: a LongLaMP config (product_review_user, ...), a DPL "
                   "category (Books, ...) or a LaMP folder (LaMP_3); longlamp, lamp and amazon only")
    p.add_argument("--split", help="split to read (longlamp/amazon: train, val, test; lamp: train, dev, test; jsonl: "
                   "a DatasetDict folder's split); needed when the input holds several")
    p.add_argument("--meta", help="DPL-meta rows {asin, title, description}: file, folder or hub id "
                   "SnowCharmQ/DPL-meta (amazon only)")
    p.add_argument("--task", help="LaMP task, e.g. LaMP-3 (lamp only; default: from the outputs file)")
    p.add_argument("--out", required=True, help="output .jsonl (local path or gs:// URL)")
    p.add_argument("--tokenizer", help="tokenizer: local dir, gs:// dir or hub id (needed for --template chat, "
                   "--max-prompt-len and token statistics)")
    p.add_argument("--template", choices=TEMPLATES, default="none", help="prompt wrapping (default none)")
    p.add_argument("--enable-thinking", action="store_true", help="passed to chat templates (Qwen3)")
    p.add_argument("--retriever", choices=METHODS, default="bm25", help="profile ranking (default bm25)")
    p.add_argument("--contriever", help="facebook/contriever-style encoder (local dir, gs:// dir or hub id; "
                   "safetensors weights only) for --retriever contriever")
    p.add_argument("--k", type=int, default=4, help="profile items to retrieve (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random retriever (default 0)")
    p.add_argument("--max-prompt-len", type=int, help="token budget of each prompt (drops items to fit)")
    p.add_argument("--budget", choices=("drop", "truncate"), default="drop",
                   help="fit the budget by dropping items (default) or truncating their text")
    p.add_argument("--max-response-len", type=int,
                   help="count examples whose completion (+EOS / end-of-turn) has more tokens as truncated (written "
                        "in full; training truncates to data.max_response_len), or drop them with "
                        "--no-truncate-response")
    p.add_argument("--truncate-response", action=argparse.BooleanOptionalAction, default=True,
                   help="over --max-response-len: keep and count (default, as data.truncate_response in training) "
                        "or drop")
    p.add_argument("--separator", default="\n",
                   help="text ending both prompts of canonical records with --template none (default a line break; "
                        "a real character: in bash $'\\n\\n' for a blank line, '' to glue)")
    p.add_argument("--counterfactual", choices=MODES, default="drop",
                   help="profile-free prompt: remove the profile block or put a None placeholder (default drop)")
    p.add_argument("--strict", action="store_true",
                   help="a row with an empty required field (input, output, prompt, completion) is an error naming "
                        "file, row and field, instead of being skipped and counted")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Reads, featurizes, writes the prompt records atomically and prints statistics."""
    if args.task is not None and args.source != "lamp":
        raise UserError("--task applies to --source lamp only")
    if (args.meta is not None) != (args.source == "amazon"):
        raise UserError("--meta (the DPL-meta file) is required for --source amazon and only used there")
    if args.config is not None and args.source == "jsonl":
        raise UserError("--config applies to --source longlamp, lamp and amazon (a sub-folder or hub config)")
    if args.max_response_len is not None and args.tokenizer is None:
        raise UserError("--max-response-len counts tokens: pass --tokenizer")
    from percausal_jax.commands._args import AT_LEAST_1, NONNEG, check

    check(args, {"k": AT_LEAST_1, "seed": NONNEG, "max_prompt_len": AT_LEAST_1, "max_response_len": AT_LEAST_1})
    report = SkipReport()
    numbered = load_records(args, report)
    tokenizer = storage.load_tokenizer(args.tokenizer) if args.tokenizer is not None else None
    cfg = FeaturizeConfig(template=args.template, counterfactual_mode=args.counterfactual, retriever=args.retriever,
                          k=args.k, seed=args.seed, max_prompt_len=args.max_prompt_len,
                          max_response_len=args.max_response_len, budget_mode=args.budget,
                          truncate_response=args.truncate_response, enable_thinking=args.enable_thinking,
                          separator=args.separator)
    contriever = Contriever(args.contriever) if args.contriever is not None else None
    featurizer = Featurizer(tokenizer, cfg, contriever=contriever)

    out, lengths = [], {"prompt": [], "prompt_no_profile": [], "completion+end": []}
    truncated: list[str] = []
    for fallback_id, record in numbered:
        if tokenizer is None:
            texts = featurizer.texts(record)
        else:
            texts, result = featurizer.run(record)
            if not isinstance(result, Kept):
                report.kept -= 1  # read, but not written
                report.skip(result.reason, record.get("id", fallback_id))
                continue
            ex = result.example
            n_response = len(ex.response_ids)
            if result.truncated:  # the table shows the full length (what --max-response-len is chosen from)
                truncated.append(str(record.get("id", fallback_id)))
                n_response = (len(tokenizer(texts.completion, add_special_tokens=False)["input_ids"])
                              + len(featurizer.response_end(texts.template)))
            for key, n in zip(lengths, (len(ex.prompt_ids), len(ex.prompt_no_profile_ids), n_response)):
                lengths[key].append(n)
        out.append(prompt_record(record, texts, fallback_id))
    if not out:
        raise UserError(f"{args.input}: no example is left (dropped: {dict(sorted(report.counts.items()))}); raise "
                        "--max-prompt-len or --max-response-len")
    write_jsonl(args.out, out)
    print(f"wrote {len(out)} prompt records to {args.out}")
    print(report.table())
    if truncated:
        print(f"truncated responses: {len(truncated)} over --max-response-len {args.max_response_len} tokens, "
              f"written in full (training cuts them to data.max_response_len, without EOS): "
              f"{', '.join(truncated[:5])}{', ...' if len(truncated) > 5 else ''}")
    if tokenizer is not None:
        print("tokens (p50 / p90 / p99 / max):")
        for key, values in lengths.items():
            p50, p90, p99 = np.percentile(values, [50, 90, 99], method="higher")
            print(f"  {key:<18} {p50} / {p90} / {p99} / {max(values)}")
    used = [r["profile_items_used"] for r in out]
    histogram = dict(sorted(Counter(used).items()))
    print(f"profile items used: mean {np.mean(used):.2f}; examples per item count {histogram}")
    return 0


def load_records(args: argparse.Namespace, report: SkipReport | None = None) -> list[tuple[str, dict]]:
    """``(fallback id, record)`` pairs per ``--source``: canonical records (for jsonl, any kind); the fallback id
    (``{file stem}-{line}``) names rows without an id. Skipped rows are counted in ``report``."""
    strict = bool(getattr(args, "strict", False))
    split, config = getattr(args, "split", None), getattr(args, "config", None)
    if args.source == "longlamp":
        files = sources.find_longlamp(args.input, split=split, config=config)
        return _with_ids(sources.read_longlamp(files, strict=strict, report=report))
    if args.source == "lamp":
        questions = sources.find_lamp(args.input, split=split, config=config)
        outputs = sources.lamp_outputs_path(questions)
        if outputs is None:
            raise UserError(f"{questions}: no outputs file beside it "
                            f"({questions.name.replace('_questions', '_outputs')}); prepare needs the gold outputs "
                            "(the LaMP test split has none)")
        return _with_ids(sources.read_lamp(questions, outputs, task=args.task, strict=strict, report=report))
    if args.source == "amazon":
        main, meta = sources.find_amazon(args.input, args.meta, split=split, config=config)
        return _with_ids(sources.read_amazon(main, meta, strict=strict, report=report))
    path = with_split(args.input, split)
    if split is not None and path == storage.path(args.input):
        raise UserError(f"{args.input}: --split {split} applies to a DatasetDict folder (datasets.save_to_disk), "
                        "and this is not one")
    stem = records_lib.file_stem(path)
    return [(f"{stem}-{line}", record)
            for line, record in records_lib.read_numbered(path, strict=strict, report=report)]


def _with_ids(records) -> list[tuple[str, dict]]:
    return [(record["id"], record) for record in records]


def prompt_record(record: dict, texts: Texts, fallback_id: str) -> dict:
    """The prompt record written for ``record``: id/user_id/task first, then the texts, then extra keys."""
    head = {"id": record.get("id", fallback_id)}
    head.update({key: record[key] for key in ("user_id", "task") if key in record})
    extra = {k: v for k, v in record.items() if k not in CONSUMED and k not in head}
    return {**head, "prompt": texts.prompt, "prompt_no_profile": texts.prompt_no_profile,
            "completion": texts.completion, "template": texts.template, "profile_items_used": texts.items_used,
            **extra}
