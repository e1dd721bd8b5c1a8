"""percausal prepare: raw or canonical data → ready prompt records (retrieved, templated, within budget).

Output rows (JSONL, written atomically; ``--out`` may be a ``gs://`` URL) are prompt records that ``percausal
score`` and training read as they are (the fields: :mod:`percausal_jax.data.prepare`, which does the work).

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

from percausal_jax.data.chat import TEMPLATES
from percausal_jax.data.prepare import SOURCES
from percausal_jax.data.prompts import MODES
from percausal_jax.data.retrieval import METHODS
from percausal_jax.errors import UserError


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
    """Checks the flags, then :func:`percausal_jax.data.prepare.prepare`; prints its statistics."""
    if args.task is not None and args.source != "lamp":
        raise UserError("--task applies to --source lamp only")
    if (args.meta is not None) != (args.source == "amazon"):
        raise UserError("--meta (the DPL-meta file) is required for --source amazon and only used there")
    if args.config is not None and args.source == "jsonl":
        raise UserError("--config applies to --source longlamp, lamp and amazon (a sub-folder or hub config)")
    if args.max_response_len is not None and args.tokenizer is None:
        raise UserError("--max-response-len counts tokens: pass --tokenizer")
    from percausal_jax.commands._args import AT_LEAST_1, NONNEG, check
    from percausal_jax.data.featurize import FeaturizeConfig
    from percausal_jax.data.prepare import Prepare, Source, prepare

    check(args, {"k": AT_LEAST_1, "seed": NONNEG, "max_prompt_len": AT_LEAST_1, "max_response_len": AT_LEAST_1})
    source = Source(args.source, args.input, args.config, args.split, args.meta, args.task)
    cfg = FeaturizeConfig(template=args.template, counterfactual_mode=args.counterfactual, retriever=args.retriever,
                          k=args.k, seed=args.seed, max_prompt_len=args.max_prompt_len,
                          max_response_len=args.max_response_len, budget_mode=args.budget,
                          truncate_response=args.truncate_response, enable_thinking=args.enable_thinking,
                          separator=args.separator)
    print(prepare(Prepare(source, args.out, cfg, args.tokenizer, args.contriever, args.strict)).summary())
    return 0
