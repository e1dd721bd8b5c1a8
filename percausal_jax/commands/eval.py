"""``percausal eval --model PATH | --workdir DIR [--step N] --data FILE --out PREDS.jsonl``: generate and score
(:func:`percausal_jax.evaluation.run.run_eval`). ``--strict`` (or, with ``--workdir``, the run's ``data.strict``,
e.g. ``--config.data.strict=true``) makes a record with an empty required field an error instead of a skip."""

from __future__ import annotations

import json

from percausal_jax.data.skips import SkipReport
from percausal_jax.evaluation.contrast_flags import add_flags, check_flags


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="generate for each record and compute ROUGE / METEOR / LaMP metrics")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF model directory, hub id, or 'embedded'")
    src.add_argument("--workdir", help="a training run (its latest checkpoint, or --step)")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--data", required=True, help="canonical or prompt records (JSONL/parquet)")
    p.add_argument("--out", required=True, help="predictions JSONL")
    p.add_argument("--metrics", default=None, help="metrics JSON (default: OUT with .metrics.json)")
    p.add_argument("--task", default=None, help="metric family when records carry no task (e.g. product_review)")
    p.add_argument("--template", choices=("chat", "none"), default=None,
                   help="prompt template (default: the run's, or chat for --model)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    add_flags(p, "decode profile-contrastively against each record's profile-free prompt")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="only the first N records")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (it needs WordNet)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--strict", action="store_true", help=SkipReport.STRICT_HELP)
    p.add_argument("--base-moved", action="store_true",
                   help="with --workdir and --config.model.path=DIR: the run's base model now lives at DIR (the "
                        "same weights, checked by fingerprint)")
    p.set_defaults(func=run, accepts_overrides=True)  # --config.a.b=v: the run's config (with --workdir)


def run(args) -> int:
    from percausal_jax.commands._args import DECODE, check
    from percausal_jax.evaluation.evaluate import DecodeConfig
    from percausal_jax.evaluation.run import EvalJob, run_eval

    check_flags(args)
    check(args, {**DECODE, "step": DECODE["limit"]})
    decode = DecodeConfig(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.repetition_penalty,
                          args.seed, args.batch_size, args.contrast, args.plausibility)
    result = run_eval(EvalJob(
        data=args.data, out=args.out, decode=decode, model=args.model, workdir=args.workdir, step=args.step,
        overrides=tuple(getattr(args, "overrides", ())), base_moved=args.base_moved, metrics=args.metrics,
        task=args.task, template=args.template, limit=args.limit, meteor=not args.no_meteor, strict=args.strict,
        progress=not args.no_progress))
    print(json.dumps(result))
    return 0
